"""Gradient equivalences of the spec (§2): exact in float64."""
import pytest
import torch

from helpers import assert_close, batch, grads, make_model

RULES = ["ndot", "ndot_ref", "ottt", "sltt", "bptt"]


@pytest.mark.parametrize("arch", ["small_cnn", "resnet_ws"])
def test_t1_all_rules_agree(arch):
    x, y = batch(size=16)
    ref = None
    for rule in RULES:
        g = grads(make_model(arch, rule), rule, "A", x, y, T=1)
        assert all(v.abs().sum() > 0 for k, v in g.items() if k.endswith("weight")), f"{rule}: a zero weight gradient"
        if ref is None:
            ref = g
            continue
        for name in ref:
            assert_close(g[name], ref[name], 1e-9, f"{rule} {name}")


def test_ottt_a_last_layer_and_readout_equal_bptt_with_detached_reset():
    x, y = batch(size=16)
    T = 4
    ottt = grads(make_model(rule="ottt"), "ottt", "A", x, y, T=T)
    bptt = grads(make_model(rule="bptt"), "bptt", "A", x, y, T=T, detach_reset=True)
    last = "features.4"  # the last WS conv of small_cnn
    for name in [f"{last}.weight", f"{last}.gain", "readout.weight", "readout.bias"]:
        assert ottt[name].abs().sum() > 0
        assert_close(ottt[name], bptt[name], 1e-9, name)
    # Earlier layers differ: BPTT also carries the temporal path of the later layers.
    diff = (ottt["features.0.weight"] - bptt["features.0.weight"]).abs().max()
    assert diff > 1e-6


def test_rules_differ_beyond_t1():
    x, y = batch(size=16)
    g = {r: grads(make_model(rule=r), r, "A", x, y, T=4)["features.2.weight"] for r in RULES}
    for a in RULES:
        for b in RULES:
            if a < b:
                assert (g[a] - g[b]).abs().max() > 1e-8, f"{a} and {b} gave the same gradient at T=4"
