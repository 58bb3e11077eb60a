"""CIFAR10-DVS (Li et al., 2017) through tonic, as T event frames per recording (spec §5).

Files: `<data root>/CIFAR10DVS/<class>/*.aedat4`, 1000 recordings per class, as
tonic unpacks them. tonic's CIFAR10DVS downloads the whole dataset again when
created where its `CIFAR10DVS.zip` is absent: ndot creates one only to download
missing recordings (`_checked`), and reads through `_Listed`, which downloads
nothing, so the unpacked recordings serve without the zip.

Frames: a recording's events, in time order, are cut into T bins of equal event
count (event i of n goes to bin floor(i*T/n): sizes differ by at most one and no
event is dropped; tonic's ToFrame(n_event_bins=T) drops the last n mod T
events and accumulates with np.add.at, which is slower; the authors' SpikingJelly
bins give the last bin those n mod T events, docs/data.md), counted per polarity and
pixel into [T, 2, 128, 128] (channel = tonic's polarity p, 0 then 1) and
resized to size x size. Encodings (cfg.dvs_encoding):

- "counts" (default): the counts resized bilinearly with antialiasing (the
  filter of the authors' PIL Resize), normalised per polarity with the mean and
  std of the training frames, computed when the cache is built; they depend on
  T, since a bin holds 1/T of the events.
- "authors": the authors' chain, through the same torchvision/PIL calls:
  ToPILImage on the counts (x255 into uint8, so counts wrap: 1 -> 255,
  2 -> 254, ...; two channels make an LA image), PIL resize (which zeroes L
  wherever A is 0), ToTensor; normalised with their constants (spec §5).
  Stored as the uint8 image ToTensor reads, so its k/255 is exact (float16 is
  off by up to 2.4e-4 there) in half the memory.

Split: in each class, recordings in the natural order of the number in their
file name, the first 90% train and the rest test (900 / 100 per class).
Training augmentation: zero-pad 4 and crop back at a random offset, the same for
all frames of a sample (cfg.crop); no flip.

Cache: conversion reads and bins every event (milliseconds per recording,
minutes for the data set), so the frames of both splits are stored once per
(T, size, encoding, recordings) in one file under `<cache root>/cifar10dvs/`,
named by all four; a changed T or data set reads another file. Written
atomically under a lock, so concurrent trials build it once. No library version
is in the key: "counts" resizes with torch, and the PIL resize of "authors"
gave the same bytes under Pillow 9.5, 11.0 and 13.0 (its 8-bit resampling is
integer arithmetic); an upgrade would rebuild it for nothing, and split a
shared cache between nodes whose frames are alike.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aedat
import numpy as np
import torch
import torchvision.transforms.functional as TF
from tonic.datasets import CIFAR10DVS
from torch.utils.data import DataLoader, Dataset

from ndot import files
from ndot.cli import Pace
from ndot.config import DVS_ENCODINGS
from ndot.data import DataError, DatasetInfo, augment, storage
from ndot.data.loader import DeviceLoader, started, stops_left_to_the_main_process

if TYPE_CHECKING:
    from ndot.config import TrainConfig

log = logging.getLogger(__name__)

INFO = DatasetInfo(num_classes=10, in_channels=2, image_size=48, depends_on=("T", "dvs_encoding"))
CLASSES = tuple(sorted(CIFAR10DVS.classes, key=CIFAR10DVS.classes.__getitem__))
SENSOR_SIZE: tuple[int, int, int] = CIFAR10DVS.sensor_size  # (W, H, polarities)
RECORDINGS_PER_CLASS = 1000
TRAIN_FRACTION = 0.9
PADDING = 4
AUTHORS_NORMALISATION = ((0.2728, 0.1295), (0.2225, 0.1290))
CACHE_FORMAT = 2
CACHE_WHAT, CACHE_REMEDY = "the CIFAR10-DVS frame cache", "set $NDOT_CACHE to a writable folder"
# How each encoding stores its frames (module docstring).
FRAME_DTYPES = {"counts": torch.float16, "authors": torch.uint8}


def location(cfg: "TrainConfig") -> Path:
    # tonic keeps a dataset in <save_to>/<class name>.
    return storage.data_root(cfg) / CIFAR10DVS.__name__


def _listed(items: list[str], sep: str = "; ") -> str:
    """The first three of `items`, and an ellipsis where there are more: a line stays a line."""
    return sep.join(items[:3]) + (f"{sep}…" if len(items) > 3 else "")


def _listing(folder: Path) -> list[Path]:
    """The recordings under `folder`, sorted: one walk, which the check, the cache key and the reading share (over a
    network mount each walk of the 10,000 files costs; tonic's CIFAR10DVS walks the folder twice more on creation).

    A copy made on macOS (a zip, a tar, a copy to a FAT or network disk) holds an AppleDouble file of each one's
    metadata, `._<name>`, beside it or under `__MACOSX/<class>/`: no recording, though tonic lists and labels it."""
    return sorted(Path(path, name) for path, _, names in os.walk(folder) for name in names
                  if name.endswith(".aedat4") and not name.startswith("._"))


def _problem(folder: Path, recordings: list[Path]) -> str | None:
    """What is wrong with the files on disk, `recordings` the listing of `folder`, in words, or None."""
    have = Counter(p.parent.name for p in recordings)
    if not have:
        return (f"cifar10dvs is not in {folder}: expected folders {', '.join(CLASSES)} with "
                f"{RECORDINGS_PER_CLASS} .aedat4 recordings each; pass "
                f"--download (download=True) to fetch {CIFAR10DVS.url}, or point the data root at a folder holding CIFAR10DVS/")
    wrong = [f"{c} has {have[c]} of {RECORDINGS_PER_CLASS} recordings" for c in CLASSES if have[c] != RECORDINGS_PER_CLASS]
    # Empty files, what an unpacking that never began writing leaves; those cut short later are found reading them.
    empty = [str(p.relative_to(folder)) for p in recordings if p.stat().st_size == 0]
    if empty:
        wrong.append(f"{len(empty)} recordings are empty ({_listed(empty, ', ')})")
    if wrong:
        return (f"cifar10dvs is incomplete in {folder}: {'; '.join(wrong)}; delete that folder and pass --download (download=True), "
                f"or unpack {CIFAR10DVS.url} there again")
    # tonic labels a recording by the name of its folder and fails on any other name (KeyError).
    strays = [str(p.relative_to(folder)) for p in recordings if p.parent.name not in CLASSES]
    if strays:
        return (f"cifar10dvs in {folder} holds {len(strays)} recordings outside its class folders, which tonic labels "
                f"by their folder's name ({_listed(strays, ', ')}); move them out of {folder}")
    return None


def _checked(cfg: "TrainConfig") -> list[Path]:
    """cfg's recordings, listed once, downloaded first where cfg asks; DataError where they are not all there."""
    folder = location(cfg)
    recordings = _listing(folder)
    problem = _problem(folder, recordings)
    if problem is not None and cfg.download:
        root = storage.data_root(cfg)
        storage.download(
            lambda: CIFAR10DVS(save_to=str(root)),
            what="cifar10dvs", folder=folder, present=lambda: _problem(folder, _listing(folder)) is None,
            manual=f"download {CIFAR10DVS.url} ({CIFAR10DVS.filename}) on a machine with network access, "
                   f"put it in {folder} and pass --download again to unpack it",
        )
        recordings = _listing(folder)
        problem = _problem(folder, recordings)
    if problem is not None:
        raise DataError(problem)
    return recordings


def check(cfg: "TrainConfig") -> None:
    # Frames not cached yet are written into the cache: checked here, as the trials of a sweep would each
    # fail on a folder that cannot be created only once Ray runs them. A read-only cache that holds them serves.
    dataset, train, test = _recordings(cfg, INFO.image_size)
    cache_dir = _cache_dir(cfg)
    if not _cache_path(cache_dir, _cache_key(dataset, train, test)).is_file():
        storage.writable_folder(cache_dir, CACHE_WHAT, CACHE_REMEDY)


def _number(path: str) -> int:
    digits = re.findall(r"\d+", Path(path).stem)
    if not digits:
        raise DataError(f"cannot order recording {path}: its name holds no recording number")
    return int(digits[-1])


def split(paths: list[str], labels: list[int]) -> tuple[list[int], list[int]]:
    """Indices (train, test): per class, ordered by recording number, the first TRAIN_FRACTION train."""
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        members = sorted((i for i, lab in enumerate(labels) if lab == label), key=lambda i: _number(paths[i]))
        cut = round(TRAIN_FRACTION * len(members))
        train += members[:cut]
        test += members[cut:]
    return train, test


def count_frames(events: np.ndarray, T: int) -> torch.Tensor:
    """Events (fields x, y, p, in time order) -> float32 counts [T, polarities, H, W] over T equal-count bins."""
    w, h, polarities = SENSOR_SIZE
    n = len(events)
    # Through the flat index, an event off the sensor (a damaged recording, another sensor's) would count in another
    # pixel, polarity or bin, or make the counts too long; tonic's ToFrame fails on it too (IndexError).
    if n and (events["x"].max() >= w or events["y"].max() >= h):
        raise DataError(f"events off the {w}x{h} sensor: x up to {events['x'].max()}, y up to {events['y'].max()}")
    bins = np.arange(n, dtype=np.int64) * T // max(n, 1)
    flat = ((bins * polarities + events["p"].astype(np.int64)) * h + events["y"]) * w + events["x"]
    counts = np.bincount(flat, minlength=T * polarities * h * w).reshape(T, polarities, h, w)
    return torch.from_numpy(counts.astype(np.float32))


def encode(counts: torch.Tensor, size: int, encoding: str) -> torch.Tensor:
    """Counts [T, 2, H, W] -> frames [T, 2, size, size] in `encoding`, as FRAME_DTYPES stores them (module docstring)."""
    if encoding == "counts":
        return TF.resize(counts, [size, size], antialias=True).to(FRAME_DTYPES[encoding])
    if encoding == "authors":
        return torch.stack([TF.pil_to_tensor(TF.resize(TF.to_pil_image(f), [size, size])) for f in counts])
    raise ValueError(f"unknown DVS encoding {encoding!r}; valid: {', '.join(DVS_ENCODINGS)}")


class EventFrames:
    """tonic transform: one recording's events -> frames [T, 2, size, size] (`encode`)."""

    def __init__(self, T: int, size: int, encoding: str) -> None:
        self.T, self.size, self.encoding = T, size, encoding

    def __call__(self, events: np.ndarray) -> torch.Tensor:
        return encode(count_frames(events, self.T), self.size, self.encoding)


@dataclass
class Frames:
    train_x: torch.Tensor  # [N, T, 2, size, size], FRAME_DTYPES of the encoding
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # float32 [2], per polarity over the training frames
    std: torch.Tensor


# The fault of a sound AEDAT4 file without events: a download would not change it, so it is told apart.
NO_EVENTS = "no events"


def _fault(path: str) -> str | None:
    """What is wrong with the file of a recording tonic failed to read, in words, or None where the file is sound."""
    try:
        decoder = aedat.Decoder(path)
        # tonic reads the events stream of the lowest id only.
        first = min((i for i, s in decoder.id_to_stream().items() if s["type"] == "events"), default=None)
        events = sum(len(p["events"]) for p in decoder if p["stream_id"] == first)
    except (RuntimeError, OSError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return NO_EVENTS if events == 0 else None


class _Readings(Dataset):
    """(frames, label, None) of each recording, or (None, None, its file's fault) where it cannot be read.

    The frames are an array, which a worker pickles into its queue: a tensor goes as a file descriptor, handed over
    by a server thread in the worker, and a Ctrl-C or SIGTERM that stopped the main process in mid-handover made
    the worker print a traceback (ConnectionResetError) under the command's one line.
    """

    def __init__(self, dataset: CIFAR10DVS, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[np.ndarray | None, int | None, str | None]:
        try:
            frames, label = self.dataset[self.indices[k]]
        except DataError as e:  # the file was read, and its events are wrong (count_frames)
            return None, None, str(e)
        # tonic's words depend on where reading stopped (a file cut short by an interrupted unzip: "failed to fill
        # whole buffer"; one without events: numpy's "need at least one array to concatenate", or a bare
        # Exception): the file itself says what is wrong with it, and a failure on a sound file is not its fault.
        except Exception:
            fault = _fault(self.dataset.data[self.indices[k]])
            if fault is None:
                raise
            return None, None, fault
        return frames.numpy(), label, None


def _convert(dataset: CIFAR10DVS, indices: list[int], workers: int,
             counted: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """The frames and labels of the recordings `indices`, and each one that cannot be read, by name, with its fault:
    read to the end, so that one message can list what to repair (in a worker, the first would end the loader).

    `counted` is (recordings converted before these, all to convert): the progress lines count the whole cache,
    not each split from 0, which read as a conversion gone back to the start."""
    t = dataset.transform
    x = torch.empty(len(indices), t.T, 2, t.size, t.size, dtype=FRAME_DTYPES[t.encoding])
    y = torch.empty(len(indices), dtype=torch.long)
    faults = {}
    # A generator of its own: a DataLoader draws its workers' base seed from the one it is given, else from
    # torch's global generator, which the trainer has seeded for the weights it builds next. Moved only where
    # the cache is built, it gave the run that built it other weights than every run that read it.
    batches = DataLoader(_Readings(dataset, indices), batch_size=32, num_workers=workers, collate_fn=list,
                         generator=torch.Generator(), worker_init_fn=stops_left_to_the_main_process)
    pace = Pace()
    for k, (frames, label, fault) in enumerate(item for batch in started(batches) for item in batch):
        # The 10,000 recordings take minutes: a line every ndot.cli.PROGRESS_S keeps the wait visible.
        if pace.due():
            log.info(f"cifar10dvs: {counted[0] + k}/{counted[1]} recordings converted")
        if fault is None:
            x[k], y[k] = torch.from_numpy(frames), label
        else:
            faults[str(Path(dataset.data[indices[k]]).relative_to(dataset.location_on_system))] = fault
    return x, y, faults


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per polarity of frames as the model reads them (uint8 as k/255, like ToTensor)."""
    unit = 255.0 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(2, dtype=torch.float64)
    squares = torch.zeros(2, dtype=torch.float64)
    for chunk in x.split(256):
        c = chunk.double() / unit
        total += c.sum((0, 1, 3, 4))
        squares += c.square().sum((0, 1, 3, 4))
    n = x.numel() // 2
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=0).sqrt()
    return mean.float(), torch.where(std > 0, std, 1.0).float()


def _cache_key(dataset: CIFAR10DVS, train: list[int], test: list[int]) -> dict[str, object]:
    t = dataset.transform
    root = Path(dataset.location_on_system)

    def describe(indices: list[int]) -> list[tuple[str, int, int]]:
        return [(str(Path(dataset.data[i]).relative_to(root)), Path(dataset.data[i]).stat().st_size,
                 dataset.targets[i]) for i in indices]

    listing = json.dumps([describe(train), describe(test)]).encode()
    return {"format": CACHE_FORMAT, "T": t.T, "size": t.size, "encoding": t.encoding,
            "recordings": hashlib.sha256(listing).hexdigest()[:16]}


def _load(path: Path, key: dict[str, object]) -> Frames | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None  # unreadable: rebuilt and replaced below
    if payload.get("key") != key:
        return None
    return Frames(**payload["frames"])


def _faults_line(faults: dict[str, str], folder: str) -> str:
    """One line naming each faulty recording (name -> fault), grouped by what repairs it."""
    unreadable = [f"{name} ({fault})" for name, fault in faults.items() if fault != NO_EVENTS]
    eventless = [name for name, fault in faults.items() if fault == NO_EVENTS]
    parts = []
    if unreadable:
        parts.append(f"{len(unreadable)} cifar10dvs recordings in {folder} cannot be read: {_listed(unreadable)}; "
                     f"delete that folder and pass --download (download=True), or unpack {CIFAR10DVS.url} there again")
    if eventless:
        parts.append(f"{len(eventless)} cifar10dvs recordings in {folder} hold no events (sound AEDAT4 files whose "
                     f"event stream is empty, so there is nothing to cut into T frames): {_listed(eventless)}; "
                     f"replace each with a copy that holds events (from {CIFAR10DVS.url})")
    return "; ".join(parts)


def frames(dataset: CIFAR10DVS, train: list[int], test: list[int], cache_dir: Path, workers: int = 0) -> Frames:
    """The frames of both splits, from the cache when it holds them, else converted and cached.

    `dataset` carries an EventFrames transform, whose (T, size, encoding) key the cache with the recordings.
    """
    key = _cache_key(dataset, train, test)
    path = _cache_path(cache_dir, key)
    # Complete files only ever appear (atomic rename): a hit needs no lock, and a read-only cache serves.
    cached = _load(path, key)
    if cached is not None:
        return cached
    storage.writable_folder(cache_dir, CACHE_WHAT, CACHE_REMEDY)
    with storage.file_lock(path.with_name(path.name + ".lock"), waiting=f"cifar10dvs: waiting for another process to build {path}"):
        cached = _load(path, key)  # another process may have built it while this one waited
        if cached is not None:
            return cached
        # What a builder killed in mid-write left (files.write_local's temporary file, up to the whole cache's size,
        # hundreds of MB): the lock's holder alone writes one, so none is another's still being written.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        log.info(f"cifar10dvs: converting {len(train) + len(test)} recordings into {key['T']} frames each, "
                 f"once, into {path}")
        train_x, train_y, faults = _convert(dataset, train, workers, (0, len(train) + len(test)))
        test_x, test_y, test_faults = _convert(dataset, test, workers, (len(train), len(train) + len(test)))
        faults.update(test_faults)
        if faults:
            raise DataError(_faults_line(faults, dataset.location_on_system))
        built = Frames(train_x, train_y, test_x, test_y, *_channel_stats(train_x))
        files.write_local(path, lambda f: torch.save({"key": key, "frames": vars(built)}, f))
        return built


def _cache_dir(cfg: "TrainConfig") -> Path:
    return storage.cache_root(cfg) / "cifar10dvs"


def _cache_path(cache_dir: Path, key: dict[str, object]) -> Path:
    return cache_dir / f"cifar10dvs-T{key['T']}-{key['size']}px-{key['encoding']}-{key['recordings']}.pt"


class _Listed(CIFAR10DVS):
    """tonic's CIFAR10DVS, which reads and labels them, over the recordings `_listing` found: tonic's own creation
    walks the folder twice more, and downloads the whole data set where it finds fewer than 1000 recordings."""

    def __init__(self, folder: Path, recordings: list[Path], transform: EventFrames) -> None:
        self.location_on_system = str(folder)
        self.transform, self.target_transform, self.transforms = transform, None, None
        self.data = [str(p) for p in recordings]
        self.targets = [self.classes[p.parent.name] for p in recordings]  # tonic's label: the folder's name


def _recordings(cfg: "TrainConfig", size: int) -> tuple[CIFAR10DVS, list[int], list[int]]:
    """The dataset of cfg's recordings (checked: DataError), converting to cfg's frames at `size`, and its
    (train, test) indices."""
    dataset = _Listed(location(cfg), _checked(cfg), EventFrames(cfg.T, size, cfg.dvs_encoding))
    return dataset, *split(dataset.data, dataset.targets)


def load_frames(cfg: "TrainConfig", size: int) -> Frames:
    dataset, train, test = _recordings(cfg, size)
    return frames(dataset, train, test, _cache_dir(cfg), cfg.workers)


def prepare(cfg: "TrainConfig", workers: int) -> None:
    """Cache cfg's frames, at the size its loaders read, where they read them."""
    dataset, train, test = _recordings(cfg, INFO.image_size)
    frames(dataset, train, test, _cache_dir(cfg), workers)


class FrameRecipe:
    """Stored frames [B, T, 2, S, S] -> float32, optionally pad-and-crop (one offset per sample), normalised."""

    def __init__(self, crop: bool, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.crop = crop
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop:
            # Before conversion: zero padding is 0 in either stored form, and fewer bytes move.
            x = augment.random_crop(x, PADDING, generator)
        if x.dtype == torch.uint8:
            return augment.normalise(x, self.mean, self.std)  # ToTensor's k/255, then Normalize
        return (x.float() - self.mean) / self.std


def loaders(cfg: "TrainConfig", device: torch.device, input_size: int) -> tuple[DeviceLoader, DeviceLoader]:
    data = load_frames(cfg, input_size)  # which checks the recordings
    if cfg.dvs_encoding == "authors":
        mean, std = (torch.tensor(v) for v in AUTHORS_NORMALISATION)
    else:
        mean, std = data.mean, data.std
    # "cpu" keeps the frames in host memory (N*T*2*S*S values, FRAME_DTYPES) and moves each batch.
    home = torch.device("cpu") if cfg.loader == "cpu" else device
    mean, std = mean.to(device), std.to(device)

    def make(x: torch.Tensor, y: torch.Tensor, train: bool) -> DeviceLoader:
        return DeviceLoader(x.to(home), y.to(home), cfg.batch_size, shuffle=train, seed=cfg.seed,
                            prepare=FrameRecipe(train and cfg.crop, mean, std), device=device)

    return make(data.train_x, data.train_y, True), make(data.test_x, data.test_y, False)
