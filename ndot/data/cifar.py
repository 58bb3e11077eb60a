"""CIFAR-10 and CIFAR-100 from torchvision's files, with the paper's recipe (spec §5).

Files: `<data root>/cifar-10-batches-py/` and `<data root>/cifar-100-python/`,
exactly as torchvision unpacks its archives; `download=True` fetches them.

Training inputs: RandomCrop(32, padding 4), horizontal flip, AutoAugment
(CIFAR-10 policy), Cutout one 16x16 hole (zeros, before normalisation),
Normalize; each step switchable (cfg.crop, cfg.flip, cfg.autoaugment,
cfg.cutout). Test inputs: Normalize only. Two pipelines produce them:

- "device": the uint8 dataset lives on the training device and every step runs
  there per batch (ndot.data.augment), AutoAugment included.
- "cpu": torchvision transforms on PIL images in DataLoader workers.

loader="auto" takes "device" everywhere: on a CPU-only machine too, one core
of it outruns the PIL pipeline on several (python -m ndot.bench.data).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from ndot.data import DataError, DatasetInfo, augment, storage
from ndot.data.loader import DeviceLoader, Loader, WorkerLoader

if TYPE_CHECKING:
    from ndot.config import TrainConfig

INFO = {
    "cifar10": DatasetInfo(num_classes=10, in_channels=3, image_size=32),
    "cifar100": DatasetInfo(num_classes=100, in_channels=3, image_size=32),
}
_CLASSES: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
SIZE, PADDING, HOLE = 32, 4, 16

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N, 32, 32, 3], int64 labels [N]


def _expected_files(cls: type[CIFAR10]) -> list[tuple[str, str]]:
    return [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def _problem(name: str, cfg: "TrainConfig") -> str | None:
    """What is wrong with the files on disk, in words, or None."""
    cls = _CLASSES[name]
    root = storage.data_root(cfg)
    folder = root / cls.base_folder
    missing = [f for f, _ in _expected_files(cls) if not (folder / f).is_file()]
    damaged = [f for f, md5 in _expected_files(cls) if f not in missing and not check_integrity(str(folder / f), md5)]
    if not missing and not damaged:
        return None
    found = []
    if missing:
        found.append(f"missing {', '.join(missing)}")
    if damaged:
        found.append(f"{', '.join(damaged)} failing the md5 check")
    return (f"{name} is incomplete in {folder}: {'; '.join(found)}; pass --download (download=True) to fetch {cls.url}, "
            f"or unpack that archive into {root} yourself")


def check(cfg: "TrainConfig") -> None:
    problem = _problem(cfg.dataset, cfg)
    if problem is None:
        return
    if not cfg.download:
        raise DataError(problem)
    cls = _CLASSES[cfg.dataset]
    root = storage.data_root(cfg)
    # The archive itself, not cls(download=True): torchvision's download returns at once where the
    # data batches pass their md5, and its constructor then fails on a missing or damaged meta file.
    storage.download(
        lambda: download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5),
        what=cfg.dataset, folder=root, present=lambda: _problem(cfg.dataset, cfg) is None,
        manual=f"download {cls.url} on a machine with network access and unpack it into {root}",
    )
    problem = _problem(cfg.dataset, cfg)
    if problem is not None:
        raise DataError(problem)


def read(cfg: "TrainConfig", train: bool) -> Split:
    ds = _CLASSES[cfg.dataset](root=str(storage.data_root(cfg)), train=train, download=False)
    return ds.data, np.asarray(ds.targets, dtype=np.int64)


def loaders(cfg: "TrainConfig", device: torch.device, input_size: int) -> tuple[Loader, Loader]:
    if input_size != SIZE:
        raise ValueError(f"{cfg.dataset} images are {SIZE}x{SIZE}; the recipe has no resize to {input_size}")
    check(cfg)
    return build(cfg, device, read(cfg, True), read(cfg, False))


def pipeline(cfg: "TrainConfig") -> str:
    return "device" if cfg.loader == "auto" else cfg.loader


def build(cfg: "TrainConfig", device: torch.device, train: Split, test: Split) -> tuple[Loader, Loader]:
    """(train, test) loaders over images already in memory, through the pipeline cfg selects."""
    mean, std = NORMALISATION[cfg.dataset]
    if pipeline(cfg) == "cpu":
        def make(split: Split, is_train: bool) -> Loader:
            return WorkerLoader(_Images(*split), cpu_transform(cfg, mean, std, is_train), cfg.batch_size,
                                shuffle=is_train, seed=cfg.seed, workers=cfg.workers, device=device)
    else:
        def make(split: Split, is_train: bool) -> Loader:
            x = torch.from_numpy(split[0]).to(device).permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(split[1]).to(device)
            return DeviceLoader(x, y, cfg.batch_size, shuffle=is_train, seed=cfg.seed,
                                prepare=DeviceRecipe(cfg, mean, std, is_train, device))
    return make(train, True), make(test, False)


class _Images(Dataset):
    """uint8 HWC images as PIL images, as torchvision's CIFAR datasets return them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def cpu_transform(cfg: "TrainConfig", mean: tuple[float, ...], std: tuple[float, ...], train: bool) -> T.Compose:
    """The recipe as torchvision transforms on one PIL image (the authors' order)."""
    steps: list[Any] = []
    if train and cfg.crop:
        steps.append(T.RandomCrop(SIZE, padding=PADDING))
    if train and cfg.flip:
        steps.append(T.RandomHorizontalFlip())
    if train and cfg.autoaugment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    steps.append(T.ToTensor())
    if train and cfg.cutout:
        steps.append(augment.Cutout(HOLE))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


class DeviceRecipe:
    """The recipe for a uint8 batch [B, 3, 32, 32] on its device, in the order of cpu_transform."""

    def __init__(self, cfg: "TrainConfig", mean: tuple[float, ...], std: tuple[float, ...], train: bool,
                 device: torch.device) -> None:
        self.crop, self.flip, self.cutout = train and cfg.crop, train and cfg.flip, train and cfg.cutout
        self.autoaugment = augment.BatchAutoAugment((SIZE, SIZE)) if train and cfg.autoaugment else None
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop:
            x = augment.random_crop(x, PADDING, generator)
        if self.flip:
            x = augment.random_flip(x, generator)
        if self.autoaugment is not None:
            x = self.autoaugment(x, generator)
        if self.cutout:
            x = augment.random_cutout(x, HOLE, generator)
        return augment.normalise(x, self.mean, self.std)
