"""Files written through the filesystem the sweeps give Ray Tune: whole or not at all, even when the writer is killed."""
from __future__ import annotations

import errno
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from helpers import HANG_S
from ndot import files

# Tune's own upload (the driver's state, a trial's checkpoint), killed by SIGKILL once `at` bytes of
# the new file are written: where a driver killed in mid-upload stops.
KILLED_UPLOAD = textwrap.dedent("""
    import os, signal, sys
    from ray.train._internal.storage import _upload_to_fs_path
    from ndot import files

    source, destination, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    write = files._Landing.write

    def write_then_die(self, b):
        write(self, bytes(b)[:at])
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    files._Landing.write = write_then_die
    _upload_to_fs_path(source, files.tune_filesystem(destination), destination)
""")


def _upload_killed(source: Path, destination: Path, at: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, str(source), str(destination), str(at)],
                          env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == -9, f"the upload was not killed in mid-write (exit {proc.returncode}): {proc.stderr[-2000:]}"


def test_an_upload_killed_in_mid_write_leaves_the_old_file_whole_and_a_finished_one_replaces_it(tmp_path):
    old, new = b"o" * 3_000_000, os.urandom(3_000_000)
    source, destination = tmp_path / "driver", tmp_path / "storage"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "experiment_state.json").write_bytes(new)
    (destination / "sub").mkdir(parents=True)
    (destination / "sub" / "experiment_state.json").write_bytes(old)

    _upload_killed(source, destination, at=len(new) // 2)
    assert (destination / "sub" / "experiment_state.json").read_bytes() == old
    strays = list((destination / "sub").glob(".experiment_state.json.*.tmp"))
    assert len(strays) == 1, "the kill came before the new file was being written"
    partial = strays[0].read_bytes()
    assert 0 < len(partial) < len(new) and new.startswith(partial)

    from ray.train._internal.storage import _upload_to_fs_path
    _upload_to_fs_path(str(source), files.tune_filesystem(str(destination)), str(destination))
    assert (destination / "sub" / "experiment_state.json").read_bytes() == new
    # A file that lands keeps the permissions any file written here gets.
    (tmp_path / "plain").write_bytes(b"")
    assert (destination / "sub" / "experiment_state.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_file_never_written_before_is_absent_after_a_killed_upload_not_cut_short(tmp_path):
    source, destination = tmp_path / "driver", tmp_path / "storage"
    source.mkdir()
    (source / "searcher-state.pkl").write_bytes(os.urandom(2_000_000))
    _upload_killed(source, destination, at=1_000_000)
    assert not (destination / "searcher-state.pkl").exists()


def test_the_whole_file_filesystem_is_local_storage_for_tune_and_an_object_store_keeps_its_own(tmp_path):
    fs = files.tune_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, files.WholeLocalFiles)
    # Tune pickles its storage into every trial.
    assert pickle.loads(pickle.dumps(fs)) == fs
    assert files.uri_of(fs, "/runs/sweep") == "/runs/sweep"
    assert files.uri_of(pafs.LocalFileSystem(), "/runs/sweep") == "/runs/sweep"
    assert files.tune_filesystem("s3://bucket/sweeps") is None

    fs.create_dir(f"{tmp_path}/a/b", recursive=True)
    with fs.open_output_stream(f"{tmp_path}/a/b/x.json") as f:
        f.write(b"{}")
    fs.copy_file(f"{tmp_path}/a/b/x.json", f"{tmp_path}/a/y.json")
    fs.move(f"{tmp_path}/a/y.json", f"{tmp_path}/a/z.json")
    listed = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(str(tmp_path / "a"), recursive=True)))
    assert listed == [f"{tmp_path}/a/b", f"{tmp_path}/a/b/x.json", f"{tmp_path}/a/z.json"]
    with fs.open_input_stream(f"{tmp_path}/a/z.json") as f:
        assert f.readall() == b"{}"
    fs.delete_dir(f"{tmp_path}/a")
    assert fs.get_file_info(f"{tmp_path}/a").type == pafs.FileType.NotFound


def test_a_local_write_that_raises_leaves_the_old_file_and_no_stray(tmp_path):
    path = tmp_path / "checkpoint.pt"
    files.write_local(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"new, half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_local(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    files.write_local(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# The same upload on a disk that fills up (a file-size limit makes its writes fail as ENOSPC would):
# pyarrow gives up on the stream without closing it, and the collector must not publish it.
FULL_DISK_UPLOAD = textwrap.dedent("""
    import gc, resource, signal, sys
    from ray.train._internal.storage import _upload_to_fs_path
    from ndot import files

    source, destination, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        _upload_to_fs_path(source, files.tune_filesystem(destination), destination)
    except OSError as e:
        print(type(e).__name__)
    gc.collect()
""")


def test_an_upload_whose_writes_fail_leaves_the_old_file_and_no_stray(tmp_path):
    old, new = b"o" * 1000, os.urandom(2_000_000)
    source, destination = tmp_path / "driver", tmp_path / "storage"
    source.mkdir()
    destination.mkdir()
    (source / "state.pt").write_bytes(new)
    (destination / "state.pt").write_bytes(old)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_UPLOAD, str(source), str(destination), "1000000"],
                          env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0 and "Error" in proc.stdout, f"the upload's writes did not fail: {proc.stdout}{proc.stderr[-2000:]}"
    assert (destination / "state.pt").read_bytes() == old
    assert [p.name for p in destination.iterdir()] == ["state.pt"]


@pytest.mark.parametrize("through", ["path", "uri"])
def test_a_write_onto_a_folder_fails_and_leaves_no_stray(tmp_path, through):
    (tmp_path / "trials.parquet").mkdir()
    target = tmp_path / "trials.parquet"
    with pytest.raises(OSError):
        files.write_bytes(str(target) if through == "path" else target.as_uri(), b"table")
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"] and (tmp_path / "trials.parquet").is_dir()


def test_gcs_requests_give_up_in_seconds_not_googles_15_minutes():
    fs, path = files.filesystem("gs://bucket/sweeps/x")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/sweeps/x"
    assert fs.__reduce__()[1][0]["retry_time_limit"].total_seconds() == files.GCS_RETRY_S


def test_a_stream_whose_write_failed_is_discarded_when_it_is_closed_after(tmp_path):
    # pyarrow closes (or drops) a stream whose copy failed: a write that raised marks it, and the
    # close that follows discards it instead of publishing the part written.
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    f = files._Landing(str(path))
    f.write(b"new, part")
    with pytest.raises(TypeError):
        f.write(12345)  # not bytes: the write raises, as one to a full disk would
    f.close()
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_write_to_a_uri_lands_at_its_path_and_leaves_no_temporary_file(tmp_path):
    # An object store (s3://, gs://) has no rename: the temporary object is moved onto the path, not copied,
    # which would leave a .NAME.*.tmp beside every table a sweep rewrites. file:// takes the same branch.
    # as_uri escapes what a URI cannot hold as it is (a basetemp with a space or an accent).
    uri = (tmp_path / "sweep" / "trials.parquet").as_uri()
    files.write_bytes(uri, b"new")
    assert os.listdir(tmp_path / "sweep") == ["trials.parquet"]
    assert files.read_bytes(uri) == b"new"


@pytest.mark.parametrize("through", ["path", "uri"])
def test_a_new_file_is_written_whole_once_and_a_second_writer_gets_file_exists(tmp_path, through, monkeypatch):
    target = tmp_path / "sweep" / "sweep.json"
    uri = str(target) if through == "path" else target.as_uri()
    files.write_new(uri, b"first")
    with pytest.raises(FileExistsError):
        files.write_new(uri, b"second")
    assert target.read_bytes() == b"first" and os.listdir(tmp_path / "sweep") == ["sweep.json"]
    if through == "path":  # a filesystem without hard links claims the path instead
        def no_links(*args):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
        files.write_new(str(tmp_path / "other.json"), b"x")
        with pytest.raises(FileExistsError):
            files.write_new(str(tmp_path / "other.json"), b"y")
        assert (tmp_path / "other.json").read_bytes() == b"x" and sorted(os.listdir(tmp_path)) == ["other.json", "sweep"]


def test_a_new_file_that_fails_to_land_is_not_claimed_another_way(tmp_path, monkeypatch):
    # Only a filesystem without hard links takes the fallback: a real failure is the writer's error, no file left.
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "link", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_new(str(tmp_path / "sweep.json"), b"x")
    assert os.listdir(tmp_path) == []


def test_a_claim_names_its_holder_alone_not_the_ones_before(tmp_path):
    # The file outlives each holder: a refusal that read the earlier holders' lines too named a process long gone.
    lock = tmp_path / "run.lock"
    lock.write_text("pid 1 on a machine long gone, started 2000-01-01 00:00:00")  # a holder that has ended
    with files.claim(lock):
        with pytest.raises(files.Held, match=rf"^pid {os.getpid()} on {re.escape(socket.gethostname())}, "
                                             r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$"):
            with files.claim(lock):
                pass
    with files.claim(lock):  # let go when the block ended
        pass
