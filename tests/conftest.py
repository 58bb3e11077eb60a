"""Fixtures pytest hands to any test module that asks for them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ndot.cli import signal_handlers_kept

ROOT = Path(__file__).resolve().parent.parent
# A sweep without --address joins the cluster $RAY_ADDRESS names: the suite's sweeps run on the Ray
# each test starts, never on a cluster the shell that runs the suite points at.
os.environ.pop("RAY_ADDRESS", None)
# A suite started in the background of a shell without job control (`pytest &`, nohup) has SIGINT ignored,
# and commands it starts inherit that: the tests that stop one with Ctrl-C would wait out their timeouts.
# A handled signal is reset to the default in a child, an ignored one is not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module", autouse=True)
def signal_handlers_kept_by_the_module() -> Iterator[None]:
    """The handlers that a module's Ray and Tune work sets in this process set back when it ends, as ndot.sweep.cli.main
    sets them back at a sweep's end: a head node's and ray.init's SIGTERM, and Tune's SIGINT and SIGUSR1, which
    tests/test_sweep.py's runs through runner.run left to every later module (Tune's swallows a first Ctrl-C)."""
    with signal_handlers_kept(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        yield


# Installed here for the sweeps and the event data, absent from the GPU machine's image:
# bench/gpu_check.sh must run without them.
NOT_ON_THE_GPU_MACHINE = ("ray", "optuna", "tonic", "faery", "aedat", "expelliarmus", "importRosbag",
                          "jsonschema", "moto", "boto3")


# A researcher's module outside the package: a two-conv WS network, registered as USER_ARCH.
USER_MODULE, USER_ARCH = "user_arch", "ws2"
_USER_MODULE_TEXT = f"""
from ndot.layers import Seq, WSConv2d
from ndot.models import NeuronArgs, SpikingNet, register


def ws2(in_channels: int, num_classes: int, n: NeuronArgs) -> SpikingNet:
    return SpikingNet(Seq(WSConv2d(in_channels, 16), n.make(), WSConv2d(16, 32, stride=2), n.make()), 32, num_classes)


register({USER_ARCH!r}, ws2, 16)
"""


@pytest.fixture
def user_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """USER_MODULE written to a folder of its own, the current one and on sys.path, as a module beside the
    researcher's shell is (Ray puts a driver's folder on its workers' path); not imported yet. Yields
    (USER_MODULE, USER_ARCH). Afterwards the process knows it no more: USER_ARCH is out of ARCHS, which the
    tests over ARCHS read."""
    from ndot.models import ARCHS, REGISTERED_BY

    _write_user_module(tmp_path, monkeypatch, USER_MODULE, _USER_MODULE_TEXT)
    yield USER_MODULE, USER_ARCH
    ARCHS.pop(USER_ARCH, None)
    REGISTERED_BY.pop(USER_ARCH, None)
    sys.modules.pop(USER_MODULE, None)


# A researcher's dataset outside the package, registered as USER_DATASET: docs/extending.md's example.
USER_DATA_MODULE, USER_DATASET = "user_data", "stripes"
_USER_DATA_MODULE_TEXT = f"""
import torch
from ndot.data import DatasetInfo, register
from ndot.data.loader import DeviceLoader


def loaders(cfg, device, input_size):
    g = torch.Generator().manual_seed(0)  # the same data in every process that runs the config
    y = torch.randint(0, 4, (1000,), generator=g)
    x = torch.randn(1000, 1, input_size, input_size, generator=g)
    x[torch.arange(1000), 0, :, y] += 2.0  # class k: column k lit
    x, y = x.to(device), y.to(device)
    return (DeviceLoader(x[:800], y[:800], cfg.batch_size, shuffle=True, seed=cfg.seed),
            DeviceLoader(x[800:], y[800:], cfg.batch_size, shuffle=False))


register({USER_DATASET!r}, loaders, DatasetInfo(num_classes=4, in_channels=1, image_size=None, in_data_root=False))
"""


@pytest.fixture
def user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """USER_DATA_MODULE, as user_arch has USER_MODULE: yields (USER_DATA_MODULE, USER_DATASET), and afterwards
    the process knows it no more."""
    from ndot.data import DATASETS, REGISTERED_BY

    _write_user_module(tmp_path, monkeypatch, USER_DATA_MODULE, _USER_DATA_MODULE_TEXT)
    yield USER_DATA_MODULE, USER_DATASET
    DATASETS.pop(USER_DATASET, None)
    REGISTERED_BY.pop(USER_DATASET, None)
    sys.modules.pop(USER_DATA_MODULE, None)


def _write_user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, text: str) -> None:
    folder = tmp_path / "user"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(text)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The data tests work on small tensors, which gain nothing from intra-op threads; on a loaded
    2-core machine OpenMP barriers wait on descheduled threads and made them 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The script's stage limits fit the GPU machine's call (515 s in all); on this CPU with an empty compile cache
# its benchmark alone took 67 s of its 310 s on a loaded day: a machine 5x slower would outlast them.
DRY_RUN_LIMIT_SCALE = 3


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """bench/gpu_check.sh run once on this CPU, both benchmarks --small, as on the GPU machine: the
    packages it lacks cannot be imported. Its finished process and the folder of its results."""
    out, absent = tmp_path_factory.mktemp("gpu-check"), tmp_path_factory.mktemp("absent")
    for name in NOT_ON_THE_GPU_MACHINE:
        # Ahead of site-packages on the path, so that importing the installed package fails as it would there.
        (absent / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name} is not on the GPU machine', name={name!r})\n")
    path = os.pathsep.join(filter(None, [str(absent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": path,
           "BENCH_ARGS": "--small", "BENCH_DATA_ARGS": "--small --threads 1", "LIMIT_SCALE": str(DRY_RUN_LIMIT_SCALE)}
    # Over the scaled stages' worst case: only a hang outside them (the environment, the table) reaches it.
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600 * DRY_RUN_LIMIT_SCALE)
    return done, out
