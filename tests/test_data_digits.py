"""The offline digits dataset: the fixed stratified 80/20 split and its inputs."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from ndot import data
from ndot.config import TrainConfig
from ndot.data import digits


def test_the_split_is_a_stratified_80_20_of_all_1797_images_in_0_1():
    x_train, y_train, x_test, y_test = digits.split()
    assert (len(y_train), len(y_test)) == (1437, 360) and x_train.shape[1:] == (1, 8, 8)
    assert 0 <= float(torch.cat([x_train, x_test]).min()) and float(torch.cat([x_train, x_test]).max()) == 1.0
    per_class = torch.bincount(torch.tensor(load_digits().target), minlength=10)
    # Stratified: each class's share of the test set is its share of the whole, to one image.
    assert ((torch.bincount(y_test, minlength=10) - 0.2 * per_class).abs() <= 1).all()
    assert torch.equal(torch.bincount(y_train, minlength=10) + torch.bincount(y_test, minlength=10), per_class)
    again = digits.split()
    assert all(torch.equal(a, b) for a, b in zip(again, (x_train, y_train, x_test, y_test))), "a fixed split"


def test_inputs_are_upsampled_and_standardised_with_the_training_images_statistics():
    x_train, y_train, x_test, _ = digits.split()
    train, test = digits.loaders(TrainConfig(batch_size=2000), torch.device("cpu"), 16)
    mean, std = x_train.mean(), x_train.std()
    up = lambda x: torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
    (x, _), = list(test)
    torch.testing.assert_close(x, (up(x_test) - mean) / std)
    train.set_epoch(1)
    (x, y), = list(train)
    assert sorted(y.tolist()) == sorted(y_train.tolist()) and x.shape == (1437, 1, 16, 16)


def test_the_split_is_the_one_results_were_reported_on():
    # "Fixed" across versions too: a changed seed or split call would silently swap the test set, and
    # accuracies of earlier runs would no longer compare. The first test images, by index in load_digits:
    first = [1496, 188, 705, 820, 413, 744, 1466, 500, 254, 1750, 1717, 1261]
    d = load_digits()
    _, _, x_test, y_test = digits.split()
    assert torch.equal(x_test[:12, 0], torch.tensor(d.images[first], dtype=torch.float32) / 16.0)
    assert y_test[:12].tolist() == d.target[first].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3, 2, 6]


def test_a_name_registered_for_another_dataset_is_refused(user_data):
    # Tables and checkpoints go by the name: another dataset under it would be read as this one.
    with pytest.raises(ValueError, match="dataset 'digits' is registered already, by ndot.data.digits"):
        data.register("digits", digits.loaders, digits.INFO)
    module, name = user_data
    mine = __import__(module)
    with pytest.raises(ValueError, match=f"dataset '{name}' is registered already, by {module}"):
        data.register(name, digits.loaders, digits.INFO)
    data.register(name, mine.loaders, data.info(name))  # the same again, as a module imported twice does
    assert data.origin(name) == module and data.origin("digits") == "ndot.data.digits"
