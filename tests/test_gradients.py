"""Gradient equivalences of the spec (§2): exact in float64."""
import pytest

from helpers import assert_close, batch, grads, make_model
from ndot.config import RULES
from ndot.layers import neurons


# VGG-11-WS with a threshold of 0.5: at 1.0 no spike reaches its last four convs in one step, and their
# gradients would compare nothing.
@pytest.mark.parametrize("arch, neuron", [("small_cnn", {}), ("resnet_ws", {}), ("vgg11_ws", {"v_th": 0.5})])
def test_t1_all_rules_agree(arch, neuron):
    # Spec §2: with one step there is no temporal path, so every online rule, in either mode, is BPTT.
    x, y = batch(size=16)
    ref = None
    for rule, mode in [(rule, "A") for rule in RULES] + [(rule, "O") for rule in RULES if rule != "bptt"]:
        g = grads(make_model(arch, rule, **neuron), rule, mode, x, y, T=1)
        assert all(v.abs().sum() > 0 for k, v in g.items() if k.endswith("weight")), f"{rule}_{mode}: a zero weight gradient"
        if ref is None:
            ref = g
            continue
        for name in ref:
            assert_close(g[name], ref[name], 1e-9, f"{rule}_{mode} {name}")


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


def test_readout_trace_reads_the_last_layers_trace_and_changes_nothing_else():
    """--readout_trace (the authors' readout): W_out's gradient is Σ_t g_o[t] GAP(â[t])ᵀ, with OTTT's
    â[t] = Σ_k λ^(t-k) c·s[k] written out here; every other gradient is the default's."""
    x, y = batch(size=16)
    T, lam = 4, 0.5
    default = grads(make_model(rule="ottt"), "ottt", "A", x, y, T=T)
    model = make_model(rule="ottt")
    model.set_readout_trace(True)
    s_bar, g_o = [], []
    last = list(neurons(model))[-1]
    last.register_forward_hook(lambda m, i, out: s_bar.append(out[0].detach().mean(dim=(2, 3))))
    def keep_output_gradient(module, inputs, o):
        o.register_hook(g_o.append)

    model.register_forward_hook(keep_output_gradient)
    traced = grads(model, "ottt", "A", x, y, T=T)

    a_bar = [sum(lam ** (t - k) * s_bar[k] for k in range(t + 1)) for t in range(T)]
    expect = sum(g_o[t].T @ a_bar[t] for t in range(T))
    assert_close(traced["readout.weight"], expect, 1e-9, "readout.weight")
    assert (traced["readout.weight"] - default["readout.weight"]).abs().max() > 1e-6
    for name in default:
        if name != "readout.weight":
            assert_close(traced[name], default[name], 1e-9, name)


def test_readout_trace_at_t1_is_the_default():
    x, y = batch(size=16)
    model = make_model(rule="ndot")
    model.set_readout_trace(True)
    traced, default = grads(model, "ndot", "A", x, y, T=1), grads(make_model(rule="ndot"), "ndot", "A", x, y, T=1)
    for name in default:
        assert_close(traced[name], default[name], 1e-12, name)
