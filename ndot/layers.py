"""Modules of a spiking network. Each maps a pair (x, â) to a pair (y, â').

x is what the forward computes with (an image, a current, spikes); â is the
presynaptic trace that travels beside the spikes during online training, or
None (evaluation, BPTT, and the real-valued input of the first layer).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ndot.config import RULES
from ndot.neuron import Step, neuron_step
from ndot.ops import traced_conv2d

Pair = tuple[Tensor, Tensor | None]


def standardise(w: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Scaled weight standardisation: Ŵ = gain (W - mean) / sqrt(var · fan_in + eps), per output channel."""
    fan_in = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=True)
    return gain * (w - mean) / torch.sqrt(var * fan_in + eps)


class WSConv2d(nn.Conv2d):
    """Conv with scaled weight standardisation (`standardise`)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1, eps: float = 1e-4) -> None:
        if c_in * kernel_size**2 < 2:
            # One weight per output channel: W - mean is 0 and its unbiased variance NaN, so Ŵ would be NaN
            # (and with any variance, 0): the standardisation leaves nothing to learn.
            raise ValueError(f"scaled weight standardisation needs at least 2 weights per output channel, "
                             f"got {c_in} input channel(s) x {kernel_size}x{kernel_size}")
        super().__init__(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=True)
        self.gain = nn.Parameter(torch.ones(c_out, 1, 1, 1))
        self.eps = eps
        # Set by `standardised_weights` so that Ŵ is computed once per optimiser step.
        self.w_hat: Tensor | None = None
        # ndot.fast swaps in a compiled version of the same function.
        self.standardise_fn: Callable[[Tensor, Tensor, float], Tensor] = standardise

    def standardise(self) -> Tensor:
        return self.standardise_fn(self.weight, self.gain, self.eps)

    def forward(self, x: Tensor, a: Tensor | None = None) -> Pair:  # type: ignore[override]
        w = self.w_hat if self.w_hat is not None else self.standardise()
        if a is None:
            return F.conv2d(x, w, self.bias, self.stride, self.padding), None
        return traced_conv2d(x, a, w, self.bias, self.stride[0], self.padding[0]), None


class LIF(nn.Module):
    """LIF neurons with soft reset; keeps the membrane (v: u, or A for BPTT), the trace and the NDOT factor (e; q for ndot_ref) between steps.

    The state is dropped by `reset_state` at the first step of every batch.
    `rule` picks the gradient rule: an online rule detaches the state and, in
    training, emits the trace; "bptt" keeps the graph through time.
    An online rule updates its trace in place, so each step's backward must run
    before the next step (as ndot.step does); autograd refuses a backward through
    a trace that a later step has overwritten.
    """

    def __init__(self, tau: float = 2.0, v_th: float = 1.0, alpha: float = 4.0, dropout: float = 0.0, out_scale: float = 1.0) -> None:
        super().__init__()
        if not tau > 1:  # as TrainConfig refuses it: tau 0 divided by zero, any other tau <= 1 gave lambda outside (0, 1)
            raise ValueError(f"tau must be > 1 (lambda = 1 - 1/tau in (0, 1)), got {tau!r}")
        self.lam = 1.0 - 1.0 / tau
        self.v_th = v_th
        self.alpha = alpha
        self.dropout = dropout
        # The constant the network multiplies spikes by (the 2.74 of scaled WS): emitted with s
        # and â by the step itself, so the fused kernel does it instead of two more passes.
        self.out_scale = out_scale
        self.rule = "ndot"
        self.signed = False
        self.detach_reset = False
        # False where nothing downstream reads the trace (the neuron before the readout).
        self.emit_trace = True
        self.state: dict[str, Tensor | None] | None = None
        # The elementwise work of one step; ndot.fast swaps in a compiled version of the same function.
        self.step_fn: Callable[..., Step] = neuron_step
        # Spike counts for the mean firing rate, accumulated in evaluation only. Integers: a float32 sum
        # rounds once past 2**24 (a VGG layer's count over a test set is ~1e8).
        self.spikes = torch.zeros((), dtype=torch.long)
        self.neuron_steps = 0

    def forward(self, current: Tensor, a_in: Tensor | None = None) -> Pair:
        # a_in, the trace of the spikes before the synapse, was spent there: the neuron emits its own.
        if not isinstance(current, Tensor):
            # A layer's (y, trace) pair handed on whole, as nn.Sequential does: it failed inside the step.
            raise TypeError(f"LIF takes a current tensor, got {type(current).__name__}: ndot's layers pass "
                            "(x, trace) pairs, chained by ndot.layers.Seq, not nn.Sequential")
        first = self.state is None
        if not first and self.state["v"].shape != current.shape:
            # The state of another batch: it failed inside the membrane update as a size mismatch.
            raise ValueError(f"the neurons hold the state of a batch of shape {list(self.state['v'].shape)}, "
                             f"not {list(current.shape)}: ndot.layers.reset_state(model) drops it before a new batch")
        # At t = 1 there is no state: A[0] = 0 and no trace yet (neuron_step takes None for each).
        st = {} if first else self.state
        if first and self.training and self.dropout > 0:
            # In the state's dtype (fp32 at least): a bf16 mask would round 1/(1-p) (1.109375 for p = 0.1).
            dtype = torch.promote_types(current.dtype, torch.float32)
            # Drawn in NCHW order, which the generator fills in, then laid out as the current: drawn into
            # NHWC memory, the same generator would drop other neurons under channels_last.
            keep = torch.empty(current.shape, dtype=dtype, device=current.device).bernoulli_(1 - self.dropout)
            st["mask"] = torch.empty_like(current, dtype=dtype).copy_(keep).div_(1 - self.dropout)
        online = self.rule != "bptt"
        trace = online and self.training and self.emit_trace
        s, v, a, e = self.step_fn(
            current, st.get("v"), st.get("a"), st.get("e"),
            rule=self.rule, lam=self.lam, v_th=self.v_th, alpha=self.alpha, signed=self.signed,
            detach_reset=self.detach_reset, through_time=not online and self.training, trace=trace,
            out_scale=self.out_scale,
        )
        self.state = {"v": v, "mask": st.get("mask")}
        if trace:
            # SLTT's trace is s itself: the next step reads nothing of it.
            self.state.update(a=None if self.rule == "sltt" else a, e=e)

        if not self.training:
            self.spikes = self.spikes.to(s.device) + torch.count_nonzero(s.detach())
            self.neuron_steps += s.numel()
        mask = self.state["mask"]
        if mask is not None:
            s = s * mask
            a = None if a is None else a * mask
        return s, a


class Both(nn.Module):
    """A linear, parameter-free op (pooling) applied to the spikes and to their trace alike."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: Tensor, a: Tensor | None = None) -> Pair:
        return self.fn(x), (None if a is None else self.fn(a))


def avg_pool(k: int = 2) -> Both:
    """k x k average pooling of the spikes and of their trace."""
    return Both(lambda x: F.avg_pool2d(x, k), f"avg_pool={k}")


class Seq(nn.Sequential):
    """nn.Sequential for this module's layers: hands each one's (x, â) pair on to the next as two arguments."""

    def forward(self, x: Tensor, a: Tensor | None = None) -> Pair:  # type: ignore[override]
        for m in self:
            x, a = m(x, a)
        return x, a


def neurons(model: nn.Module) -> Iterator[LIF]:
    """The spiking layers (LIF) of `model`, in module order."""
    return (m for m in model.modules() if isinstance(m, LIF))


def configure(model: nn.Module, rule: str, signed: bool = False, detach_reset: bool = False) -> None:
    """Set the gradient rule of every spiking layer, with NDOT's signed factor and BPTT's detached reset."""
    if rule not in RULES:
        # Caught here, not at the first training step, where the neuron would find no trace for it.
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
    for n in neurons(model):
        n.rule, n.signed, n.detach_reset = rule, signed, detach_reset


def reset_state(model: nn.Module) -> None:
    """Drop every neuron's state (u, â, e, dropout mask): the next call is step t = 1 of a new batch.

    ndot.step's train_batch and eval_batch call it first; a loop of your own over time steps calls it
    before each batch.
    """
    for n in neurons(model):
        n.state = None


def layer_firing_rates(model: nn.Module) -> dict[str, float]:
    """Spikes per neuron per step of each spiking layer, by module name, over what it ran in evaluation."""
    return {name: float(m.spikes.item()) / m.neuron_steps
            for name, m in model.named_modules() if isinstance(m, LIF) and m.neuron_steps}


def firing_rate(model: nn.Module) -> float:
    """Mean spikes per neuron per step over what the network ran in evaluation since clear_spike_counts."""
    ns = list(neurons(model))
    steps = sum(n.neuron_steps for n in ns)
    return float(sum(n.spikes.item() for n in ns)) / steps if steps else 0.0


def clear_spike_counts(model: nn.Module) -> None:
    """Forget the spikes counted so far, which firing_rate and layer_firing_rates read."""
    for n in neurons(model):
        n.spikes, n.neuron_steps = torch.zeros((), dtype=torch.long), 0


@contextlib.contextmanager
def standardised_weights(model: nn.Module) -> Iterator[None]:
    """Compute every Ŵ once for the steps inside the block.

    Within one optimiser step W does not change, so Ŵ is the same at every time
    step: the block's backward passes accumulate the gradient w.r.t. Ŵ in a
    detached leaf, and the exit pushes the sum through the standardisation once.
    The exit rebuilds each Ŵ's graph, one layer at a time, rather than keep them
    all through the block: their intermediates are two copies of the weights,
    which would be held while every step runs.
    """
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    grad_on = torch.is_grad_enabled()
    with torch.no_grad():
        for m in convs:
            m.w_hat = m.standardise().requires_grad_(grad_on)
    try:
        yield
        pending = [(m, m.w_hat.grad) for m in convs if m.w_hat.grad is not None]
    finally:
        for m in convs:
            m.w_hat = None  # also before the rebuild, which would otherwise hold a second Ŵ beside it
    with torch.enable_grad():
        while pending:
            m, g = pending.pop()
            m.standardise().backward(g)
