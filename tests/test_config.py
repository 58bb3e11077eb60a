"""Bad input: one clear line, before any work."""
import subprocess
import sys

import pytest

from ndot.config import ConfigError, TrainConfig
from ndot.layers import neurons
from ndot.models import from_config


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"T": 0}, "T must be an integer in [1, 10000]"),
        ({"T": -3}, "T must be an integer in [1, 10000]"),
        ({"T": 10**20}, "T must be an integer in [1, 10000]"),
        ({"epochs": 0}, "epochs must be an integer in [1, 100000]"),
        ({"epochs": 10**12}, "epochs must be an integer in [1, 100000]"),
        ({"rule": "stdp"}, "unknown rule 'stdp'; valid rules: ndot, ndot_ref, ottt, sltt, bptt"),
        ({"arch": "vgg99"}, "unknown architecture 'vgg99'; valid architectures: resnet_ws, small_cnn, vgg11_ws"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -0.1}, "lr must be > 0"),
        ({"lr": 1e39}, "at most float32's largest"),
        ({"weight_decay": 1e308}, "at most float32's largest"),
        ({"rule": "bptt", "mode": "O"}, "rule 'bptt' needs the whole sequence"),
        ({"mode": "B"}, "unknown mode 'B'"),
        ({"tau": 1.0}, "tau must be > 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_bad_config_raises_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_defaults_are_the_specs_and_reach_the_network():
    """A run with no flags is the spec's: λ = 0.5 (τ = 2), Vth = 1, surrogate α = 4 (§1), loss α = 0.05
    (§3), SGD lr 0.1, momentum 0.9, no weight decay, batch 128 (§5), NDOT_A with the unsigned factor."""
    cfg = TrainConfig()
    assert (cfg.rule, cfg.mode, cfg.signed_factor, cfg.detach_reset, cfg.readout_trace) == ("ndot", "A", False, False, False)
    assert (cfg.loss_alpha, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.05, 0.1, 0.9, 0.0, 128)
    spiking = list(neurons(from_config(cfg, 1, 10)))
    assert spiking and all((n.lam, n.v_th, n.alpha, n.dropout, n.rule, n.signed) == (0.5, 1.0, 4.0, 0.0, "ndot", False)
                           for n in spiking)


def test_default_config_is_valid_and_round_trips():
    cfg = TrainConfig().validate()
    assert TrainConfig.from_dict({**cfg.to_dict(), "extra_key_from_tune": 1}) == cfg


@pytest.mark.parametrize("args,words", [(["--T", "0"], "T must be"), (["--rule", "bptt", "--mode", "O"], "bptt"),
                                        (["--arch", "x"], "unknown architecture"), (["--T", "two"], "--T"),
                                        (["--device", "cuda:7"], "cuda:7"),
                                        (["--T", str(10**20)], "T must be an integer in [1, 10000]")])
def test_cli_rejects_bad_input_with_one_line_and_nonzero_exit(args, words, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ndot.train", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_missing_data_names_the_flags_that_fix_it(tmp_path):
    # Dashed spellings are accepted too, as in the sweep scripts.
    r = subprocess.run([sys.executable, "-m", "ndot.train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                        "--batch-size", "8", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--download" in r.stderr and str(tmp_path / "data") in r.stderr
