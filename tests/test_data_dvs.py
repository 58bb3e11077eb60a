"""CIFAR10-DVS: .aedat4 recordings written with faery, read through tonic and the real loaders and cache."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tonic
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from data_fixtures import closed_port, crop_offsets, one_line, uniform_enough
from helpers import HANG_S, exit_status
from ndot.config import TrainConfig
from ndot.data import DataError, dvs, fixtures, key, storage
from ndot.sweep import cli, runner
from ndot.sweep.definitions import TIMESTEPS
from ndot.evaluate import main as evaluate_main
from ndot.train import main as train_main
from ndot.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
PER_CLASS = 100  # 1,000 recordings: tonic's minimum, and a 900 / 100 split


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvs")
    fixtures.write_cifar10dvs(root, per_class=PER_CLASS, events=300)
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dvs-cache")


@pytest.fixture(autouse=True)
def fixture_size(monkeypatch, shared_cache):
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", PER_CLASS)
    monkeypatch.setenv("NDOT_CACHE", str(shared_cache))


def config(root: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "cifar10dvs", "data_root": str(root), "batch_size": 64, "workers": 0, "T": 2, **kw})


def epoch(loader, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(n)
    x, y = zip(*loader)
    return torch.cat(x), torch.cat(y)


def tonic_events(n: int, rng: np.random.Generator) -> np.ndarray:
    events = np.zeros(n, dtype=dvs.CIFAR10DVS.dtype)
    events["t"] = np.arange(n)
    events["x"], events["y"] = rng.integers(0, 128, n), rng.integers(0, 128, n)
    events["p"] = rng.random(n) < 0.5
    return events


# --- frames --------------------------------------------------------------------------------------------------

def test_equal_count_frames_match_tonic_when_the_count_divides():
    events = tonic_events(1200, np.random.default_rng(0))
    ours = dvs.count_frames(events, 4)
    theirs = tonic.transforms.ToFrame(sensor_size=dvs.SENSOR_SIZE, n_event_bins=4)(events)
    assert ours.shape == (4, 2, 128, 128) and ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(theirs).float())


def test_equal_count_frames_keep_every_event_in_time_order():
    events = tonic_events(1003, np.random.default_rng(1))
    events["x"] = np.arange(1003) % 128
    events["y"] = np.arange(1003) // 128
    frames = dvs.count_frames(events, 4)
    per_bin = frames.sum((1, 2, 3))
    assert per_bin.sum() == 1003 and per_bin.max() - per_bin.min() <= 1
    # Event i sits at pixel (i // 128, i % 128): each bin holds one contiguous run of indices.
    owner = frames.sum(1).flatten(1).argmax(0)[:1003]
    assert torch.equal(owner, owner.sort().values)


@pytest.mark.parametrize("field", ["x", "y"])
def test_an_event_one_past_the_sensors_edge_is_refused_not_counted_in_another_pixel(field):
    # x = 128 would count at x = 0 a row down; y = 128 in the other polarity, or the next bin.
    events = tonic_events(10, np.random.default_rng(0))
    events[field][-1] = 128
    with pytest.raises(DataError, match=f"^events off the 128x128 sensor: .*{field} up to 128"):
        dvs.count_frames(events, 2)


def test_counts_encoding_resizes_to_48_keeping_the_mass():
    counts = dvs.count_frames(tonic_events(5000, np.random.default_rng(2)), 3)
    frames = dvs.encode(counts, 48, "counts")
    assert frames.shape == (3, 2, 48, 48) and frames.dtype == torch.float16
    torch.testing.assert_close(frames.float().mean((2, 3)), counts.mean((2, 3)), rtol=0.02, atol=0)


def test_counts_encoding_is_pils_antialiased_bilinear_resize_of_every_frame_and_polarity():
    # docs/data.md: resized to 48x48 by antialiased bilinear, the filter of the authors' PIL Resize. PIL resizes a
    # float ("F") image without rounding, so its output is the reference up to float16 storage.
    counts = dvs.count_frames(tonic_events(5000, np.random.default_rng(4)), 2)
    frames = dvs.encode(counts, 48, "counts").float()
    expected = torch.tensor(np.stack([[np.asarray(Image.fromarray(c.numpy()).resize((48, 48), Image.BILINEAR))
                                       for c in frame] for frame in counts]))
    torch.testing.assert_close(frames, expected, rtol=1e-3, atol=1e-3)


def test_authors_encoding_wraps_counts_and_zeroes_where_the_other_polarity_is_empty():
    counts = torch.zeros(1, 2, 128, 128)
    counts[0, 0, :, :64] = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(16).view(1, 64)
    counts[0, 1, :, :32] = 1  # polarity 1 active on the left quarter only
    frames = dvs.encode(counts, 64, "authors")
    assert frames.dtype == torch.uint8, "stored as the image ToTensor reads, so that k/255 is exact"
    frames = frames.float()
    # PIL halves each 2x2 block; polarity 0 there held counts (1, 2) or (3, 4): uint8 255, 254 | 253, 252.
    torch.testing.assert_close(frames[0, 0, 5, :16], torch.tensor([254.5, 252.5]).repeat(8), atol=1, rtol=0)
    # Output column 16 straddles input column 32, where polarity 1 stops.
    assert (frames[0, 0, :, 17:32] == 0).all(), "LA resize zeroes L wherever A is 0"
    assert (frames[0, 1, :, :15] == 255).all() and (frames[0, 1, :, 17:] == 0).all()


# --- split -----------------------------------------------------------------------------------------------------

def test_split_first_900_of_each_class_in_natural_number_order():
    rng = np.random.default_rng(3)
    names = [(f"/d/{c}/cifar10_{c}_{i}.aedat4", label) for label, c in enumerate(dvs.CLASSES) for i in range(1000)]
    names = [names[i] for i in rng.permutation(len(names))]
    paths, labels = zip(*names)
    train, test = dvs.split(list(paths), list(labels))
    assert (len(train), len(test)) == (9000, 1000)
    for label, c in enumerate(dvs.CLASSES):
        numbers = [int(Path(paths[i]).stem.split("_")[-1]) for i in train if labels[i] == label]
        assert numbers == list(range(900)), "natural order: 9 before 10"
        assert sorted(int(Path(paths[i]).stem.split("_")[-1]) for i in test if labels[i] == label) == list(range(900, 1000))


def test_split_on_the_fixture_through_tonic(dataset_root):
    ds = dvs.CIFAR10DVS(save_to=str(dataset_root))
    train, test = dvs.split(ds.data, ds.targets)
    assert (len(train), len(test)) == (900, 100)
    assert [ds.targets[i] for i in test] == [c for c in range(10) for _ in range(10)]
    assert [Path(ds.data[i]).name for i in test[:3]] == [f"cifar10_airplane_{i}.aedat4" for i in (90, 91, 92)]


def test_a_load_lists_the_recordings_once_and_as_tonic_does(dataset_root, monkeypatch):
    # Over a network mount every listing of the 10,000 recordings costs: the check, the cache key and the reading
    # share one. tonic's CIFAR10DVS, created per load, walked the folder twice more.
    top = str(dataset_root / "CIFAR10DVS")
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.fspath(path)) or real(path))
    dataset, train, test = dvs._recordings(config(dataset_root), 48)
    dvs.loaders(config(dataset_root), CPU, 48)
    assert listed.count(top) == 2, "once each"
    monkeypatch.setattr(os, "scandir", real)
    theirs = dvs.CIFAR10DVS(save_to=str(dataset_root))
    assert sorted(zip(dataset.data, dataset.targets)) == sorted(zip(theirs.data, theirs.targets))


# --- loaders -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [2, 5])
def test_loader_shapes_dtypes_and_labels_per_T(dataset_root, T):
    train, test = dvs.loaders(config(dataset_root, T=T), CPU, 48)
    assert (train.num_samples, test.num_samples, len(train), len(test)) == (900, 100, 15, 2)
    x, y = next(iter(train))
    assert x.shape == (64, T, 2, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = epoch(test)
    assert x.shape == (100, T, 2, 48, 48)
    assert y.tolist() == [c for c in range(10) for _ in range(10)], "test: class by class (tonic's label order)"


def test_a_test_sample_is_its_recording_converted_and_normalised(dataset_root):
    cfg = config(dataset_root)
    data = dvs.load_frames(cfg, 48)
    _, test = dvs.loaders(cfg, CPU, 48)
    x, _ = epoch(test)
    recording = dataset_root / "CIFAR10DVS" / "cat" / "cifar10_cat_93.aedat4"
    events = tonic.io.read_aedat4(str(recording))
    events.dtype.names = ["t", "x", "y", "p"]
    frames = dvs.encode(dvs.count_frames(events, 2), 48, "counts").float()
    expected = (frames - data.mean.view(2, 1, 1)) / data.std.view(2, 1, 1)
    torch.testing.assert_close(x[3 * 10 + 3], expected)


def test_normalisation_is_the_training_frames_statistics(dataset_root):
    data = dvs.load_frames(config(dataset_root), 48)
    per_polarity = data.train_x.float().transpose(0, 2).reshape(2, -1)
    torch.testing.assert_close(data.mean, per_polarity.mean(1))
    torch.testing.assert_close(data.std, per_polarity.std(1, correction=0), rtol=1e-4, atol=0)


def test_training_order_and_crops_replay_under_a_seed(dataset_root):
    def first_epoch(seed: int, n: int = 1):
        return epoch(dvs.loaders(config(dataset_root, seed=seed), CPU, 48)[0], n)

    xa, ya = first_epoch(0)
    xb, yb = first_epoch(0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first_epoch(1)[1], ya)
    assert not torch.equal(first_epoch(0, n=2)[1], ya)


def test_crop_switch(dataset_root):
    from ndot.data.loader import epoch_generator

    data = dvs.load_frames(config(dataset_root), 48)
    plain, _ = epoch(dvs.loaders(config(dataset_root, crop=False), CPU, 48)[0])
    order = torch.randperm(900, generator=epoch_generator(0, 1))
    expected = (data.train_x[order].float() - data.mean.view(2, 1, 1)) / data.std.view(2, 1, 1)
    torch.testing.assert_close(plain, expected)
    cropped, _ = epoch(dvs.loaders(config(dataset_root), CPU, 48)[0])
    assert cropped.shape == plain.shape and not torch.equal(cropped, plain)


def test_training_frames_are_zero_padded_by_4_and_cropped_at_one_offset_per_recording_before_normalising():
    n, T = 2000, 3
    mean, std = torch.tensor([0.5, 0.25]), torch.tensor([2.0, 4.0])
    out = dvs.FrameRecipe(True, mean, std)(torch.ones(n, T, 2, 12, 12, dtype=torch.float16), torch.Generator().manual_seed(0))
    raw = out * std.view(2, 1, 1) + mean.view(2, 1, 1)
    # The padding is a count of 0 (not a normalised 0), and every frame and polarity of a recording shares the crop.
    assert set(raw.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(raw, raw[:, :1, :1].expand_as(raw))
    top, left = crop_offsets(raw[:, 0, 0], dvs.PADDING)
    assert dvs.PADDING == 4
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9).float()
        assert len(counts) == 9 and uniform_enough(counts, torch.full_like(counts, n / 9))


def test_a_training_crop_is_a_window_of_the_zero_padded_frames_never_mirrored():
    # The recipe pads 4 and crops, with no flip (spec §5): every output is one 12x12 window of the padded
    # recording, the same for all its frames and polarities; an all-ones input could not show a mirror.
    x = torch.randint(1, 200, (40, 2, 2, 12, 12)).to(torch.float16)
    out = dvs.FrameRecipe(True, torch.zeros(2), torch.ones(2))(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4))
    offsets = set()
    for i in range(len(x)):
        found = [(top, left) for top in range(9) for left in range(9)
                 if torch.equal(out[i], padded[i, :, :, top:top + 12, left:left + 12])]
        assert len(found) == 1, f"recording {i} is no window of its padded frames"
        offsets.update(found)
    assert len(offsets) > 20, "the offsets vary between recordings"


# --- cache ----------------------------------------------------------------------------------------------------

@pytest.fixture
def private_cache(monkeypatch, tmp_path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NDOT_CACHE", str(cache))
    return cache / "cifar10dvs"


def conversions(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = dvs._convert

    def counting(dataset, *args):
        calls.append(dataset.transform.T)
        return real(dataset, *args)

    monkeypatch.setattr(dvs, "_convert", counting)
    return calls


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pt"))


def test_cache_is_reused_and_a_changed_T_never_reads_it(dataset_root, private_cache, monkeypatch):
    calls = conversions(monkeypatch)
    first = dvs.load_frames(config(dataset_root, T=2), 48)
    assert calls == [2, 2] and len(cache_files(private_cache)) == 1
    again = dvs.load_frames(config(dataset_root, T=2), 48)
    assert calls == [2, 2], "the second load reads the cache"
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    other = dvs.load_frames(config(dataset_root, T=3), 48)
    assert calls == [2, 2, 3, 3] and other.train_x.shape[1] == 3
    assert len(cache_files(private_cache)) == 2
    assert not list(private_cache.glob("*.tmp")), "no temporary file left behind"


def test_a_changed_size_or_encoding_never_reads_the_cache(dataset_root, private_cache, monkeypatch):
    calls = conversions(monkeypatch)
    dvs.load_frames(config(dataset_root), 48)
    smaller = dvs.load_frames(config(dataset_root), 32)
    authors = dvs.load_frames(config(dataset_root, dvs_encoding="authors"), 48)
    assert len(calls) == 6 and len(cache_files(private_cache)) == 3
    assert smaller.train_x.shape[-2:] == (32, 32) and authors.train_x.dtype == torch.uint8


def test_building_the_cache_leaves_torchs_generator_where_it_was(dataset_root, private_cache):
    # The trainer seeds it and then loads the data, and builds the weights from it after.
    for _ in range(2):  # the first builds the cache, the second reads it
        before = torch.get_rng_state()
        dvs.load_frames(config(dataset_root, T=1), 48)
        assert torch.equal(torch.get_rng_state(), before)
    assert len(cache_files(private_cache)) == 1


def test_the_run_that_builds_the_cache_trains_as_the_runs_that_read_it(dataset_root, private_cache):
    # Tune runs a sweep's trials one after another in a worker: the first of each T builds the frame cache,
    # the others read it. A run's results must not depend on which it was.
    cfg = config(dataset_root, arch="small_cnn", T=1, epochs=1, batch_size=128, device="cpu")
    states = []
    for _ in range(2):
        train(cfg, lambda m, s: states.append(s))
    assert len(cache_files(private_cache)) == 1
    built, read = states
    timing = {"epoch_seconds", "image_steps_per_s", "peak_mem_mb"}
    assert {k: v for k, v in built["metrics"].items() if k not in timing} == \
        {k: v for k, v in read["metrics"].items() if k not in timing}
    assert all(torch.equal(built["model"][k], read["model"][k]) for k in built["model"])


def test_cache_follows_the_recordings(dataset_root, private_cache, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_root / "CIFAR10DVS", copy / "CIFAR10DVS")
    calls = conversions(monkeypatch)
    dvs.load_frames(config(copy), 48)
    events = fixtures.recording_events(1234, np.random.default_rng(9))
    fixtures.write_recording(copy / "CIFAR10DVS" / "dog" / "cifar10_dog_5.aedat4", events)
    dvs.load_frames(config(copy), 48)
    assert len(calls) == 4 and len(cache_files(private_cache)) == 2


def test_unreadable_cache_is_rebuilt(dataset_root, private_cache, monkeypatch):
    dvs.load_frames(config(dataset_root), 48)
    (path,) = private_cache.glob("*.pt")
    path.write_bytes(b"not a cache")
    calls = conversions(monkeypatch)
    frames = dvs.load_frames(config(dataset_root), 48)
    assert len(calls) == 2 and frames.train_x.shape == (900, 2, 2, 48, 48)
    assert path.stat().st_size > 1000


def test_failed_cache_write_leaves_nothing(dataset_root, private_cache, monkeypatch):
    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        dvs.load_frames(config(dataset_root), 48)
    assert not cache_files(private_cache) and not list(private_cache.glob("*.tmp"))


def test_unwritable_cache_folder_is_one_error(dataset_root, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NDOT_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError, match="NDOT_CACHE"):
        dvs.load_frames(config(dataset_root), 48)


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_a_cache_folder_that_cannot_be_created_is_refused_before_any_work(dataset_root, tmp_path, monkeypatch, capsys, command):
    # A regular file where the folder's parent should be: creating it fails for root too, as a read-only mount would.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NDOT_CACHE", str(blocker / "cache"))
    out = tmp_path / "out"
    flags = ["--dataset", "cifar10dvs", "--data-root", str(dataset_root), "--T", "2"]
    if command == "sweep":
        monkeypatch.setattr(runner, "connect", lambda address: pytest.fail("the sweep started Ray"))
        rc = exit_status(cli.main, TIMESTEPS, [*flags, "--storage", str(out)])
    else:
        rc = exit_status(train_main, [*flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot create" in err and "$NDOT_CACHE" in err, err
    assert not out.exists()


def test_a_read_only_cache_that_holds_the_frames_serves(dataset_root, shared_cache, monkeypatch):
    dvs.load_frames(config(dataset_root), 48)  # cached, in the module's cache
    monkeypatch.setattr(storage, "writable_folder", lambda *args: pytest.fail("a cache hit needs no writable folder"))
    dvs.check(config(dataset_root))


def test_a_cache_folder_without_write_permission_is_one_error(tmp_path, monkeypatch):
    # As root (this machine) every folder is writable, so the permission is faked: a read-only cache
    # mount is refused in one line naming the remedy, not with the lock file's PermissionError.
    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=f"cannot write the CIFAR10-DVS frame cache in {tmp_path}; set .NDOT_CACHE"):
        storage.writable_folder(tmp_path, "the CIFAR10-DVS frame cache", "set $NDOT_CACHE to a writable folder")


def test_a_polarity_without_events_normalises_to_zero_not_to_nan():
    # Its std is 0: dividing by it would feed the network NaN (0/0) in every frame.
    x = torch.zeros(3, 2, 2, 4, 4, dtype=torch.float16)
    x[:, :, 0] = torch.arange(3 * 2 * 16, dtype=torch.float16).view(3, 2, 4, 4)
    mean, std = dvs._channel_stats(x)
    assert std[1] == 1.0 and mean[1] == 0.0 and std[0] > 0
    frames = dvs.FrameRecipe(False, mean, std)(x, torch.Generator())
    assert torch.isfinite(frames).all() and (frames[:, :, 1] == 0).all()


def test_conversion_in_worker_processes_matches(dataset_root, private_cache):
    inline = dvs.load_frames(config(dataset_root), 48)
    shutil.rmtree(private_cache)
    workers = dvs.load_frames(config(dataset_root, workers=2), 48)
    assert torch.equal(inline.train_x, workers.train_x) and torch.equal(inline.test_y, workers.test_y)


def test_authors_encoding_end_to_end_is_their_torchvision_chain(dataset_root):
    _, test = dvs.loaders(config(dataset_root, dvs_encoding="authors"), CPU, 48)
    x, _ = epoch(test)
    recording = dataset_root / "CIFAR10DVS" / "cat" / "cifar10_cat_93.aedat4"
    events = tonic.io.read_aedat4(str(recording))
    events.dtype.names = ["t", "x", "y", "p"]
    # Their transforms, per frame: ToPILImage, Resize(48), ToTensor, Normalize (spec §5).
    mean, std = dvs.AUTHORS_NORMALISATION
    expected = torch.stack([TF.normalize(TF.to_tensor(TF.resize(TF.to_pil_image(f), [48, 48])), mean, std)
                            for f in dvs.count_frames(events, 2)])
    assert torch.equal(x[3 * 10 + 3], expected)
    # Spec §5, per polarity channel; read from the module above, so pinned here.
    assert dvs.AUTHORS_NORMALISATION == ((0.2728, 0.1295), (0.2225, 0.1290))


# --- errors ------------------------------------------------------------------------------------------------

def test_missing_dataset_names_folder_and_remedy(tmp_path):
    with pytest.raises(DataError) as err:
        dvs.check(config(tmp_path))
    message = one_line(err)
    for part in (str(tmp_path / "CIFAR10DVS"), "airplane", ".aedat4", "--download", "download=True", dvs.CIFAR10DVS.url):
        assert part in message


def test_half_present_dataset_names_each_short_class(tmp_path, monkeypatch):
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    (folder / "cat" / "cifar10_cat_1.aedat4").unlink()
    shutil.rmtree(folder / "dog")
    with pytest.raises(DataError) as err:
        dvs.loaders(config(tmp_path), CPU, 48)
    message = one_line(err)
    assert "cat has 2 of 3 recordings" in message and "dog has 0 of 3 recordings" in message
    assert "airplane" not in message and str(folder) in message


def test_a_recording_outside_the_class_folders_is_refused_before_any_work(tmp_path, monkeypatch):
    # tonic would fail on it in listing the recordings, with a KeyError of the folder's name.
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    (folder / "extra").mkdir()
    shutil.copy(folder / "cat" / "cifar10_cat_1.aedat4", folder / "extra" / "cifar10_cat_1.aedat4")
    with pytest.raises(DataError) as err:
        dvs.check(config(tmp_path))
    assert "1 recordings outside its class folders" in one_line(err) and "(extra/cifar10_cat_1.aedat4)" in one_line(err)


def test_macos_appledouble_files_are_no_recordings(tmp_path, monkeypatch, private_cache):
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    # Beside the recording (a tar or a copy made on macOS) and under __MACOSX/ (a zip made there): its metadata.
    for name in ("cat/._cifar10_cat_1.aedat4", "__MACOSX/cat/._cifar10_cat_1.aedat4"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    dvs.check(config(tmp_path))
    assert len(dvs.load_frames(config(tmp_path), 48).train_y) == 30


def test_recordings_unpacked_without_tonics_zip_are_read_not_downloaded(tmp_path, monkeypatch, private_cache):
    # tonic's CIFAR10DVS, which ndot creates only to download, would fetch the whole data set again without its zip.
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    monkeypatch.setattr(dvs.CIFAR10DVS, "url", f"http://127.0.0.1:{closed_port()}/CIFAR10DVS.zip")
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    (folder / dvs.CIFAR10DVS.filename).unlink()
    dvs.check(config(tmp_path))
    dvs.check(config(tmp_path, download=True))
    assert len(dvs.load_frames(config(tmp_path), 48).train_y) == 30


def test_failed_download_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dvs.CIFAR10DVS, "url", f"http://127.0.0.1:{closed_port()}/CIFAR10DVS.zip")
    with pytest.raises(DataError) as err:
        dvs.check(config(tmp_path, download=True))
    message = one_line(err)
    assert "downloading cifar10dvs" in message and "refused" in message


def test_the_archive_put_in_the_folder_is_unpacked_by_download_and_read(tmp_path, monkeypatch, private_cache):
    # The route a refusal names where no network reaches: CIFAR10DVS.zip (a zip of one zip per class) put in the
    # folder, --download unpacks it; the recordings then found are those the load reads.
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    staged = fixtures.write_cifar10dvs(tmp_path / "staged", per_class=3, events=50)
    archive = tmp_path / "root" / "CIFAR10DVS" / dvs.CIFAR10DVS.filename
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as outer:
        for name in dvs.CLASSES:
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as z:
                for path in (staged / name).iterdir():
                    z.write(path, f"{name}/{path.name}")
            outer.writestr(f"{name}.zip", inner.getvalue())
    monkeypatch.setattr(dvs.CIFAR10DVS, "file_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    dvs.check(config(tmp_path / "root", download=True))
    assert len(dvs.load_frames(config(tmp_path / "root"), 48).train_y) == 30


@pytest.fixture
def cut_short(dataset_root, tmp_path) -> Path:
    """A copy of the fixture with a training and a test recording cut in half, as an interrupted unzip leaves them."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset_root / "CIFAR10DVS", copy / "CIFAR10DVS")
    for name in ("truck/cifar10_truck_7.aedat4", "cat/cifar10_cat_95.aedat4"):
        path = copy / "CIFAR10DVS" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


@pytest.mark.parametrize("workers", [0, 2])
def test_recordings_cut_short_are_one_error_naming_each_and_nothing_is_cached(cut_short, private_cache, workers):
    cfg = config(cut_short, workers=workers)
    dvs.check(cfg)  # a file cut short passes the count; reading it is the test
    with pytest.raises(DataError) as err:
        dvs.loaders(cfg, CPU, 48)
    message = one_line(err)
    assert "2 cifar10dvs recordings" in message and "--download" in message
    assert "truck/cifar10_truck_7.aedat4" in message and "cat/cifar10_cat_95.aedat4" in message
    assert not cache_files(private_cache)


def test_the_train_command_refuses_recordings_cut_short_in_one_line(cut_short, private_cache, tmp_path, capsys):
    argv = ["--dataset", "cifar10dvs", "--data_root", str(cut_short), "--workers", "0", "--out", str(tmp_path / "run")]
    assert train_main(argv) == 2
    # Found only in converting them: after the line that says the conversion began, one error line.
    converting, error = capsys.readouterr().err.strip().splitlines()
    assert converting.startswith("cifar10dvs: converting") and error.startswith("error: ") and "cannot be read" in error


def test_the_evaluate_command_refuses_recordings_cut_short_in_one_line(dataset_root, cut_short, private_cache, tmp_path,
                                                                       capsys):
    # Weights trained on the whole recordings, evaluated on the copy whose recordings an unzip cut short.
    run = tmp_path / "run"
    argv = ["--dataset", "cifar10dvs", "--arch", "small_cnn", "--T", "2", "--epochs", "1", "--batch_size", "64",
            "--workers", "0", "--device", "cpu"]
    assert train_main([*argv, "--data_root", str(dataset_root), "--out", str(run)]) == 0
    capsys.readouterr()
    assert evaluate_main([str(run), "--data_root", str(cut_short)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "cannot be read" in error and "cifar10_truck_7.aedat4" in error, error


def test_a_recording_without_events_is_named_as_such_not_sent_to_download(cut_short, private_cache):
    # A sound AEDAT4 file whose event stream is empty is no damaged download: the line says what it holds,
    # apart from the recordings cut short, which a download does repair.
    fixtures.write_recording(cut_short / "CIFAR10DVS" / "dog" / "cifar10_dog_2.aedat4",
                             fixtures.recording_events(0, np.random.default_rng(0)))
    with pytest.raises(DataError) as err:
        dvs.loaders(config(cut_short), CPU, 48)
    message = one_line(err)
    cannot_read, no_events = message.split("; 1 cifar10dvs recordings")
    assert cannot_read.startswith("2 cifar10dvs recordings") and "--download" in cannot_read
    assert "dog/cifar10_dog_2.aedat4" not in cannot_read
    assert no_events.startswith(f" in {cut_short / 'CIFAR10DVS'} hold no events")
    assert "dog/cifar10_dog_2.aedat4" in no_events and "--download" not in no_events
    assert not cache_files(private_cache)


def test_a_recording_of_another_sensor_is_one_error_naming_it_and_nothing_is_cached(tmp_path, monkeypatch,
                                                                                    private_cache):
    # A DAVIS346's events: counted as they were, x = 200 on row y would have landed at x = 72 on row y + 1.
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    events = fixtures.recording_events(50, np.random.default_rng(0))
    events["x"][-1], events["y"][-1] = 200, 7
    fixtures.write_recording(folder / "dog" / "cifar10_dog_2.aedat4", events, dimensions=(346, 260))
    with pytest.raises(DataError) as err:
        dvs.loaders(config(tmp_path), CPU, 48)
    assert "1 cifar10dvs recordings" in one_line(err)
    assert "dog/cifar10_dog_2.aedat4 (events off the 128x128 sensor: x up to 200," in one_line(err)
    assert not cache_files(private_cache)


def test_an_empty_recording_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 3)
    folder = fixtures.write_cifar10dvs(tmp_path, per_class=3, events=50)
    (folder / "dog" / "cifar10_dog_2.aedat4").write_bytes(b"")
    with pytest.raises(DataError) as err:
        dvs.check(config(tmp_path))
    assert "1 recordings are empty (dog/cifar10_dog_2.aedat4)" in one_line(err)


def test_the_trainer_runs_on_the_fixture(dataset_root):
    """Event frames [B, T, 2, 48, 48] through a whole epoch of online training and evaluation."""
    seen = []
    result = train(config(dataset_root, arch="small_cnn", rule="ndot", mode="O", epochs=1, device="cpu"),
                   lambda m, s: seen.append(m))
    assert result.status == "completed" and [m["epoch"] for m in seen] == [1]
    assert 0 <= seen[0]["test_acc"] <= 1 and 0 < seen[0]["firing_rate"] < 1


def test_a_conversion_says_what_it_builds_and_how_far_it_is(dataset_root, private_cache, monkeypatch, caplog):
    monkeypatch.setattr("ndot.cli.PROGRESS_S", 0.0)
    caplog.set_level(logging.INFO, logger="ndot")
    dvs.load_frames(config(dataset_root), 48)
    lines = caplog.messages
    assert lines[0].startswith("cifar10dvs: converting 1000 recordings into 2 frames each, once, into ")
    # At PROGRESS_S 0 a line before each recording, counted over both splits (the test split's from 900, not 0).
    assert lines[1:] == [f"cifar10dvs: {k}/1000 recordings converted" for k in range(1000)]
    caplog.clear()
    dvs.load_frames(config(dataset_root), 48)
    assert caplog.messages == [], "a cache hit is silent"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_conversion_stopped_by_a_signal_to_its_process_group_ends_in_one_line_and_leaves_no_cache(dataset_root, tmp_path,
                                                                                                     stop):
    # A terminal's Ctrl-C and a batch scheduler's SIGTERM reach the loader's workers too, which printed tracebacks of
    # their own (or made the main process print torch's "DataLoader worker ... is killed by signal") under the line.
    script = textwrap.dedent(f"""
        from pathlib import Path
        import ndot.cli
        from ndot.cli import run, show_progress
        from ndot.data import dvs
        ndot.cli.PROGRESS_S = 0.0  # a line before each recording: the first says the workers are running
        dataset = dvs.CIFAR10DVS(save_to={str(dataset_root)!r}, transform=dvs.EventFrames(2, 48, "counts"))
        show_progress()
        run(lambda: dvs.frames(dataset, *dvs.split(dataset.data, dataset.targets), Path({str(tmp_path)!r}), workers=2) and 0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stderr.readline()
    assert first.startswith("cifar10dvs: converting 1000 recordings"), first + proc.stderr.read()
    assert proc.stderr.readline() == "cifar10dvs: 0/1000 recordings converted\n"
    os.killpg(proc.pid, stop)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + stop, err
    lines = err.splitlines()
    assert lines[-1] == f"interrupted ({stop.name})" and all(line.endswith(" recordings converted") for line in lines[:-1]), err
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("*.lock")], "a cache, or half of one"


def test_a_process_waiting_for_another_to_build_the_cache_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ndot")
    lock = tmp_path / "x.lock"
    with open(lock, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process building it (flock: another open file description)
        def wait() -> None:
            with storage.file_lock(lock, waiting="waiting for x"):
                pass

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for x" not in caplog.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.monotonic() < deadline, "no line while waiting"
        fcntl.flock(holder, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert not waiter.is_alive()


def _alive(pid: int) -> bool:
    # Alive while any of its threads is: a killed worker's main thread can be a zombie already while its queue's
    # feeder thread, on its way out, still holds the files they share (the cache's lock).
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(_thread_alive(task) for task in tasks)


def _thread_alive(task: Path) -> bool:
    try:  # a zombie or dead thread has let go of its files: its parent (init, or a subreaper) may not have reaped it
        return (task / "stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the system ends a worker with its main process on Linux")
def test_a_cache_builder_killed_with_sigkill_leaves_no_worker_and_lets_the_next_one_build_it(dataset_root, tmp_path):
    # Its DataLoader workers, stuck on their full queue, outlived it for good, and with them their copy of the
    # cache's lock, which they inherited: the next builder waited for ever.
    script = textwrap.dedent(f"""
        import logging, time
        from pathlib import Path
        import ndot.cli
        from ndot.cli import show_progress
        from ndot.data import dvs
        ndot.cli.PROGRESS_S = 0.0
        dataset = dvs.CIFAR10DVS(save_to={str(dataset_root)!r}, transform=dvs.EventFrames(2, 48, "counts"))
        show_progress()
        # It stays on its first batch once it printed it: going on, it was soon past the first split (other workers,
        # or none, or a cache being written) while the test, under load, had not yet listed its workers or killed it.
        class Hold(logging.Handler):
            def emit(self, record):
                if record.getMessage().endswith(" recordings converted"):
                    time.sleep(600)
        logging.getLogger("ndot").addHandler(Hold())
        dvs.frames(dataset, *dvs.split(dataset.data, dataset.targets), Path({str(tmp_path)!r}), workers=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        assert proc.stderr.readline().startswith("cifar10dvs: converting 1000 recordings"), proc.stderr.read()
        assert proc.stderr.readline() == "cifar10dvs: 0/1000 recordings converted\n"  # from its workers' first batch
        workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir() for pid in (task / "children").read_text().split()]
        assert len(workers) == 2
        time.sleep(1)  # its workers fill their queue, which nothing reads any more
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=HANG_S)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)):
            assert time.monotonic() < deadline, "its workers outlived it"
            time.sleep(0.1)
    finally:
        proc.kill()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    (lock,) = tmp_path.glob("*.lock")
    assert [p.name for p in tmp_path.iterdir()] == [lock.name], "a cache, or half of one"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go: no BlockingIOError
    dataset = dvs.CIFAR10DVS(save_to=str(dataset_root), transform=dvs.EventFrames(2, 48, "counts"))
    built = dvs.frames(dataset, *dvs.split(dataset.data, dataset.targets), tmp_path)
    assert built.train_x.shape == (900, 2, 2, 48, 48) and len(list(tmp_path.glob("*.pt"))) == 1


def test_a_cache_builder_killed_in_mid_write_leaves_no_file_behind_once_the_cache_is_built(dataset_root, tmp_path):
    # The half-written temporary file stayed beside the cache for good: hundreds of MB of it at the paper's T.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ndot import files
        from ndot.data import dvs
        real = files._Landing.write
        def write(self, b):
            n = real(self, b)
            self.flush()
            print("writing", flush=True)
            time.sleep(600)
        files._Landing.write = write
        dataset = dvs.CIFAR10DVS(save_to={str(dataset_root)!r}, transform=dvs.EventFrames(2, 48, "counts"))
        dvs.frames(dataset, *dvs.split(dataset.data, dataset.targets), Path({str(tmp_path)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.wait(timeout=HANG_S)
    (half,) = tmp_path.glob(".*.tmp")
    assert half.stat().st_size > 0
    dataset = dvs.CIFAR10DVS(save_to=str(dataset_root), transform=dvs.EventFrames(2, 48, "counts"))
    dvs.frames(dataset, *dvs.split(dataset.data, dataset.targets), tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".pt"]


def test_configs_read_the_same_frames_where_their_dataset_root_download_T_and_encoding_are_the_same():
    # What a sweep checks and caches once for every stratum that reads it (ndot.data.key).
    cfg = TrainConfig(dataset="cifar10dvs", data_root="/d", T=2)
    same = [dataclasses.replace(cfg, **change) for change in ({"lr": 0.5}, {"rule": "ottt"}, {"arch": "vgg11_ws"})]
    other = [dataclasses.replace(cfg, **change) for change in ({"T": 3}, {"dvs_encoding": "authors"}, {"data_root": "/e"},
                                                              {"download": True}, {"dataset": "cifar10"})]
    assert {key(c) for c in same} == {key(cfg)} and len({key(c) for c in [cfg, *other]}) == 6
