"""Bad input: one clear line, before any work."""
import math
import re
import subprocess
import sys

import pytest
import torch

from helpers import HANG_S
from ndot import checkpoint
from ndot.config import (FLOAT32_MAX, MAX_EPOCHS, MAX_T, MAX_WORKERS, ONLINE_RULES, RULES, ConfigError, TrainConfig,
                         check_rule_flags, parse_field, parse_method, rule_flags_off)
from ndot.layers import neurons
from ndot.models import ARCHS, from_config


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"T": 0}, "T must be an integer in [1, 10000]"),
        ({"T": -3}, "T must be an integer in [1, 10000]"),
        ({"T": 10**20}, "T must be an integer in [1, 10000]"),
        ({"epochs": 0}, "epochs must be an integer in [1, 100000]"),
        ({"epochs": 10**12}, "epochs must be an integer in [1, 100000]"),
        ({"rule": "stdp"}, f"unknown rule 'stdp'; valid rules: {', '.join(RULES)}"),
        ({"rule": "NDOT_O"}, f"unknown rule 'NDOT_O'; valid rules: {', '.join(RULES)}; NDOT_O is rule 'ndot' with mode 'O'"),
        ({"rule": "ndot_ref_A"}, "; ndot_ref_A is rule 'ndot_ref' with mode 'A'"),
        ({"arch": "vgg99"}, f"unknown architecture 'vgg99'; valid architectures: {', '.join(sorted(ARCHS))}"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -0.1}, "lr must be > 0"),
        ({"lr": 1e39}, "at most float32's largest"),
        ({"weight_decay": 1e308}, "at most float32's largest"),
        ({"rule": "bptt", "mode": "O"}, "rule 'bptt' needs the whole sequence"),
        ({"mode": "B"}, "unknown mode 'B'"),
        ({"loader": "gpu"}, "unknown loader 'gpu'; valid: "),
        ({"dvs_encoding": "raw"}, "unknown dvs_encoding 'raw'; valid: "),
        ({"tau": 1.0}, "tau must be > 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"imports": "no_such_module"}, "imports: cannot import 'no_such_module' (No module named 'no_such_module')"),
        ({"imports": "ndot.layers", "arch": "ws2"}, "unknown architecture 'ws2' (registered by none of imports ndot.layers)"),
        ({"imports": "ndot.layers", "dataset": "stripes"}, "unknown dataset 'stripes' (registered by none of imports ndot.layers)"),
    ],
)
def test_bad_config_raises_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_imports_are_read_as_a_list_written_by_hand():
    # docs/extending.md's `--imports my_arch,my_data`, typed with a space after a comma or a comma left at the end.
    assert TrainConfig(imports="ndot.layers, ndot.models,").validate().imports == "ndot.layers, ndot.models,"


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
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # A sweep's epoch row: ids and metrics beside the fields.
    assert TrainConfig.from_record({**cfg.to_dict(), "trial_id": "t0", "test_acc": 0.5}) == cfg


@pytest.mark.parametrize("d,words", [({"lrr": 0.05}, "unknown setting 'lrr'; did you mean 'lr'?"),
                                     ({"T": 2, "batchsize": 8, "epoch": 2},
                                      "unknown settings 'batchsize', 'epoch'; did you mean 'batch_size' or 'epochs'?"),
                                     ({"learning_rate": 0.05}, "unknown setting 'learning_rate'; settings are TrainConfig's fields: dataset, arch,")])
def test_a_dict_with_a_key_that_is_no_setting_is_refused_not_run_with_the_default(d, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,words", [(["--T", "0"], "T must be"), (["--rule", "bptt", "--mode", "O"], "bptt"),
                                        (["--arch", "x"], "unknown architecture"), (["--T", "two"], "--T"),
                                        (["--device", "cuda:7"], "cuda:7"),
                                        (["--T", str(10**20)], "T must be an integer in [1, 10000]")])
def test_cli_rejects_bad_input_with_one_line_and_nonzero_exit(args, words, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ndot.train", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_missing_data_names_the_flags_that_fix_it(tmp_path):
    # Dashed spellings are accepted too, as in the sweep scripts.
    r = subprocess.run([sys.executable, "-m", "ndot.train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                        "--batch-size", "8", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--download" in r.stderr and str(tmp_path / "data") in r.stderr


@pytest.mark.parametrize("kw,words", [
    # Each range's edge, on its refused side: a slip here would run a meaningless or crashing run.
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"seed": 2**32}, "seed must be an integer in [0, 2**32)"),  # numpy's global seed refuses it mid-run
    ({"workers": -1}, "workers must be an integer in [0, 512]"),
    # Each a process forked every epoch: 10000 forked until memory or pids ran out.
    ({"workers": MAX_WORKERS + 1}, f"workers must be an integer in [0, {MAX_WORKERS}]"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"v_th": 0.0}, "v_th must be > 0"),
    ({"surrogate_alpha": 0.0}, "surrogate_alpha must be > 0"),
    ({"loss_alpha": 1.5}, "loss_alpha must be in [0, 1]"),
    # inf passes every range check written as a comparison (tau > 1, v_th > 0): the finite check catches it.
    ({"tau": float("inf")}, "tau must be a finite number"),
    ({"v_th": float("inf")}, "v_th must be a finite number"),
    ({"surrogate_alpha": float("inf")}, "surrogate_alpha must be a finite number"),
    # Finite as a Python float, inf as the fp32 the surrogate multiplies by: every gradient NaN.
    ({"surrogate_alpha": 1e39}, "surrogate_alpha must be > 0 and at most float32's largest"),
    # The same for the threshold: nothing fires, and BPTT's reset is inf·0 = NaN.
    ({"v_th": 1e39}, "v_th must be > 0 and at most float32's largest"),
    ({"cuda_graph": True, "device": "cpu"}, "cuda_graph replays CUDA graphs"),
    # A bool is an int to Python, not a count to a run.
    ({"T": True}, "T must be an integer"), ({"epochs": True}, "epochs must be an integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"), ({"seed": False}, "seed must be an integer"),
    ({"workers": True}, "workers must be an integer"),
    # A config built in Python: a string is no number, and "false" would switch a flag on.
    ({"lr": "0.1"}, "lr must be a number, got '0.1'"), ({"tau": True}, "tau must be a number"),
    ({"signed_factor": "false"}, "signed_factor must be true or false, got 'false'"),
    ({"fused_neuron": 1}, "fused_neuron must be true or false"),
    ({"device": 0}, "device must be a string, got 0"), ({"data_root": 3}, "data_root must be a folder or None"),
    # An empty name would read as none given, and $NDOT_DATA's folder be read instead.
    ({"data_root": ""}, "data_root must be a folder or None, got ''"),
])
def test_each_range_is_refused_just_past_its_edge(kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize("kw", [
    # ... and accepted on its edge: the limits the help and the messages state are inclusive where they say so.
    {"T": MAX_T}, {"epochs": MAX_EPOCHS}, {"seed": 2**32 - 1}, {"workers": 0}, {"workers": MAX_WORKERS}, {"momentum": 0.0},
    {"loss_alpha": 0.0}, {"loss_alpha": 1.0}, {"lr": FLOAT32_MAX}, {"surrogate_alpha": FLOAT32_MAX}, {"v_th": FLOAT32_MAX},
    {"dropout": 0.0}, {"batch_size": 1},
])
def test_each_range_accepts_its_edge(kw):
    TrainConfig(**kw).validate()


def test_a_folder_given_as_a_path_is_kept_as_text_that_a_checkpoint_loads(tmp_path):
    cfg = TrainConfig(data_root=tmp_path, lr=1, tau=3).validate()  # ints where floats are: numbers alike
    assert cfg.data_root == str(tmp_path)
    checkpoint.save(tmp_path / "c.pt", {"config": cfg.to_dict()})
    assert checkpoint.load(tmp_path / "c.pt")["config"]["data_root"] == str(tmp_path)


def test_parse_method_splits_at_the_last_underscore():
    # Rule names hold underscores themselves (ndot_ref): the mode is what follows the last one.
    assert parse_method("ndot_ref_O") == {"rule": "ndot_ref", "mode": "O"}
    assert parse_method("bptt_A") == {"rule": "bptt", "mode": "A"}
    for bad in ("ndot", "_A"):
        with pytest.raises(ValueError, match="RULE_MODE"):
            parse_method(bad)
    # A rule whose own name holds an underscore, without its mode: not "unknown mode 'ref'".
    with pytest.raises(ValueError, match=r"^rule 'ndot_ref' needs its mode, written RULE_MODE: ndot_ref_A or ndot_ref_O$"):
        parse_method("ndot_ref")
    with pytest.raises(ValueError, match=r"^rule 'bptt' needs its mode, written RULE_MODE: bptt_A$"):
        parse_method("bptt")


def test_parse_field_reads_each_kind_of_field_from_command_line_text():
    assert [parse_field("crop", t) for t in ("true", "Yes", "on", "1")] == [True] * 4
    assert [parse_field("crop", t) for t in ("false", "NO", "off", "0")] == [False] * 4
    assert (parse_field("T", "4"), parse_field("lr", "0.05"), parse_field("rule", "ottt")) == (4, 0.05, "ottt")
    for name, text, words in [("crop", "maybe", "crop is true or false"), ("T", "4.5", "T is a number (int)"),
                              ("lr", "fast", "lr is a number (float)"), ("tua", "2", "unknown setting 'tua'")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_field(name, text)


@pytest.mark.parametrize("name,applies", [("signed_factor", {"ndot"}), ("detach_reset", {"bptt"}),
                                          ("readout_trace", {"ndot", "ndot_ref", "ottt", "sltt"})])
def test_a_rule_flag_is_refused_exactly_where_it_changes_no_rule(name, applies):
    for rule in RULES:
        if rule in applies:
            check_rule_flags({name: True}, [rule], ["A"], [4], str)
        else:
            with pytest.raises(ConfigError, match=f"{name} applies to rule"):
                check_rule_flags({name: True}, [rule], ["A"], [4], str)
        check_rule_flags({name: False}, [rule], ["A"], [4], str)  # off changes nothing anywhere: never refused
    check_rule_flags({name: True}, list(RULES), ["A"], [4], str)  # a sweep over every rule: some rule uses it


def test_weight_change_is_refused_where_no_mode_O_reads_it_and_turned_off_there():
    # In mode A, W does not change inside a batch: the term is zero.
    with pytest.raises(ConfigError, match="^weight_change applies to mode O only, not A$"):
        check_rule_flags({"weight_change": 0.025}, ["ndot"], ["A"], [4], str)
    for rule in ONLINE_RULES:
        check_rule_flags({"weight_change": 0.025}, [rule], ["O"], [4], str)
    check_rule_flags({"weight_change": 0.025}, ["ndot", "bptt"], ["A", "O"], [4], str)
    check_rule_flags({"weight_change": 0.0}, ["ndot"], ["A"], [4], str)
    assert rule_flags_off({"rule": "ndot", "mode": "A", "T": 4}) == {"detach_reset": False, "weight_change": 0.0}
    assert rule_flags_off({"rule": "ndot", "mode": "O", "T": 4}) == {"detach_reset": False}
    for bad in (-0.01, math.inf):
        with pytest.raises(ConfigError, match="weight_change must be"):
            TrainConfig(mode="O", weight_change=bad).validate()


def test_weight_change_is_refused_where_no_T_has_a_previous_step_and_turned_off_there():
    # At T = 1 a batch has no step after its first, where the term is added: it would change nothing.
    with pytest.raises(ConfigError, match="^weight_change applies to T > 1 only, not T = 1: "):
        check_rule_flags({"weight_change": 0.025}, ["ndot"], ["O"], [1], str)
    check_rule_flags({"weight_change": 0.025}, ["ndot"], ["O"], [1, 2], str)  # a sweep over T: T = 2 reads it
    check_rule_flags({"weight_change": 0.0}, ["ndot"], ["O"], [1], str)
    assert rule_flags_off({"rule": "ndot", "mode": "O", "T": 1}) == {"detach_reset": False, "weight_change": 0.0}
    # What a sweep's stratum does not hold (here its rule and mode) leaves the flags that depend on it as they are.
    assert rule_flags_off({"T": 2}) == {} and rule_flags_off({"T": 1}) == {"weight_change": 0.0}
    assert rule_flags_off({"rule": "ndot", "mode": "O"}) == {"detach_reset": False}  # T is the sweep's base T


def test_the_device_resolves_to_what_this_machine_has(monkeypatch):
    from ndot.device import described, resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="torch sees 0 CUDA device"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="torch sees 1 CUDA device"):
        resolve_device("cuda:1")
    # What a results table records: the CUDA device with its model, which "auto" does not say.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU model {index}")
    assert [described(torch.device(d)) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda:0 GPU model 0", "cuda:1 GPU model 1"]
    for name in ("mps", "meta", "gpu"):
        with pytest.raises(ConfigError, match="device must be 'auto', 'cpu' or 'cuda"):
            resolve_device(name)
