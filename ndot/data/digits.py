"""sklearn's handwritten digits (1,797 8x8 images, 10 classes): a real dataset that ships offline.

A fixed stratified 80/20 split; images are upsampled to the model's input size
and kept on the training device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ndot.data import DatasetInfo
from ndot.data.loader import DeviceLoader

if TYPE_CHECKING:
    from ndot.config import TrainConfig

INFO = DatasetInfo(num_classes=10, in_channels=1, image_size=None, in_data_root=False)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def check(cfg: "TrainConfig") -> None:
    """Nothing to download: the data ships inside scikit-learn."""


def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified split: (x_train, y_train, x_test, y_test), x in [0, 1] of shape [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    i_train, i_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=TEST_FRACTION, stratify=d.target, random_state=SPLIT_SEED
    )
    return x[i_train], y[i_train], x[i_test], y[i_test]


def loaders(cfg: "TrainConfig", device: torch.device, input_size: int) -> tuple[DeviceLoader, DeviceLoader]:
    x_train, y_train, x_test, y_test = split()
    mean, std = x_train.mean(), x_train.std()

    def to_input(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        return ((x - mean) / std).to(device)

    train = DeviceLoader(to_input(x_train), y_train.to(device), cfg.batch_size, shuffle=True, seed=cfg.seed)
    test = DeviceLoader(to_input(x_test), y_test.to(device), cfg.batch_size, shuffle=False)
    return train, test
