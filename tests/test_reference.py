"""Whole-network gradients and updates against a second, independent implementation of the spec.

The reference below shares no math with ndot: it writes the LIF neuron, the
surrogate, weight standardisation, the four traces, the loss and SGD with
momentum from the spec's formulas, and it takes an online rule's weight
gradient the authors' way, with a second convolution on the trace whose value
cancels (x·Ŵ.detach() + â·Ŵ − (â·Ŵ).detach()), not with ndot's one traced op.
Only the initial weights, the layer layout and the dropout masks come from the
model under test. float64 throughout, so agreement is to rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, batch, grads, make_model
from ndot.config import RULES
from ndot.layers import neurons
from ndot.step import train_batch

LAM, V_TH, ALPHA, C, EPS, LOSS_ALPHA = 0.5, 1.0, 4.0, 2.74, 1e-4, 0.05

# (parameter prefix, stride) per conv with its neuron, "AP" for a 2x2 average pool, and
# ("block", prefix, stride, shortcut conv?) for a residual block (ndot.models.Block).
LAYOUT = {
    "small_cnn": [("features.0", 1), ("features.2", 2), ("features.4", 2)],
    "vgg11_ws": [("features.0", 1), ("features.2", 1), "AP", ("features.5", 1), ("features.7", 1), "AP",
                 ("features.10", 1), ("features.12", 1), "AP", ("features.15", 1), ("features.17", 1)],
    "resnet_ws": [("features.0.0", 1), ("block", "features.1", 1, False), ("block", "features.2", 2, True),
                  ("block", "features.3", 2, True), ("block", "features.4", 2, True)],
}

def heaviside(x):
    # H(0) = 1 forward; the gradient of sig(αx), i.e. α·sig(αx)(1 − sig(αx)), backward.
    sg = torch.sigmoid(ALPHA * x)
    return (x >= 0).to(x.dtype) + sg - sg.detach()


def standardised(w, gain):
    flat = w.reshape(len(w), -1)
    n = flat.shape[1]
    mean = flat.sum(1) / n
    var = ((flat - mean[:, None]) ** 2).sum(1) / (n - 1)
    return gain * (w - mean[:, None, None, None]) / torch.sqrt(var * n + EPS)[:, None, None, None]


def ndot_factor(num, den):
    # The signed reading of a zero denominator (λ·sign) cannot differ under random inputs: the first
    # one multiplies s[1], which is 0 wherever A[1] < 0, and later ones need A exactly 0.
    # tests/test_traces.py drives it with exact zeros; tests/test_models.py checks that it is wired.
    undefined = den == 0
    ratio = (num / torch.where(undefined, torch.ones_like(den), den)).clamp(-LAM, LAM)
    return torch.where(undefined, torch.full_like(num, LAM), ratio)


def loss(o, y, T):
    n = torch.arange(len(y))
    ce = -(o - torch.logsumexp(o, 1, keepdim=True))[n, y].mean()
    target = torch.zeros_like(o)
    target[n, y] = 1
    mse = ((o - target) ** 2).sum() / o.numel()
    return ((1 - LOSS_ALPHA) * ce + LOSS_ALPHA * mse) / T


def traced(op, x, a, w):
    """op(x, w) in value; its weight gradient from the trace a where there is one, its input gradient through w."""
    if a is None:
        return op(x, w)
    return op(x, w.detach()) + op(a, w) - op(a, w).detach()


def reference_losses(p, layout, x, y, T, rule, readout_trace=False, detach_reset=False, masks=None):
    """Yields each step's loss for an online rule (after which the caller may update p), or BPTT's Σ_t L[t]."""
    online = rule != "bptt"
    state = {}  # per neuron, in the order the network runs them
    total = 0

    def conv(name, h, a, stride, padding=1):
        w_hat = standardised(p[f"{name}.weight"], p[f"{name}.gain"])
        op = lambda inp, w: F.conv2d(inp, w, None, stride, padding)  # noqa: E731
        return traced(op, h, a if online else None, w_hat) + p[f"{name}.bias"][:, None, None]

    def neuron(k, current):
        """Neuron k's (C·s, C·â) for this step's input current; â is None for BPTT."""
        st = state.setdefault(k, dict(A=None, a=None, e=None, q=None))
        A_prev = torch.zeros_like(current) if st["A"] is None else st["A"]
        u = LAM * A_prev + current
        s = heaviside(u - V_TH)
        a = None
        if online:
            sd, A = s.detach(), (u - V_TH * s).detach()
            if rule == "sltt":
                trace = sd
            elif rule == "ottt":
                trace = sd if st["a"] is None else LAM * st["a"] + sd
            elif rule == "ndot":
                trace = sd if st["a"] is None else st["e"] * st["a"] + sd
                st["e"] = ndot_factor(A, A_prev.detach())
            elif rule == "ndot_ref":  # the ratio of A − Vth·s at t and t−1, applied at once
                q = A - V_TH * sd
                e = ndot_factor(q, torch.zeros_like(q) if st["q"] is None else st["q"])
                trace = sd if st["a"] is None else e * st["a"] + sd
                st["q"] = q
            else:
                raise ValueError(f"the reference has no trace for rule {rule!r}")
            st["A"], st["a"] = A, trace
            a = C * trace
        else:
            st["A"] = u - V_TH * (s.detach() if detach_reset else s)
        h = C * s
        if masks is not None:
            h, a = h * masks[k], None if a is None else a * masks[k]
        return h, a

    for _ in range(T):
        h, a, k = x, None, 0
        for layer in layout:
            if layer == "AP":
                h, a = F.avg_pool2d(h, 2), None if a is None else F.avg_pool2d(a, 2)
            elif layer[0] == "block":
                # Its input's spikes feed the first conv and the shortcut (a 1x1 conv, or the spikes
                # themselves); they join the second conv's current before the block's output neuron.
                _, name, stride, shortcut = layer
                h1, a1 = neuron(k, conv(f"{name}.body.0", h, a, stride))
                current = conv(f"{name}.body.2", h1, a1, 1)
                h, a = neuron(k + 1, current + (conv(f"{name}.shortcut", h, a, stride, 0) if shortcut else h))
                k += 2
            else:
                name, stride = layer
                h, a = neuron(k, conv(name, h, a, stride))
                k += 1
        a_out = a.mean((2, 3)) if online and readout_trace else None
        o = traced(lambda inp, w: inp @ w.T, h.mean((2, 3)), a_out, p["readout.weight"]) + p["readout.bias"]
        if online:
            yield loss(o, y, T)
        else:
            total = total + loss(o, y, T)
    if not online:
        yield total

def leaves(model):
    return {n: q.detach().clone().requires_grad_(True) for n, q in model.named_parameters()}


def summed_grads(model, rule, x, y, T, **kw):
    return grads(model, rule, "A", x, y, T, detach_reset=kw.get("detach_reset", False))


def assert_gradients_equal_the_reference(model, arch, rule, x, y, T, **kw):
    """Σ_t of the model's weight gradients against the reference's; returns the reference's parameters."""
    p = leaves(model)
    got = summed_grads(model, rule, x, y, T, **kw)
    for step_loss in reference_losses(p, LAYOUT[arch], x, y, T, rule, **kw):
        step_loss.backward()
    for name, g in got.items():
        assert_close(g, p[name].grad, 1e-10, name)
    return p


VARIANTS = [(rule, {}) for rule in RULES] + [
    ("ndot", {"readout_trace": True}), ("ndot_ref", {"readout_trace": True}),
    ("bptt", {"detach_reset": True}),
]


@pytest.mark.parametrize("rule,kw", VARIANTS, ids=[f"{r}-{'-'.join(kw) or 'default'}" for r, kw in VARIANTS])
def test_gradients_equal_the_reference(rule, kw):
    x, y = batch(size=16)
    model = make_model(rule=rule)
    model.set_readout_trace(kw.get("readout_trace", False))
    p = assert_gradients_equal_the_reference(model, "small_cnn", rule, x, y, 5, **kw)
    for name, q in p.items():
        assert q.grad.abs().sum() > 0, f"{name}: zero reference gradient, the check would be empty"


@pytest.mark.parametrize("rule", ["ndot", "ndot_ref"])
def test_vgg11_ws_gradients_equal_the_reference(rule):
    # The pools act on the trace as on the spikes. The last spiking layer is quiet at initialisation
    # (its weight gradient and the readout's are zero on both sides); the one before it, behind
    # all three pools, must not be.
    x, y = batch(n=2, c=3, size=16)
    p = assert_gradients_equal_the_reference(make_model("vgg11_ws", rule=rule, in_channels=3), "vgg11_ws", rule, x, y, 3)
    assert p["features.15.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("rule", ["ndot", "ottt", "bptt"])
def test_resnet_ws_gradients_equal_the_reference(rule):
    # A block's input trace drives the weight gradients of its first conv and of its shortcut conv;
    # at T > 1 the trace is not the spikes, so a conv reading the spikes instead would show here.
    x, y = batch(n=2, size=16, seed=3)
    p = assert_gradients_equal_the_reference(make_model("resnet_ws", rule=rule), "resnet_ws", rule, x, y, 3)
    for name in ("features.1.body.0.weight", "features.2.body.0.weight", "features.2.shortcut.weight"):
        assert p[name].grad.abs().sum() > 0, f"{name}: zero gradient, the check would be empty"


@pytest.mark.parametrize("rule", ["ndot", "ottt"])
def test_dropout_gradients_equal_the_reference(rule):
    # One mask per neuron for the whole sequence, scaling spikes and trace alike.
    x, y = batch(size=16)
    model = make_model(rule=rule, dropout=0.3)
    p = leaves(model)
    drawn = {}  # each neuron's mask, drawn at its first step and kept for the sequence

    def keep_mask(n, inputs, output):
        drawn.setdefault(n, n.state["mask"])

    for n in neurons(model):
        n.register_forward_hook(keep_mask)
    got = summed_grads(model, rule, x, y, T=4)
    masks = [drawn[n] for n in neurons(model)]
    assert sorted(torch.cat([m.flatten() for m in masks]).unique().tolist()) == pytest.approx([0.0, 1 / 0.7])
    for step_loss in reference_losses(p, LAYOUT["small_cnn"], x, y, 4, rule, masks=masks):
        step_loss.backward()
    for name, g in got.items():
        assert_close(g, p[name].grad, 1e-10, name)


@pytest.mark.parametrize("rule,mode", [("ndot", "O"), ("ndot_ref", "O"), ("ottt", "O"), ("ndot", "A"), ("bptt", "A")])
def test_updates_equal_the_reference(rule, mode):
    """Two batches of SGD (lr 0.1, momentum 0.9): mode O updates after every step, Ŵ read from the new W."""
    lr, momentum, T = 0.1, 0.9, 4
    x, y = batch(size=16)
    batches = [(x, y), (x.flip(-1), y.flip(0))]
    model = make_model(rule=rule)
    p = leaves(model)
    initial = {n: q.detach().clone() for n, q in p.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for xb, yb in batches:
        train_batch(model, opt, xb, yb, rule=rule, mode=mode, T=T, loss_alpha=LOSS_ALPHA)

    velocity: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def sgd():
        for name, q in p.items():
            velocity[name] = q.grad.clone() if name not in velocity else momentum * velocity[name] + q.grad
            q -= lr * velocity[name]
            q.grad = None

    for xb, yb in batches:
        for step_loss in reference_losses(p, LAYOUT["small_cnn"], xb, yb, T, rule):
            step_loss.backward()
            if mode == "O":
                sgd()
        if mode == "A":
            sgd()
    assert len(velocity) == len(p)
    for name, q in model.named_parameters():
        assert not torch.equal(q.detach(), initial[name]), f"{name} never moved"
        assert_close(q.detach(), p[name].detach(), 1e-10, name)
