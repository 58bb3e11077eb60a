"""CIFAR-10/100: torchvision's files written by the test, read through the real loaders; both pipelines."""
from __future__ import annotations

import gc
import http.server
import io
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

from data_fixtures import closed_port, crop_offsets, one_line, uniform_enough
from helpers import HANG_S
from ndot.config import TrainConfig
import ndot.cli
from ndot import data
from ndot.data import DataError, cifar, fixtures, storage
from ndot.data.loader import DeviceLoader, WorkerLoader, epoch_generator, sample_seed
from ndot.evaluate import main as evaluate_main
from ndot.train import main as train_main, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINES = ("device", "cpu")
CPU = torch.device("cpu")
N_TRAIN, N_TEST = 250, 70


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    out = {}
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        train = (rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, N_TRAIN))
        test = (rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, N_TEST))
        out[name] = {"train": train, "test": test, "md5s": fixtures.write_cifar(root, name, train, test)}
    return root, out


@pytest.fixture
def root(written, monkeypatch) -> Path:
    """The fixture's folder, with its md5s registered where torchvision looks them up."""
    path, data = written
    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        for attr, value in data[name]["md5s"].items():
            monkeypatch.setattr(cls, attr, value)
    return path


def config(root: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "cifar10", "data_root": str(root), "batch_size": 32, "workers": 0, **kw})


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_fixture_fails_the_real_md5_check(written):
    with pytest.raises(DataError, match="md5"):
        cifar.check(config(written[0]))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_loaders_read_the_files_with_labels_and_normalisation(root, written, name, pipeline):
    data = written[1][name]
    train, test = cifar.loaders(config(root, dataset=name, loader=pipeline), CPU, 32)
    assert (train.num_samples, test.num_samples) == (N_TRAIN, N_TEST)
    assert (len(train), len(test)) == (-(-N_TRAIN // 32), -(-N_TEST // 32))

    xs, ys = zip(*batches(train, 1))
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.device == CPU for x in xs)
    assert sorted(torch.cat(ys).tolist()) == sorted(data["train"][1].tolist())

    x, y = map(torch.cat, zip(*batches(test, 1)))
    assert y.dtype == torch.int64 and y.tolist() == data["test"][1].tolist()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in cifar.NORMALISATION[name])
    expected = (torch.from_numpy(data["test"][0]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_normalisation_is_the_recipes():
    # Spec §5; the other tests read the constants from the module, so they would not notice a change.
    assert cifar.NORMALISATION == {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                                   "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}


def test_both_pipelines_give_identical_test_inputs(root):
    out = [torch.cat([x for x, _ in batches(cifar.loaders(config(root, loader=p), CPU, 32)[1], 1)]) for p in PIPELINES]
    assert torch.equal(*out)


def test_only_32px_inputs(root):
    with pytest.raises(ValueError, match="32x32"):
        cifar.loaders(config(root), CPU, 48)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_epochs_replay_under_a_seed_and_resume(root, pipeline):
    def loader(seed: int = 0):
        return cifar.loaders(config(root, loader=pipeline, seed=seed), CPU, 32)[0]

    first = loader()
    run = [batches(first, e) for e in (1, 2, 3)]
    resumed = batches(loader(), 3)
    for (xa, ya), (xb, yb) in zip(run[2], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(run[1][0][1], run[2][0][1]), "each epoch has its own order"
    assert not torch.equal(batches(loader(seed=1), 3)[0][1], run[2][0][1]), "the seed changes the order"


def test_cpu_pipeline_does_not_depend_on_worker_count(root):
    one, two = (batches(cifar.loaders(config(root, loader="cpu", workers=w), CPU, 32)[0], 2) for w in (0, 2))
    for (xa, ya), (xb, yb) in zip(one, two):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _stops_ignored(image: object) -> torch.Tensor:
    return torch.tensor([signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN])


def test_cpu_pipeline_workers_leave_ctrl_c_and_sigterm_to_the_main_process():
    # A terminal and a batch scheduler signal the whole process group: a worker the signal reached printed a traceback
    # of its own, or the main process torch's "DataLoader worker ... is killed by signal", under the command's line
    # (the CIFAR10-DVS conversion's workers, tested stopped, are set up alike).
    ignored = torch.cat([x for x, _ in WorkerLoader([(0, 0)] * 4, _stops_ignored, 2, shuffle=False, workers=2)])
    assert ignored.all()


def test_cpu_pipeline_leaves_the_training_rng_alone(root):
    train = cifar.loaders(config(root, loader="cpu"), CPU, 32)[0]
    torch.manual_seed(123)
    batches(train, 1)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


# --- same distribution from both pipelines --------------------------------------------------------------------

N_STAT = 2000


def augmented(images: np.ndarray, pipeline: str, **flags) -> torch.Tensor:
    """The training inputs of one epoch over `images`, in their order, mapped back to [0, 255] pixel values."""
    index = np.arange(len(images))  # as labels: undoes the shuffle
    cfg = TrainConfig(dataset="cifar10", loader=pipeline, batch_size=256, workers=0, **flags)
    train, _ = cifar.build(cfg, CPU, (images, index), (images, index))
    x, order = map(torch.cat, zip(*batches(train, 1)))
    x = x[order.argsort()]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in cifar.NORMALISATION["cifar10"])
    lo, hi = -mean / std, (1 - mean) / std
    assert ((x >= lo - 1e-5) & (x <= hi + 1e-5)).all(), "normalised values lie in the image of [0, 1]"
    return (x * std + mean) * 255


def white(n: int) -> np.ndarray:
    return np.full((n, 32, 32, 3), 255, dtype=np.uint8)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_crop_offsets_uniform_over_the_81_positions(pipeline):
    out = augmented(white(N_STAT), pipeline, flip=False, autoaugment=False, cutout=False)
    top, left = crop_offsets((out[:, 0] > 127).float(), 4)
    counts = torch.bincount(top * 9 + left, minlength=81).float()
    assert len(counts) == 81 and uniform_enough(counts, torch.full((81,), N_STAT / 81))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_flip_half_the_images(pipeline):
    ramp = np.broadcast_to((np.arange(32) * 8).astype(np.uint8)[None, None, :, None], (N_STAT, 32, 32, 3)).copy()
    out = augmented(ramp, pipeline, crop=False, autoaugment=False, cutout=False)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert abs(flipped.float().mean().item() - 0.5) < 4 * (0.25 / N_STAT) ** 0.5


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cutout_one_clipped_16px_hole_with_uniform_centre(pipeline):
    out = augmented(white(N_STAT), pipeline, crop=False, flip=False, autoaugment=False)
    hole = out.amax(1) < 127
    # Cutout zeroes pixels before Normalize; after it, a hole would be the mean colour (125, 123, 114).
    assert out.permute(0, 2, 3, 1)[hole].abs().max() < 1e-3
    rows, cols = hole.any(2), hole.any(1)
    area = hole.sum((1, 2))
    assert torch.equal(area, rows.sum(1) * cols.sum(1)), "the hole is one rectangle"
    lengths = torch.tensor([min(c + 8, 32) - max(c - 8, 0) for c in range(32)], dtype=torch.float)
    assert abs(area.float().mean() - lengths.mean() ** 2) < 4 * area.float().std() / N_STAT ** 0.5


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cutout_comes_after_autoaugment_so_every_hole_stays_black(pipeline):
    # The recipe's order (spec §5): AutoAugment, then Cutout. On grey images a hole cut first would be
    # turned grey or white by Contrast, Invert or Solarize; cut last, every image shows one black square
    # of at least 8x8 (the hole clipped at a corner), in every channel.
    out = augmented(np.full((500, 32, 32, 3), 128, dtype=np.uint8), pipeline, crop=False, flip=False)
    black = (out.amax(1, keepdim=True) < 0.5).float()
    assert (torch.nn.functional.avg_pool2d(black, 8, stride=1).flatten(1).amax(1) == 1).all()


def smooth_images(n: int) -> np.ndarray:
    """Gradients with a random tint and noise: images on which every AutoAugment op changes pixels."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 1, 32)
    base = ramp[None, :, None, None] * rng.uniform(60, 200, (n, 1, 1, 3)) + ramp[None, None, :, None] * 40
    return np.clip(base + rng.normal(0, 12, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def test_autoaugment_same_statistics_from_pil_and_device():
    images = smooth_images(N_STAT)
    source = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    outs = {p: augmented(images, p, crop=False, flip=False, cutout=False) for p in PIPELINES}
    for p in PIPELINES:
        # PIL and tensor ops may differ by one level of rounding; "untouched" allows for it.
        untouched = ((outs[p] - source).abs() <= 1.01).flatten(1).all(1).float().mean().item()
        outs[p] = (outs[p], untouched)
    (dev, dev_untouched), (pil, pil_untouched) = outs["device"], outs["cpu"]
    spread = 4 * (2 * 0.25 / N_STAT) ** 0.5
    assert abs(dev_untouched - pil_untouched) < spread
    assert 0.1 < dev_untouched < 0.5, "AutoAugment leaves some images but not most untouched"
    for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3))):
        torch.testing.assert_close(stat(dev), stat(pil), rtol=0.03, atol=2.0)


# --- data root and errors ----------------------------------------------------------------------------------------

def test_data_root_from_config_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NDOT_DATA", str(tmp_path / "env"))
    assert storage.data_root(config(tmp_path / "cfg")) == tmp_path / "cfg"
    assert storage.data_root(TrainConfig()) == tmp_path / "env"
    monkeypatch.delenv("NDOT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.data_root(TrainConfig()) == tmp_path / "data"


def test_caches_go_to_ndot_cache_then_under_the_data_root(monkeypatch, tmp_path):
    # docs/data.md: caches derived from the data go to $NDOT_CACHE, else <data root>/ndot-cache.
    monkeypatch.setenv("NDOT_CACHE", str(tmp_path / "caches"))
    assert storage.cache_root(config(tmp_path / "cfg")) == tmp_path / "caches"
    monkeypatch.delenv("NDOT_CACHE")
    assert storage.cache_root(config(tmp_path / "cfg")) == tmp_path / "cfg" / "ndot-cache"


def test_a_device_loader_refuses_inputs_and_labels_of_different_lengths():
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        DeviceLoader(torch.zeros(3, 1), torch.zeros(2), 2, shuffle=False)


def test_missing_dataset_names_folder_files_and_remedy(tmp_path):
    with pytest.raises(DataError) as err:
        cifar.check(config(tmp_path, dataset="cifar100"))
    message = one_line(err)
    for part in (str(tmp_path / "cifar-100-python"), "train", "test", "meta", "--download", "download=True", CIFAR100.url):
        assert part in message


def test_missing_data_names_what_chose_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NDOT_DATA", str(tmp_path / "env"))
    for cfg, origin in ((config(tmp_path / "cfg"), "the data root is data_root's (--data-root)"),
                        (TrainConfig(dataset="cifar10"), "the data root is $NDOT_DATA's; --data-root (data_root) overrides it")):
        with pytest.raises(DataError) as err:
            data.check(cfg)
        assert one_line(err).endswith(f"unpack that archive into {storage.data_root(cfg)} yourself; {origin}")


def test_data_missing_from_a_saved_data_root_names_the_checkpoint_not_ndot_data(root, tmp_path, monkeypatch, capsys):
    """A resumed run, and weights evaluated, read the data root their run saved, which $NDOT_DATA does not move."""
    old = tmp_path / "old"
    shutil.copytree(root / CIFAR10.base_folder, old / CIFAR10.base_folder)
    run = tmp_path / "run"
    assert train_main(["--dataset", "cifar10", "--data_root", str(old), "--T", "1", "--epochs", "1", "--batch_size", "125",
                       "--workers", "0", "--device", "cpu", "--out", str(run)]) == 0
    shutil.rmtree(old)
    monkeypatch.setenv("NDOT_DATA", str(root))
    for main, args, saved_in in ((train_main, ["--out", str(run), "--resume", "--epochs", "2"], run / "checkpoint.pt"),
                                 (evaluate_main, [str(run)], run / "best.pt")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "NDOT_DATA" not in err, err
        assert err.endswith(f"the data root is the data_root saved in {saved_in}; --data-root overrides it\n"), err
    assert evaluate_main([str(run), "--data-root", str(root), "--out", str(tmp_path / "eval.json")]) == 0  # as it says


def _children() -> set[int]:
    return {int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


def _killing_the_loaders_workers_at(call: int, step):
    """`step`, which at its `call`-th call kills the loader workers started since (the system's out-of-memory
    killer does so on a laptop)."""
    before, calls = _children(), []

    def killing(*args, **kw):
        calls.append(None)
        if len(calls) == call:
            for pid in _children() - before:
                os.kill(pid, signal.SIGKILL)
        return step(*args, **kw)

    return killing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers are forks of this process (Linux)")
def test_a_loader_worker_killed_ends_a_run_or_an_evaluation_in_one_line(root, tmp_path, monkeypatch, capsys):
    import ndot.evaluate as evaluate_module
    import ndot.train as train_module

    run = tmp_path / "run"
    # 10 batches an epoch: a worker killed in the second epoch's first step still owes it batches.
    argv = ["--dataset", "cifar10", "--data_root", str(root), "--arch", "small_cnn", "--T", "1", "--epochs", "2",
            "--batch_size", "25", "--loader", "cpu", "--workers", "1", "--device", "cpu", "--out", str(run)]
    monkeypatch.setattr(train_module, "train_batch", _killing_the_loaders_workers_at(11, train_module.train_batch))
    capsys.readouterr()
    assert train_main(argv) == 1
    # The epoch's iterator, in a cycle with the traceback the command caught, holds its dead worker registered with
    # torch's SIGCHLD handler until collected: meanwhile any child's end raised its error again, wherever this
    # process was (the command's own process exits at once).
    gc.collect()
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: a data loader worker ended \(DataLoader worker \(pid\(?s?\)? \d+\) [^\n]*\); epoch 1 of 2 "
                        rf"is the last saved: with fewer --workers, where memory ran out, continue with python -m ndot.train "
                        rf"--out {re.escape(str(run))} --resume\n", err), err
    monkeypatch.setattr(evaluate_module, "eval_batch", _killing_the_loaders_workers_at(1, evaluate_module.eval_batch))
    assert evaluate_main([str(run), "--data-root", str(root), "--batch-size", "10"]) == 1
    gc.collect()
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: a data loader worker ended \(DataLoader worker [^\n]*\): fewer --workers hold less "
                        r"memory, where it ran out\n", err), err


def test_half_present_dataset_names_what_is_missing_or_damaged(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root / CIFAR10.base_folder, copy / CIFAR10.base_folder)
    (copy / CIFAR10.base_folder / "data_batch_3").unlink()
    with open(copy / CIFAR10.base_folder / "test_batch", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError) as err:
        cifar.loaders(config(copy), CPU, 32)
    message = one_line(err)
    assert "missing data_batch_3" in message and "test_batch failing the md5 check" in message
    assert "data_batch_1" not in message


def test_failed_download_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as err:
        cifar.check(config(tmp_path, download=True))
    message = one_line(err)
    assert f"downloading cifar10 into {tmp_path} failed" in message and "refused" in message
    assert "unpack it into" in message


@pytest.fixture
def served(root, tmp_path, monkeypatch) -> list[tuple]:
    """CIFAR-10's fixture as its archive on a local HTTP server at CIFAR10.url; returns the downloads made."""
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / CIFAR10.base_folder, arcname=CIFAR10.base_folder)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(archive.parent), **kw)

        def do_GET(self):
            time.sleep(0.3)  # long enough for every caller to arrive while the first downloads
            super().do_GET()

        def log_message(self, *args):
            pass

    downloads: list[tuple] = []
    monkeypatch.setattr(cifar, "download_and_extract_archive",
                        lambda *a, **kw: (downloads.append(a), download_and_extract_archive(*a, **kw)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_address[1]}/{archive.name}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", calculate_md5(archive))
    yield downloads
    server.shutdown()


def test_concurrent_downloads_into_one_folder_fetch_once(served, tmp_path):
    # The trials of a sweep that start together on a node each check their data with --download.
    errors = []

    def check():
        try:
            cifar.check(config(tmp_path / "data", download=True))
        except Exception as e:  # noqa: BLE001 (reported below, with the thread's)
            errors.append(e)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(served) == 1, "each trial downloaded the dataset again"
    assert cifar.read(config(tmp_path / "data"), train=False)[1].shape == (N_TEST,)


def test_download_restores_a_missing_meta_file(served, root, tmp_path):
    # torchvision's own download looks at the data batches alone, and would leave the meta file missing.
    shutil.copytree(root / CIFAR10.base_folder, tmp_path / "data" / CIFAR10.base_folder)
    (tmp_path / "data" / CIFAR10.base_folder / "batches.meta").unlink()
    cifar.check(config(tmp_path / "data", download=True))
    assert len(served) == 1 and cifar.read(config(tmp_path / "data"), train=True)[1].shape == (N_TRAIN,)


def test_a_download_whose_stderr_is_no_terminal_writes_its_progress_as_lines(served, tmp_path, capsys, monkeypatch):
    # A sweep's trial logs, a batch job's: the library's bar redraws itself after a '\r' ten times a second, a line
    # of the log each. Of its states, one per PROGRESS_S is a line (none here) and the last.
    monkeypatch.setattr(ndot.cli, "PROGRESS_S", math.inf)
    cifar.check(config(tmp_path / "data", download=True))
    err = capsys.readouterr().err  # the bar's, and the server's about the probe for a redirect, which hangs up
    assert len(served) == 1 and "\r" not in err and [line[:4] for line in err.splitlines() if "%|" in line] == ["100%"], err


def test_each_state_of_a_redrawn_bar_that_is_due_is_a_line_and_blank_ones_none(monkeypatch):
    # PROGRESS_S 0: every state is due. tqdm opens with a bare '\r' and ends with '\n'.
    monkeypatch.setattr(ndot.cli, "PROGRESS_S", 0.0)
    out = io.StringIO()
    bars = storage._PacedBars(out)
    for text in ["\r", " 10%|#", "\r 50%|##\r", "\r", "100%|###\n", "done\n"]:
        assert bars.write(text) == len(text)
    assert out.getvalue() == " 10%|#\n 50%|##\n100%|###\ndone\n"


def test_a_download_whose_stderr_is_a_terminal_draws_its_bar_there(tmp_path, monkeypatch):
    master, slave = os.openpty()
    with open(master, "rb"), open(slave, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        seen = []
        storage.download(lambda: seen.append(sys.stderr), what="x", folder=tmp_path, manual="", present=lambda: False)
    assert seen == [tty]


def test_a_download_says_so_on_the_library_logger_and_data_present_says_nothing(tmp_path, caplog):
    # A sweep's trial shows the logger's lines on the driver's status line (ndot.sweep.trainable.Reporter); the
    # download's bar it does not.
    caplog.set_level(logging.INFO, logger="ndot")
    said = []
    storage.download(lambda: said.extend(caplog.messages), what="x", folder=tmp_path, manual="", present=lambda: False)
    storage.download(lambda: None, what="x", folder=tmp_path, manual="", present=lambda: True)
    assert said == caplog.messages == [f"downloading x into {tmp_path}"]


def test_stalled_download_times_out(tmp_path, monkeypatch):
    # The timeout each connection is opened under, read as urllib opens it (the connection itself is real):
    # the setting's, not a constant, and no clock to read.
    in_effect = []
    real_connect = socket.create_connection

    def connect(address, *args, **kwargs):
        # The timeout passed, or where it is left to the default (urllib's way), the process-wide one.
        timeout = args[0] if args else kwargs.get("timeout", socket._GLOBAL_DEFAULT_TIMEOUT)
        in_effect.append(socket.getdefaulttimeout() if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel completes the handshake; nobody ever answers
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.getsockname()[1]}/c.tar.gz")
        monkeypatch.setattr(storage, "DOWNLOAD_TIMEOUT_S", 0.5)
        with pytest.raises(DataError, match="timed out"):
            cifar.check(config(tmp_path, download=True))
    assert in_effect and set(in_effect) == {0.5}, in_effect
    assert socket.getdefaulttimeout() is None, "the process-wide timeout is restored"


def test_the_trainer_runs_on_the_cifar100_fixture_and_reports_top5(root):
    seen = []
    result = train(config(root, dataset="cifar100", arch="small_cnn", T=1, epochs=1, device="cpu"),
                   lambda m, s: seen.append(m))
    assert result.status == "completed"
    assert 0 <= seen[0]["test_acc"] <= seen[0]["test_top5"] <= 1


def test_every_seed_epoch_and_sample_draws_its_own_random_numbers():
    # The device pipeline's stream per (seed, epoch), and the CPU pipeline's per (seed, epoch, sample):
    # a collision would repeat one epoch's shuffle and augmentation in another, or another seed's.
    streams = {torch.randint(2**62, (1,), generator=epoch_generator(seed, epoch)).item()
               for seed in range(4) for epoch in range(60)}
    assert len(streams) == 4 * 60
    seeds = {sample_seed(seed, epoch, index) for seed in range(3) for epoch in range(1, 6) for index in range(50)}
    assert len(seeds) == 3 * 5 * 50


def test_augmentation_draws_continue_the_shuffles_stream_not_repeat_it():
    # Two generators seeded alike on one device would draw the same numbers: the augmentation of a
    # batch would then follow from the order the shuffle drew, instead of being drawn on its own.
    states = []

    def prepare(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        states.append(g.get_state())
        return x.float()

    loader = DeviceLoader(torch.zeros(10, 1), torch.arange(10), 4, shuffle=True, seed=3, prepare=prepare)
    loader.set_epoch(2)
    assert [len(y) for _, y in loader] == [4, 4, 2]
    assert not torch.equal(states[0], epoch_generator(3, 2).get_state())


def test_the_cpu_pipeline_draws_each_samples_augmentation_anew_every_epoch():
    # Seeded per (seed, epoch, sample): a seed without the epoch would give every sample the same crop,
    # flip and cutout in every epoch, which the shuffled order alone would not show.
    from ndot.data.loader import WorkerLoader
    loader = WorkerLoader(list(zip(torch.zeros(6), range(6))), lambda x: x + torch.rand(()), 3, shuffle=False, seed=1)
    x1, x2 = (torch.cat([x for x, _ in batches(loader, e)]) for e in (1, 2))
    assert not torch.equal(x1, x2)
    assert torch.equal(torch.cat([x for x, _ in batches(loader, 1)]), x1), "an epoch replays"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a worker's signals in /proc")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_ctrl_c_while_workers_start_under_spawn_or_forkserver_ends_in_one_line(method):
    # Under "spawn" (macOS's default) and "forkserver" (Python 3.14's on Linux) a worker imports torch before its
    # worker_init_fn ignores Ctrl-C, and the main process hands each its dataset in turn. A Ctrl-C then gave the
    # importing worker's traceback (spawn), and the main process, stopped mid-start, waited at exit for ever for the
    # workers already started, which ignore SIGTERM. Here it comes as the third worker is handed the dataset: the
    # first has started, the second is importing.
    script = textwrap.dedent(f"""
        import multiprocessing, os, signal, time
        import torch
        from ndot.cli import run
        from ndot.data.loader import WorkerLoader

        def ignores_sigterm(pid):
            with open(f"/proc/{{pid}}/status") as f:
                ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
            return ignored >> (signal.SIGTERM - 1) & 1

        class Handed(list):
            def __reduce__(self):  # in the main process, as it hands a worker the dataset
                handed.append(1)
                if len(handed) == 3:
                    while not any(ignores_sigterm(p.pid) for p in multiprocessing.active_children()):
                        time.sleep(0.01)
                    os.killpg(0, signal.SIGINT)
                return list, (list(self),)

        handed = []
        multiprocessing.set_start_method({method!r})
        run(lambda: list(WorkerLoader(Handed([(0, 0)] * 6), torch.tensor, 2, shuffle=False, workers=3)) and 0)
    """)
    # More workers than this machine may have cores: torch warns of it.
    done = subprocess.run([sys.executable, "-W", "ignore:This DataLoader will create:UserWarning", "-c", script],
                          capture_output=True, text=True, timeout=HANG_S,
                          start_new_session=True)
    # Left alone: in about 1 run in 5 under "spawn", Python's resource tracker warns at exit of a semaphore it counts
    # as leaked, or a worker's C++ runtime says "terminate called without an active exception" as it ends.
    noise = re.compile(r".*resource_tracker.*\n|terminate called without an active exception\n")
    assert (done.returncode, noise.sub("", done.stderr)) == (130, "interrupted (SIGINT)\n"), done.stderr
