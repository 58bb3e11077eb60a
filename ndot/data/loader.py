"""Loaders: a whole dataset on the training device batched there, or a map-style dataset through CPU workers.

Shuffling and augmentation draw from generators seeded by (seed, epoch), so an
epoch's batches are the same whether or not the run was resumed in between.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing import forkserver, resource_tracker
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ndot.cli import handle, signal_handlers_kept


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) * 100_003 + int(epoch))
    return g


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. From host memory to a GPU through pinned memory, without waiting: a copy from
    pageable memory waits for the GPU to finish all it was given (the last batch's steps) before it
    starts, so the GPU would idle while the host gathers and copies every batch. The host allocator
    keeps the pinned block until the copy has read it."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_PR_SET_PDEATHSIG = 1
_STOPS = (signal.SIGINT, signal.SIGTERM)
# Windows has no signal masks (nor process groups to signal).
_MASKS = hasattr(signal, "pthread_sigmask")


def stops_left_to_the_main_process(worker_id: int) -> None:
    """A DataLoader's worker_init_fn: Ctrl-C and SIGTERM, which a terminal and a batch scheduler send every process
    of the group, are ignored by its workers, and the main process, stopping, ends them.

    A worker they reached died printing a traceback of its own (multiprocessing's resource sharer), or told the
    main process so, which printed torch's "DataLoader worker ... is killed by signal: Terminated": both under
    the command's one line. A worker still ends with the main process, however that ends: torch's watchdog
    looks between batches only, and a main process killed (SIGKILL) while its workers' queue was full left them
    stuck on it for good, holding the locks they inherited (a cache's, a run folder's), for which the next
    process waited for ever or was refused. So on Linux the system kills a worker as its main process ends.
    """
    for signum in _STOPS:
        signal.signal(signum, signal.SIG_IGN)
    if _MASKS:  # ignored now, they may reach it: `started` had them blocked since the worker was born
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def started(loader: DataLoader) -> Iterator[Any]:
    """iter(loader), its workers started with Ctrl-C and SIGTERM held, which the process acts on once it holds them.

    Started by "spawn" (macOS's default), a worker imports torch and the dataset's modules before its worker_init_fn
    (stops_left_to_the_main_process) ignores them: a Ctrl-C in those seconds printed its traceback, or made the main
    process print torch's "DataLoader worker ... is killed by signal". Blocked in the thread that starts the workers,
    they are blocked in the workers too (the mask outlives exec) until these ignore them. And the main process, stopped
    while it handed a later worker its dataset (seconds, under "spawn" and "forkserver"), dropped the half-built
    iterator, and at exit waited for ever for the workers already started, which ignore SIGTERM.
    """
    if loader.num_workers == 0 or not _MASKS:
        return iter(loader)
    # The servers that starting workers starts, started first: under the mask below, the resource tracker (all but
    # "fork") would unblock the two as it started, and the forkserver keep them blocked in all it forks for others.
    method = multiprocessing.get_start_method()
    if method != "fork":
        resource_tracker.ensure_running()
    if method == "forkserver":
        forkserver.ensure_running()
    caught: list[int] = []
    try:
        with signal_handlers_kept(*_STOPS):
            for signum in _STOPS:
                handle(signum, lambda signum, frame: caught.append(signum))
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
            try:
                return iter(loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # runs the handler above for what arrived meanwhile
    finally:
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # to the handler the process had: the iterator, built, ends its workers


def worker_ended(e: BaseException) -> str | None:
    """One line for torch's error at a loader worker that ended under it (killed: on a laptop, most often by the
    system's out-of-memory killer, as each worker holds a copy of the dataset's pipeline); None for other errors."""
    # torch's words, "DataLoader worker (pid 123) is killed by signal: Killed." (from C++) or "DataLoader worker
    # (pid(s) 123) exited unexpectedly", are all that tells this error from any other RuntimeError.
    said = str(e).splitlines()[0].strip() if isinstance(e, RuntimeError) else ""
    if not said.startswith("DataLoader worker (pid"):
        return None
    return f"a data loader worker ended ({said})"


def num_batches(samples: int, batch_size: int) -> int:
    """Every sample once per epoch: the last batch holds the remainder."""
    return -(-samples // batch_size)


class DeviceLoader:
    """Batches of (x, y) from whole-dataset tensors, normally already on the training device.

    x holds raw samples (uint8 images or float frames); `prepare` turns a batch
    into the float input the model sees (dtype cast, augmentation, normalisation).
    `device` is where batches are delivered and prepared, by default x's device;
    a different one keeps the dataset in host memory and moves each batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        prepare: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prepare = prepare
        # Resolved ("cuda" -> "cuda:0") so that the comparison with x.device in __iter__ is exact.
        self.device = torch.empty(0, device=device).device if device is not None else x.device
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        home = self.x.device
        g = epoch_generator(self.seed, self.epoch, home)
        # One stream where possible: two generators seeded alike on one device would draw the same numbers.
        g_prepare = g if self.device == home else epoch_generator(self.seed, self.epoch, self.device)
        order = torch.randperm(self.num_samples, generator=g, device=home) if self.shuffle else None
        for i in range(len(self)):
            idx: slice | torch.Tensor = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            x, y = _moved(self.x[idx], self.device), _moved(self.y[idx], self.device)
            if self.prepare is not None:
                x = self.prepare(x, g_prepare)
            yield x, y


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """An independent torch seed for one sample of one epoch."""
    # Shifted as a Python int: NumPy 1.x promotes uint64 and an int to float64, which has no >>.
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0]) >> 1


class _SeededTransform(Dataset):
    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        sample, label = self.dataset[index]
        # With workers=0 this runs in the training process, whose RNG must not move. The CPU generator
        # alone is saved and seeded: torch.random.fork_rng + torch.manual_seed take ~100x longer.
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed(sample_seed(self.seed, self.epoch, index))
        try:
            return self.transform(sample), label
        finally:
            rng.set_state(state)


class WorkerLoader:
    """Batches from a map-style dataset of (sample, label), transformed on CPU workers, delivered on `device`.

    `transform` draws from torch's global RNG (torchvision transforms do); it is
    seeded per sample from (seed, epoch, index), so batches depend neither on the
    number of workers nor on which worker ran which sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        workers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self._data = _SeededTransform(dataset, transform, seed)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.workers = workers
        self.device = torch.device(device)

    @property
    def num_samples(self) -> int:
        return len(self._data)

    @property
    def epoch(self) -> int:
        return self._data.epoch

    def set_epoch(self, epoch: int) -> None:
        # Workers are started per epoch (no persistent workers), so they see this value.
        self._data.epoch = epoch

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            self._data,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=epoch_generator(self.seed, self.epoch),
            num_workers=self.workers,
            worker_init_fn=stops_left_to_the_main_process,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in started(loader):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# What a dataset's `loaders` return: both iterate (x, y) batches and know their num_samples.
Loader = DeviceLoader | WorkerLoader
