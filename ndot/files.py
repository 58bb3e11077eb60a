"""Whole files at a local path or a URI (s3://bucket/key, gs://...), through pyarrow's filesystems,
and local files written atomically."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import shutil
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs


# Google's client retries a failed GCS request for 15 minutes by default, so that missing
# credentials, or no network, looked like a hang at the sweep's first write: each request of
# ndot's own reads and writes gives up after this many seconds, with the client's error. (Offline,
# the sweep's check of --storage, a few requests, then fails in under a minute.)
GCS_RETRY_S = 10.0


# What reading or writing storage can raise. pyarrow raises an OSError or a ValueError where its
# error maps to one, and a bare ArrowException where not: a GCS client's "permanent error" (no
# credentials file where GOOGLE_APPLICATION_CREDENTIALS points) is one.
STORAGE_ERRORS = (OSError, ValueError, pa.ArrowException)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path within it."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.GcsFileSystem):
        _, (options,) = fs.__reduce__()  # the URI's own options, which GcsFileSystem takes back
        fs = pafs.GcsFileSystem(**{**options, "retry_time_limit": timedelta(seconds=GCS_RETRY_S)})
    return fs, path


# What a URI's path may hold unescaped besides letters, digits and "-._~" (RFC 3986's pchar, which pyarrow
# parses): a trial's folder, "<id>_T=4,ndot_A", stays as it reads. A space or a non-ASCII letter does not,
# and pyarrow refuses a URI that holds one ("Cannot parse URI").
_URI_SAFE = "!$&'()*+,;=:@"


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of `filesystem`: a local path as it is, else `scheme://path`, escaped where the URI syntax needs it.

    Tune hands over paths as pyarrow parsed them out of the URI, unescaped: s3://bucket/my%20sweeps is
    the path "bucket/my sweeps", which put back as it is makes no URI.
    """
    local = isinstance(fs, pafs.LocalFileSystem) or isinstance(getattr(fs, "handler", None), WholeLocalFiles)
    return path if local else f"{fs.type_name}://{quote(path, safe='/' + _URI_SAFE)}"


def join(folder: str, name: str) -> str:
    """The entry `name` of `folder`: a local path joined as it is, a URI's escaped where the URI syntax needs it."""
    return f"{folder.rstrip('/')}/{quote(name, safe=_URI_SAFE) if '://' in folder else name}"


# How a filesystem without hard links refuses one.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class _Landing(io.BufferedWriter):
    """A file written under a temporary name beside its path, synced, and renamed over it once closed whole.

    Discarded instead, leaving the old file: when a write, the flush or the rename failed (a full
    disk, a folder in the way), when it is dropped unclosed (as pyarrow drops a stream whose copy
    failed), or when a `with` block on it raises.
    """

    def __init__(self, path: str, new: bool = False) -> None:
        self._path = path
        self._new = new  # published only where no file is at the path yet (FileExistsError)
        self._tmp = str(PurePosixPath(path).with_name(f".{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp"))
        self._failed = False
        # "x": a new file, created as any other (the umask decides its mode).
        super().__init__(io.FileIO(self._tmp, "xb"))

    def write(self, b: Any) -> int:
        try:
            return super().write(b)
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        if self._failed:
            self._discard()
            return
        try:
            self.flush()
            os.fsync(self.fileno())
            super().close()
            if self._new:
                try:
                    os.link(self._tmp, self._path)  # a hard link, unlike a rename, fails on a file already there
                except OSError as e:
                    if e.errno not in _NO_HARD_LINKS:  # a file already there, or a real failure (a full disk)
                        raise
                    # A filesystem without hard links (FAT, some FUSE mounts): claim the path, then fill it.
                    os.close(os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os.replace(self._tmp, self._path)
                else:
                    os.unlink(self._tmp)
            else:
                os.replace(self._tmp, self._path)
        except BaseException:
            # A full disk found only at the flush, or a path no file can replace (a folder): the old stays.
            self._discard()
            raise
        # The rename is an entry of the folder: synced too, or a machine that loses power may forget it.
        folder = os.open(os.path.dirname(self._path) or ".", os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def _discard(self) -> None:
        self.raw.close()
        os.unlink(self._tmp)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._discard()

    def __del__(self) -> None:
        # IOBase's finaliser would close, and so publish, a file nobody finished.
        try:
            unfinished = not self.closed
        except ValueError:  # the temporary file could not be created: nothing to discard
            return
        if unfinished:
            self._discard()


class WholeLocalFiles(pafs.FileSystemHandler):
    """The local filesystem, through which every file written lands whole (`PyFileSystem(WholeLocalFiles())`).

    Ray Tune uploads the driver's state and the trials' checkpoints to a filesystem with plain copies
    (pyarrow's copy_files): a process killed during one leaves the file cut short, and a cut-short
    experiment state is a sweep Tune cannot resume. Written through this handler, each file is
    written to a temporary name, synced and renamed over its path: a kill leaves the old file or
    none, and a stray `.NAME.*.tmp` beside it. Everything else is pyarrow's LocalFileSystem.
    """

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeLocalFiles)

    def get_type_name(self) -> str:
        return "ndot-whole-local"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._fs.delete_root_dir_contents()

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._fs.open_input_stream(src) as f, _Landing(dest) as out:
            shutil.copyfileobj(f, out)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_Landing(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._fs.open_append_stream(path)


def tune_filesystem(storage: str) -> pafs.FileSystem | None:
    """The filesystem Ray Tune should write `storage` through: a local path's lands every file whole;
    None (Tune's own) for a URI, whose object stores land an upload whole or not at all."""
    return None if "://" in storage else pafs.PyFileSystem(WholeLocalFiles())


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (temporary file, then move): a reader sees the old or the new file."""
    if "://" not in uri:
        write_local(uri, lambda f: f.write(data))
        return
    fs, path = filesystem(uri)
    parent = PurePosixPath(path).parent
    fs.create_dir(str(parent), recursive=True)
    tmp = str(parent / f".{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(*STORAGE_ERRORS):
            fs.delete_file(tmp)
        raise


def write_new(uri: str, data: bytes) -> None:
    """Write a whole file where there is none yet; FileExistsError, the file there left alone, where there is one.

    Of two processes that write the same local path at once, one gets the error. An object store has no
    "create if absent" that pyarrow reaches: two writes there within the moment of a look-up can both land.
    """
    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with _Landing(uri, new=True) as f:
            f.write(data)
        return
    if kind(uri) != pafs.FileType.NotFound:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), uri)
    write_bytes(uri, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.readall()


def kind(uri: str) -> pafs.FileType:
    """File, Directory or NotFound."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type


def check_writable(folder: str) -> None:
    """Raise now, not after hours of work, when nothing can be written in `folder` (created if missing): OSError,
    or for a URI any of STORAGE_ERRORS."""
    probe = join(folder, ".ndot-write-probe")
    write_bytes(probe, b"")
    fs, path = filesystem(probe)
    fs.delete_file(path)


class Held(Exception):
    """Another process holds the lock; the message names it (its pid, host and start)."""


@contextlib.contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold the file `path` (created with its folder) for this process while the block runs; Held naming the
    holder where another process holds it.

    The lock is the system's (flock), which lets it go when its holder ends, killed too: nothing stale blocks
    the next claim. Over NFS the server holds the lock for every client.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise Held(f.read().strip() or "starting") from None
        # Who holds it, for the refusal of another (the lock itself is the kernel's).
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield


def write_local(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary file beside `path`, synced to disk, then renamed over it.

    A reader, or a run killed at any moment, sees the old file or the whole new one, never half
    of one; the sync makes that hold after a machine crash too, which a rename alone does not.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _Landing(os.fspath(path)) as f:
        write(f)
