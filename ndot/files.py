"""Whole files at a local path or a URI (s3://bucket/key, gs://...), through pyarrow's filesystems,
and local files written atomically."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path within it."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (temporary file, then move): a reader sees the old or the new file."""
    fs, path = filesystem(uri)
    parent = PurePosixPath(path).parent
    fs.create_dir(str(parent), recursive=True)
    tmp = str(parent / f".{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.readall()


def kind(uri: str) -> pafs.FileType:
    """File, Directory or NotFound."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type


def check_writable(folder: str) -> None:
    """Raise OSError now, not after hours of work, when nothing can be written in `folder` (created if missing)."""
    probe = f"{folder.rstrip('/')}/.ndot-write-probe"
    write_bytes(probe, b"")
    fs, path = filesystem(probe)
    fs.delete_file(path)


def write_local(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary file beside `path`, synced to disk, then renamed over it.

    A reader, or a run killed at any moment, sees the old file or the whole new one, never half
    of one; the sync makes that hold after a machine crash too, which a rename alone does not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
