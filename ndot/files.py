"""Whole files at a local path or a URI (s3://bucket/key, gs://...), through pyarrow's filesystems."""
from __future__ import annotations

import uuid
from pathlib import PurePosixPath

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
