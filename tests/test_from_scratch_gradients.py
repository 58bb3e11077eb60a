"""Parameter gradients of every rule against the spec's closed forms, computed from scratch.

A second, independent check beside tests/test_reference.py, on a tiny network
(WS conv 2->4 -> LIF -> WS conv 4->4 -> LIF -> GAP -> Linear, batch 2, T = 4 frames, float64).
Nothing of ndot's math is used on the reference side: the neuron, the surrogate,
the standardisation and the loss are written here from spec §1-§4, and an online
rule's weight gradient is not taken by autograd through a traced op but assembled
from the spec's formula ∂L[t]/∂Ŵ = g[t] · â[t]ᵀ, with

  * g[t] = ∂L[t]/∂I[t], the gradient at the layer's input current, from autograd over
    a one-step graph whose membrane state is a detached constant (spec §1),
  * â[t] written as the explicit sum Σ_k (Π factors) s[k] (spec §2's product, not the
    recursion ndot runs), with the factor of each rule from its definition,
  * the Ŵ gradient pushed through the standardisation step by step (ndot pushes the
    sum once per batch in mode A).

BPTT is plain autograd over the whole unrolled graph. ndot is driven through its
real training step (ndot.step.train_batch).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ndot.layers import LIF, Seq, WSConv2d, configure
from ndot.models import SpikingNet
from ndot.step import train_batch

LAM, VTH, ALPHA, C, EPS, LOSS_ALPHA = 0.5, 1.0, 4.0, 2.74, 1e-4, 0.05
CONVS = ("features.0", "features.2")
ONLINE = ("ndot", "ndot_ref", "ottt", "sltt")
RTOL = 1e-12


# ---------------------------------------------------------------- the model under test

def tiny_model(rule: str, seed: int = 0) -> SpikingNet:
    torch.manual_seed(seed)
    features = Seq(WSConv2d(2, 4), LIF(out_scale=C), WSConv2d(4, 4), LIF(out_scale=C))
    m = SpikingNet(features, 4, 3).double()
    configure(m, rule)
    return m


def tiny_batch(seed: int = 1):
    """Event-style input, a different frame per step [B, T, C, H, W]: with one static image, layer 1's
    potentials rarely change sign and NDOT's factor is nearly always the clamp's λ."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(2, 4, 2, 5, 5, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 2])


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (no momentum) that keeps a copy of the gradient of every step it takes."""

    def __init__(self, params, lr):
        self.names, params = zip(*params)
        super().__init__(params, lr=lr)
        self.records: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.records.append({n: p.grad.clone() for n, p in zip(self.names, self.param_groups[0]["params"])})
        super().step()


def ndot_run(rule, mode, x, y, T, lr=0.0, readout_trace=False, detach_reset=False):
    m = tiny_model(rule)
    m.set_readout_trace(readout_trace)
    configure(m, rule, detach_reset=detach_reset)
    opt = RecordingSGD(m.named_parameters(), lr)
    train_batch(m, opt, x, y, rule=rule, mode=mode, T=T, loss_alpha=LOSS_ALPHA)
    return opt.records


def summed(records):
    return {n: sum(r[n] for r in records) for n in records[0]}


# ---------------------------------------------------------------- the spec, from scratch

class Heaviside(torch.autograd.Function):
    """H(x), H(0) = 1; backward α·sig(αx)·(1 - sig(αx)) (spec §1)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), torch.zeros_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        sg = 1.0 / (1.0 + torch.exp(-ALPHA * x))
        return g * ALPHA * sg * (1.0 - sg)


def ws(w, gain):
    """Ŵ = gain (W - mean) / sqrt(var fan_in + eps), unbiased var per output channel (spec §4)."""
    n = w[0].numel()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.sum(1, keepdim=True) / n
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / (n - 1)
    return (gain.reshape(-1, 1) * (flat - mean) / (var * n + EPS).sqrt()).reshape(w.shape)


def loss_fn(o, y, T):
    logp = o - o.exp().sum(1, keepdim=True).log()
    ce = -logp[torch.arange(len(y)), y].mean()
    onehot = torch.zeros_like(o)
    onehot[torch.arange(len(y)), y] = 1.0
    return ((1 - LOSS_ALPHA) * ce + LOSS_ALPHA * ((o - onehot) ** 2).mean()) / T


def ratio(num, den):
    """clamp(num / den, -λ, λ), λ where den = 0 or the ratio is not finite (the spec's default)."""
    r = num / torch.where(den == 0, torch.ones_like(den), den)
    r = torch.where(torch.isfinite(r), r.clamp(-LAM, LAM), torch.full_like(r, LAM))
    return torch.where(den == 0, torch.full_like(r, LAM), r)


def closed_trace(rule, s, A, t):
    """â[t] = Σ_{k<=t} coef(k, t) s[k] from the spike and post-reset histories s[0..t], A[0..t] (0-indexed)."""
    zero = torch.zeros_like(s[0])
    A_at = lambda i: zero if i < 0 else A[i]  # noqa: E731   A before the first step is 0
    q_at = lambda i: zero if i < 0 else A[i] - VTH * s[i]  # noqa: E731   the authors' q = A - Vth s
    total = torch.zeros_like(s[0])
    for k in range(t + 1):
        coef = torch.ones_like(s[0])
        if rule == "sltt":
            coef = coef * (1.0 if k == t else 0.0)
        elif rule == "ottt":
            coef = coef * LAM ** (t - k)
        elif rule == "ndot":  # Π_{i=k}^{t-1} e[i], e[i] = clamp(A[i] / A[i-1])
            for i in range(k, t):
                coef = coef * ratio(A_at(i), A_at(i - 1))
        elif rule == "ndot_ref":  # Π_{i=k+1}^{t} e_ref[i], e_ref[i] = clamp(q[i] / q[i-1])
            for i in range(k + 1, t + 1):
                coef = coef * ratio(q_at(i), q_at(i - 1))
        else:
            raise ValueError(rule)
        total = total + coef * s[k]
    return total


def leaves(model):
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def online_reference(p, rule, mode, x, y, T, lr=0.0, readout_trace=False):
    """Per-step gradients of an online rule by the spec's formula; mode O updates p (SGD, lr) after each step."""
    hist = {c: {"s": [], "A": []} for c in CONVS}
    records = []
    for t in range(T):
        w_hat = {c: ws(p[f"{c}.weight"], p[f"{c}.gain"]) for c in CONVS}
        # One step's graph in which the parameters are constants and the previous A is a constant too
        # (online rules cut every temporal path): what autograd gives here is g[t] at each current.
        h, currents = x[:, t], {}
        for i, c in enumerate(CONVS):
            I = F.conv2d(h, w_hat[c].detach(), None, 1, 1) + p[f"{c}.bias"].detach()[:, None, None]
            if i == 0:
                I = I.requires_grad_(True)  # x is data: the first current is where the graph starts
            currents[c] = I
            A_prev = hist[c]["A"][-1] if hist[c]["A"] else torch.zeros_like(I)
            u = LAM * A_prev + I
            s = Heaviside.apply(u - VTH)
            hist[c]["s"].append(s.detach())
            hist[c]["A"].append((u - VTH * s).detach())
            h = C * s
        o = h.mean((2, 3)) @ p["readout.weight"].detach().T + p["readout.bias"].detach()
        *g_cur, g_o = torch.autograd.grad(loss_fn(o, y, T), [currents[c] for c in CONVS] + [o])
        g_I = dict(zip(CONVS, g_cur))
        step = {}
        for i, c in enumerate(CONVS):
            if i == 0:
                a_in = x[:, t]  # the first layer reads its real-valued input, no trace
            else:
                prev = CONVS[i - 1]
                a_in = C * closed_trace(rule, hist[prev]["s"], hist[prev]["A"], t)
            g_w_hat = torch.nn.grad.conv2d_weight(a_in, w_hat[c].shape, g_I[c], 1, 1)
            gw, gg = torch.autograd.grad(w_hat[c], [p[f"{c}.weight"], p[f"{c}.gain"]], g_w_hat)
            step[f"{c}.weight"], step[f"{c}.gain"], step[f"{c}.bias"] = gw, gg, g_I[c].sum((0, 2, 3))
        last = CONVS[-1]
        r = C * (closed_trace(rule, hist[last]["s"], hist[last]["A"], t) if readout_trace else hist[last]["s"][t])
        step["readout.weight"] = g_o.T @ r.mean((2, 3))
        step["readout.bias"] = g_o.sum(0)
        records.append(step)
        if mode == "O":
            with torch.no_grad():
                for n, q in p.items():
                    q -= lr * step[n]
    return records


def bptt_reference(p, x, y, T, detach_reset=False):
    """Σ_t L[t] through the whole unrolled graph; its parameter gradients by plain autograd."""
    A = {c: None for c in CONVS}
    total = 0.0
    for t in range(T):
        h = x[:, t]
        for c in CONVS:
            I = F.conv2d(h, ws(p[f"{c}.weight"], p[f"{c}.gain"]), p[f"{c}.bias"], 1, 1)
            u = I if A[c] is None else LAM * A[c] + I
            s = Heaviside.apply(u - VTH)
            A[c] = u - VTH * (s.detach() if detach_reset else s)
            h = C * s
        total = total + loss_fn(h.mean((2, 3)) @ p["readout.weight"].T + p["readout.bias"], y, T)
    names = list(p)
    return dict(zip(names, torch.autograd.grad(total, [p[n] for n in names])))


def assert_close(got, want, rtol=RTOL, what=""):
    for n in want:
        scale = max(got[n].abs().max().item(), want[n].abs().max().item())
        err = (got[n] - want[n]).abs().max().item()
        assert err <= rtol * scale + 1e-300, f"{what} {n}: max abs error {err:.3e}, scale {scale:.3e}"


# ---------------------------------------------------------------- the checks

def test_the_tiny_dynamics_exercise_what_the_checks_are_about():
    # Layer 1 fires and is silent at every step, and NDOT's factors are neither all λ nor all clamped:
    # otherwise NDOT would equal OTTT here and the comparisons below would tell nothing apart.
    x, y = tiny_batch()
    p = leaves(tiny_model("ndot"))
    hist = []
    A = None
    for t in range(4):
        I = F.conv2d(x[:, t], ws(p["features.0.weight"], p["features.0.gain"]), p["features.0.bias"], 1, 1).detach()
        u = I if A is None else LAM * A + I
        s = (u >= VTH).double()
        hist.append((s, u - VTH * s))
        A = u - VTH * s
    for s, _ in hist:
        assert 0.1 < s.mean() < 0.9
    e = torch.stack([ratio(hist[t][1], hist[t - 1][1]) for t in range(1, 4)])
    inside = (e.abs() < LAM).double().mean()
    assert 0.05 < inside < 0.95 and (e < 0).any()


@pytest.mark.parametrize("readout_trace", [False, True])
@pytest.mark.parametrize("rule", ONLINE)
def test_mode_a_equals_the_closed_form(rule, readout_trace):
    """Mode A: Σ_t g[t] â[t]ᵀ with â the explicit product sum, Ŵ's backward per step, to 1e-12."""
    x, y = tiny_batch()
    T = 4
    got = summed(ndot_run(rule, "A", x, y, T, readout_trace=readout_trace))
    want = summed(online_reference(leaves(tiny_model(rule)), rule, "A", x, y, T, readout_trace=readout_trace))
    for n, g in want.items():
        assert g.abs().sum() > 0, f"{n}: zero reference gradient"
    assert_close(got, want, what=f"{rule}_A")


@pytest.mark.parametrize("rule", ONLINE)
def test_mode_o_per_step_gradients_equal_the_closed_form_on_the_updated_weights(rule):
    """Mode O: the gradient of each step, taken at the weights the previous step's update left (lr 0.5)."""
    x, y = tiny_batch()
    T, lr = 4, 0.5
    got = ndot_run(rule, "O", x, y, T, lr=lr)
    want = online_reference(leaves(tiny_model(rule)), rule, "O", x, y, T, lr=lr)
    assert len(got) == len(want) == T
    for t in range(T):
        assert_close(got[t], want[t], what=f"{rule}_O step {t + 1}")
    # The updates mattered: the same steps at lr 0 give other gradients by the last step.
    frozen = online_reference(leaves(tiny_model(rule)), rule, "O", x, y, T, lr=0.0)
    assert (frozen[-1]["features.2.weight"] - want[-1]["features.2.weight"]).abs().max() > 1e-6


def test_rules_differ_on_the_tiny_network():
    x, y = tiny_batch()
    g = {r: summed(ndot_run(r, "A", x, y, 4))["features.2.weight"] for r in ONLINE}
    for a in ONLINE:
        for b in ONLINE:
            if a < b:
                assert (g[a] - g[b]).abs().max() > 1e-6, (a, b)


@pytest.mark.parametrize("detach_reset", [False, True])
def test_bptt_equals_autograd_over_the_unrolled_graph(detach_reset):
    x, y = tiny_batch()
    got = summed(ndot_run("bptt", "A", x, y, 4, detach_reset=detach_reset))
    want = bptt_reference(leaves(tiny_model("bptt")), x, y, 4, detach_reset=detach_reset)
    assert_close(got, want, what="bptt")


@pytest.mark.parametrize("rule,mode", [(r, m) for r in ONLINE for m in "AO"] + [("bptt", "A")])
def test_at_t1_every_rule_equals_bptt_from_scratch(rule, mode):
    x, y = tiny_batch()
    got = summed(ndot_run(rule, mode, x, y, 1))
    want = bptt_reference(leaves(tiny_model(rule)), x, y, 1)
    assert all(v.abs().sum() > 0 for v in want.values())
    assert_close(got, want, what=f"{rule}_{mode} T=1")


def test_ottt_a_last_layer_and_readout_equal_bptt_with_detached_reset_from_scratch():
    # With the reset detached, ∂u[t]/∂u[k] = λ^(t-k): BPTT's gradient of the last spiking layer's weights
    # is Σ_t g[t] (Σ_k λ^(t-k) s[k])ᵀ, OTTT's, and the readout's has no temporal path at all.
    x, y = tiny_batch()
    got = summed(ndot_run("ottt", "A", x, y, 4))
    want = bptt_reference(leaves(tiny_model("ottt")), x, y, 4, detach_reset=True)
    assert_close(got, {n: want[n] for n in ("features.2.weight", "features.2.gain", "readout.weight", "readout.bias")},
                 what="ottt_A vs bptt(detached)")
    assert (got["features.0.weight"] - want["features.0.weight"]).abs().max() > 1e-6
    # Not the bias: its input is the constant 1, which BPTT weighs by Σ_k λ^(t-k) and every online rule by
    # 1 (g[t] alone, as in the authors' code; the spec gives the weights' formula only). Written out:
    T, ones = 4, torch.ones(())
    ref = online_reference(leaves(tiny_model("ottt")), "ottt", "A", x, y, T)
    traced_bias = sum(sum(LAM ** (t - k) for k in range(t + 1)) * ref[t]["features.2.bias"] for t in range(T))
    assert_close({"b": traced_bias * ones}, {"b": want["features.2.bias"]}, what="bias with a trace of 1")
    assert (got["features.2.bias"] - want["features.2.bias"]).abs().max() > 1e-6
