"""Where datasets and caches live on disk, and the few safe ways ndot writes there.

Data root: `cfg.data_root`, else `$NDOT_DATA`, else `~/data`. Caches derived from
the data (DVS frames) go to `$NDOT_CACHE`, else `<data root>/ndot-cache`, so that
a read-only shared dataset mount can keep its caches elsewhere.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sys
import tarfile
import urllib.error
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from ndot.cli import Pace
from ndot.data import DataError

if TYPE_CHECKING:
    from ndot.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/data"
# Applies to every blocking socket operation (connect, each read), not to the
# whole transfer: a slow download finishes, a stalled one fails.
DOWNLOAD_TIMEOUT_S = 60.0


def data_root(cfg: "TrainConfig") -> Path:
    root = cfg.data_root or os.environ.get("NDOT_DATA") or DEFAULT_ROOT
    return Path(root).expanduser()


def root_origin(cfg: "TrainConfig") -> str:
    """What named the data root, in a clause for a message about the data there: the setting that moves it."""
    if cfg.data_root:
        return "the data root is data_root's (--data-root)"
    if os.environ.get("NDOT_DATA"):
        return "the data root is $NDOT_DATA's; --data-root (data_root) overrides it"
    return f"the data root is {DEFAULT_ROOT}, the default; --data-root (data_root) or $NDOT_DATA name another"


def saved_root_origin(saved_in: str, moved_by: str = "--data-root overrides it") -> str:
    """root_origin of a data_root that a run's saved config holds (a checkpoint, a sweep's plan), not the caller's."""
    return f"the data root is the data_root saved in {saved_in}; {moved_by}"


def cache_root(cfg: "TrainConfig") -> Path:
    env = os.environ.get("NDOT_CACHE")
    return Path(env).expanduser() if env else data_root(cfg) / "ndot-cache"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision and tonic call urlopen without a timeout; the process-wide
    # default is the only way to bound them.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return f"no data for {DOWNLOAD_TIMEOUT_S:g} s (timed out)"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _PacedBars:
    """stderr for a library's download (torchvision's, tonic's) where it is no terminal: their tqdm bar redraws
    itself after a '\r' ten times a second, in a log a line each, thousands in a slow download. This passes on
    what ends in '\n' (the bar's last state, any other line), and of the redrawn states one per PROGRESS_S."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.pace, self.state = out, Pace(), ""

    def write(self, text: str) -> int:
        for piece in re.split(r"(?<=[\r\n])", text):
            self.state += piece
            if self.state.endswith("\n"):
                self.out.write(self.state)
                self.state = ""
            elif self.state.endswith("\r"):
                redrawn, self.state = self.state[:-1], ""
                if redrawn.strip() and self.pace.due():
                    self.out.write(redrawn + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def download(fetch: Callable[[], object], *, what: str, folder: Path, manual: str, present: Callable[[], bool]) -> None:
    """Run `fetch` (a library's download) with a socket timeout, unless `present()`; any failure becomes one DataError line.

    One caller at a time per folder: the trials of a sweep that start together on a
    node would otherwise each download into the same files. The others wait, then
    find the data present.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / f".{what}-download.lock", waiting=f"waiting for another process downloading {what} into {folder}"):
            if present():
                return
            # The library's bar stays in this process's log; a sweep's driver shows its trials' "ndot" lines
            # (ndot.sweep.trainable.Reporter), and said "starting" all through a download without this one.
            log.info(f"downloading {what} into {folder}")
            with _socket_timeout(DOWNLOAD_TIMEOUT_S), \
                    contextlib.redirect_stderr(sys.stderr if sys.stderr.isatty() else _PacedBars(sys.stderr)):
                fetch()
    except (OSError, RuntimeError, EOFError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(f"downloading {what} into {folder} failed: {_reason(exc)}; {manual}") from exc


def writable_folder(folder: Path, what: str, remedy: str) -> None:
    """Create `folder` if needed; DataError if `what` cannot be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {folder} for {what}: {exc.strerror or exc}; {remedy}") from exc
    if not os.access(folder, os.W_OK):
        raise DataError(f"cannot write {what} in {folder}; {remedy}")


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent trials build a cache once instead of each building it.

    `waiting` is logged (INFO) when another process holds the lock: the wait can take minutes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info(waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
