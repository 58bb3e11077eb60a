"""Datasets by name.

Every dataset module exposes `INFO` (a DatasetInfo, or a dict of them by name where one module
serves several, as ndot.data.cifar does), `check(cfg)` which raises
DataError with one line when the data is missing (before any work starts), and
`loaders(cfg, device, input_size)` returning (train, test) loaders; `ndot.data.loaders(cfg, device)`
picks input_size. A module that caches what it derives from its files also exposes `prepare(cfg, workers)`,
which builds that cache where its loaders read it. A loader yields (x, y) on `device`: x is [B, C, H, W] for static
images (the same input at every time step) or [B, T, C, H, W] for event frames;
it has `set_epoch`, `__len__` and `num_samples`. A dataset of the user's, outside the package, is added with
`register` from a module named in TrainConfig.imports.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Callable

import torch

from ndot.config import ConfigError, importing

if TYPE_CHECKING:
    from ndot.config import TrainConfig
    from ndot.data.loader import Loader


class DataError(RuntimeError):
    """Data that is missing or unreadable; the message says what to do, in one line."""


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    # Native side length; None where the model's preferred size is used instead.
    image_size: int | None
    # Whether it is read from the data folder (data_root), and so whether a download applies.
    in_data_root: bool = True
    # The TrainConfig fields besides dataset, data_root and download that its data depend on (event frames: T).
    depends_on: tuple[str, ...] = ()


# name -> module under ndot.data, imported on first use so that a run on
# digits never imports tonic; or what `register` added, which reads as such a module.
DATASETS: dict[str, str | SimpleNamespace] = {
    "digits": "digits",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "cifar10dvs": "dvs",
}
# ndot's own, known in every process; the others are known where the module that registered them was imported.
BUILT_IN_DATASETS = frozenset(DATASETS)
# The others' name -> the modules whose import registered it (ndot.config.importing).
REGISTERED_BY: dict[str, tuple[str, ...]] = {}


def register(name: str, loaders: Callable[["TrainConfig", torch.device, int], tuple[Loader, Loader]], info: DatasetInfo,
             check: Callable[["TrainConfig"], None] | None = None,
             prepare: Callable[["TrainConfig", int], None] | None = None) -> None:
    """Add dataset `name` to DATASETS, with the functions a module under ndot.data has (above).

    `loaders(cfg, device, input_size)` returns (train, test) loaders, e.g. two ndot.data.loader.DeviceLoader
    over x [N, C, H, W] (or [N, T, C, H, W], frames) on `device` and labels y [N], class indices in
    [0, info.num_classes): C is info.in_channels, H = W info.image_size, or `input_size` (the architecture's)
    where that is None. Every process that runs the config calls it (a sweep's trials, a resume, ndot.evaluate):
    its data and split must come out the same in each. The train loader shuffles by cfg.seed and the epoch
    of set_epoch, as DeviceLoader(..., shuffle=True, seed=cfg.seed) does: a resumed run sees the same batches.
    Optional: `check(cfg)` raises DataError, one line, where the data is missing, before any work;
    `prepare(cfg, workers)` builds what the loaders cache (a sweep's driver runs it before its trials start, once
    for each distinct ndot.data.key: a cache that depends on more than dataset, data_root and download names those
    fields in info.depends_on, e.g. ("T",), or ("arch",) for data cached at the architecture's input_size).
    Files are read under ndot.data.storage.data_root(cfg), with info.in_data_root.

    Registered from a module of its own, named in TrainConfig.imports (--imports, --set imports=...), it is
    known in every process that runs the config, a sweep's trials too. ConfigError (a ValueError, one line on the
    command line) where `name` is taken by another dataset: the name is what tables and checkpoints go by.
    """
    entry = SimpleNamespace(INFO=info, loaders=loaders, check=check or _nothing_to_check, prepare=prepare)
    if DATASETS.get(name, entry) != entry:
        raise ConfigError(f"dataset {name!r} is registered already, by {origin(name)}")
    DATASETS[name] = entry
    REGISTERED_BY[name] = importing()


def _nothing_to_check(cfg: "TrainConfig") -> None:
    """A registered dataset's check where it has none: its data is made, or ships with its module."""


def origin(name: str) -> str:
    """The name of the module that defines dataset `name` (one of DATASETS)."""
    entry = DATASETS[name]
    return f"ndot.data.{entry}" if isinstance(entry, str) else entry.loaders.__module__


def _module(name: str) -> ModuleType | SimpleNamespace:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    entry = DATASETS[name]
    return importlib.import_module(origin(name)) if isinstance(entry, str) else entry


def info(name: str) -> DatasetInfo:
    mod = _module(name)
    return mod.INFO[name] if isinstance(mod.INFO, dict) else mod.INFO


def check(cfg: "TrainConfig", root_origin: str | None = None) -> None:
    """DataError, one line, where cfg's data is missing or unreadable, before any work starts. The line says
    what named the data root: `root_origin` where the caller knows it better than cfg does (a data_root saved
    in a checkpoint, which $NDOT_DATA cannot move), else ndot.data.storage.root_origin."""
    from ndot.data import storage

    module = _module(cfg.dataset)
    try:
        module.check(cfg)
    except DataError as e:
        if not info(cfg.dataset).in_data_root:
            raise
        raise DataError(f"{e}; {root_origin or storage.root_origin(cfg)}") from e.__cause__


def key(cfg: "TrainConfig") -> tuple:
    """What cfg's data depend on: configs alike in it read the same data, which one check or prepare covers."""
    return tuple(getattr(cfg, name) for name in ("dataset", "data_root", "download", *info(cfg.dataset).depends_on))


def prepare(cfg: "TrainConfig", workers: int) -> None:
    """Build, with `workers` processes, what cfg's dataset caches of its files (CIFAR10-DVS frames) where its
    loaders read it; nothing for a dataset that caches nothing. cfg's data must have passed `check`."""
    build = getattr(_module(cfg.dataset), "prepare", None)
    if build is not None:
        build(cfg, workers)


def loaders(cfg: "TrainConfig", device: torch.device) -> tuple[Loader, Loader]:
    """(train, test) loaders of cfg's dataset, sized for cfg's architecture where the data has no native size."""
    from ndot.models import ARCHS

    input_size = info(cfg.dataset).image_size or ARCHS[cfg.arch].input_size
    return _module(cfg.dataset).loaders(cfg, device, input_size)
