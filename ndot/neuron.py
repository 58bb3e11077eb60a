"""The LIF neuron and the presynaptic traces of the online rules, as step functions over explicit state.

    u[t] = λ (u[t-1] - Vth s[t-1]) + I[t]      s[t] = H(u[t] - Vth)      A[t] = u[t] - Vth s[t]

The module `LIF` in ndot.layers holds the state between steps; the functions here
take it and return the next, so they can be tested against independent formulas.
One exception, for memory: an online step writes the trace and the NDOT factor into
the previous step's buffers (trace_step), so the state never holds two steps at once.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ndot.config import ONLINE_RULES


class SpikeFn(torch.autograd.Function):
    """c·H(u - Vth) with H(0) = 1 forward; sigmoid surrogate c·α·sig(αx)(1 - sig(αx)), x = u - Vth, backward.

    It saves u, not x: the neuron keeps u anyway (its state for online rules, a node of the
    graph for BPTT), and x = u - Vth is recomputed exactly. c, the constant the network
    multiplies spikes by, is folded in, so that the scaled spikes are one tensor, not two.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, v_th: float, alpha: float, scale: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.v_th, ctx.alpha, ctx.scale = v_th, alpha, scale
        # H(u - Vth) without the difference: fl(u - Vth) >= 0 exactly when u >= Vth.
        if torch.compiler.is_compiling():
            # Out of place: torch 2.11 returns zero gradients from a compiled Function whose forward
            # writes into its output (out= included); Inductor fuses the mask and the product either way.
            return (u >= v_th).to(u.dtype) * scale
        # Compared straight into u's dtype: a CPU writes and widens a bool mask some nine times slower
        # than this one pass.
        s = torch.ge(u, v_th, out=torch.empty_like(u))
        return s if scale == 1.0 else s.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (u,) = ctx.saved_tensors
        # In place where the arithmetic allows, in the formula's order: the widest layer's backward
        # is where a batch can peak, and each temporary there is a layer of activations.
        sg = (u - ctx.v_th).mul_(ctx.alpha).sigmoid_()
        one_minus = torch.rsub(sg, 1)  # before sg becomes α·sg below
        surrogate = sg.mul_(ctx.alpha).mul_(one_minus)
        return surrogate.mul_(grad * ctx.scale if ctx.scale != 1.0 else grad), None, None, None


def spike(u: Tensor, v_th: float, alpha: float, scale: float = 1.0) -> Tensor:
    """scale·H(u - Vth), H(0) = 1, with the sigmoid surrogate gradient of slope α (SpikeFn)."""
    return SpikeFn.apply(u, v_th, alpha, scale)


def after_reset(u: Tensor, v_th: float, out: Tensor | None = None) -> Tensor:
    """A = u - Vth·H(u - Vth), the potential left after firing, from u alone (into `out` when given, not u).

    Bit for bit u - Vth s as the step computed it: H(u - Vth) is s, since fl(u - Vth) >= 0 exactly
    when u >= Vth, and Vth·s is exact for s in {0, 1}, so an online neuron keeps u as its state and
    gets A[t-1] back at the next step.
    """
    # H(u - Vth) compared into A's own buffer, then u - Vth·H over it: no bool mask, which a CPU's
    # torch.where reads some twenty times slower than an arithmetic pass, and no layer of memory more.
    s = torch.ge(u, v_th, out=torch.empty_like(u) if out is None else out)
    return torch.sub(u, s, alpha=v_th, out=s)


def membrane(current: Tensor, A_prev: Tensor | None, lam: float) -> Tensor:
    """u[t] = λ A[t-1] + I[t], from the post-reset potential A[t-1] = u[t-1] - Vth s[t-1] (None at t = 1, where A[0] = 0).

    The membrane integrates in fp32 at least, also when autocast hands it a bf16 current:
    spikes near threshold and NDOT's ratio A[t] / A[t-1] need the precision.
    """
    if A_prev is None:
        return current.to(torch.promote_types(current.dtype, torch.float32))
    return torch.add(current, A_prev, alpha=lam)


def factor(num: Tensor, den: Tensor | None, lam: float, signed: bool = False, out: Tensor | None = None) -> Tensor:
    """NDOT's e = num / den clamped to [-λ, λ], written into `out` when given (num itself may be it).

    Where the ratio is undefined (zero denominator, which is always the case at
    the first transition, den None, or a non-finite value) the paper only says "check the
    sign, then clamp": the default is λ, the signed reading is λ·sign(num).
    """
    fill = lam * torch.sign(num) if signed else None  # before the division may overwrite num
    if den is None:
        return torch.full_like(num, lam) if fill is None else fill
    r = torch.div(num, den, out=out)
    if fill is not None:
        return torch.where(torch.isfinite(r), r.clamp_(-lam, lam), fill, out=r)
    # λ for nan and ±inf, then the clamp leaves λ as it is: the default reading, in place.
    return r.nan_to_num_(lam, lam, lam).clamp_(-lam, lam)


@torch.no_grad()
def trace_step(
    rule: str,
    a: Tensor | None,
    s: Tensor,
    u: Tensor,
    A_prev: Tensor | None,
    e_prev: Tensor | None,
    lam: float,
    v_th: float,
    signed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Advance the presynaptic trace â of one layer by one step.

    a: â[t-1] (None at t = 1, where â[1] = s[1] for every rule); s: the spikes it traces.
    u: the membrane at t; A_prev = after_reset(u[t-1]), which the membrane update computed
      (None at t = 1). NDOT's factor is the ratio of A at t and t-1, the authors' (rule
      "ndot_ref") that of q = A - Vth s.
    e_prev: what the previous step kept: the factor e[t-1] ("ndot") or q[t-1] ("ndot_ref").
    Returns (â[t], what to keep for the next step: e[t], q[t], or None).

    â[t] is written into â[t-1]'s buffer and e[t] into e[t-1]'s, after â[t] has read it: an
    online step's backward has run before the next step, so nothing reads them any more, and
    the state never holds two steps at once. The authors' e_ref[t] = q[t] / q[t-1] is used at
    once, in q[t-1]'s buffer, and q[t] takes A[t-1]'s, a temporary of this step. A trace that
    is not s itself gets its own buffer at t = 1, so that the spikes a step emitted are never
    overwritten.
    """
    if rule == "sltt":
        return s, None
    if rule == "ottt":
        return (s.clone() if a is None else a.mul_(lam).add_(s)), None
    if rule == "ndot":
        if a is None:
            # e[1] = A[1] / A[0], A[0] = 0: the fill everywhere, which reads A[1] only for its sign.
            return s.clone(), factor(after_reset(u, v_th) if signed else u, None, lam, signed)
        a.mul_(e_prev).add_(s)
        return a, factor(after_reset(u, v_th, out=e_prev), A_prev, lam, signed, out=e_prev)
    if rule == "ndot_ref":
        if a is None:
            return s.clone(), _authors_q(u, v_th)
        q = _authors_q(u, v_th, out=A_prev)
        return a.mul_(factor(q, e_prev, lam, out=e_prev)).add_(s), q
    # Every rule named: one registered in ONLINE_RULES without its branch here must not run as another.
    raise ValueError(f"no trace for rule {rule!r}; online rules: {', '.join(ONLINE_RULES)}")


def _authors_q(u: Tensor, v_th: float, out: Tensor | None = None) -> Tensor:
    # The authors' q = A - Vth s: their reset subtracted twice, in two roundings (into `out`, not u).
    # With a bool mask, unlike after_reset: both subtractions read s, and a float s beside q would be a
    # layer of memory more at every step after the first (tests/test_memory.py holds them to the first's).
    q = torch.sub(u, v_th, out=out).sub_(v_th)
    return torch.where(u >= v_th, q, u, out=q)


Step = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


def neuron_step(
    current: Tensor,
    v_prev: Tensor | None,
    a: Tensor | None,
    e_prev: Tensor | None,
    *,
    rule: str,
    lam: float,
    v_th: float,
    alpha: float,
    signed: bool,
    detach_reset: bool,
    through_time: bool,
    trace: bool,
    out_scale: float = 1.0,
) -> Step:
    """One step of a layer of neurons: the LIF update and, where asked, the trace.

    This is the whole elementwise work of a layer per step, in one function so
    that the fast path can compile it into one kernel (ndot.fast).
    v_prev, a, e_prev: the state the previous step returned, None at t = 1. v is what the
    neuron keeps of its membrane: A[t] with its graph through time (BPTT in training), u[t]
    otherwise, detached; A[t] follows from u[t] exactly (after_reset), and the surrogate
    needs nothing else.
    through_time: keep the graph across steps. trace: advance â (online rule, training,
    read downstream); â and e are then updated in place (trace_step).
    out_scale: c, the constant the network multiplies spikes by before the next
    layer; the step emits c·s[t] and, every trace being linear in s, the trace of
    c·s, which is c·â[t]. The reset and the NDOT factor read s itself.
    Returns (c·s[t], v[t], c·â[t], what trace_step keeps); the last two are None without a trace.
    """
    if through_time:
        u = membrane(current, v_prev, lam)
        s = spike(u, v_th, alpha)
        reset = s.detach() if detach_reset else s
        return (s * out_scale if out_scale != 1.0 else s), u - v_th * reset, None, None
    A_prev = None if v_prev is None else after_reset(v_prev, v_th)
    u = membrane(current, A_prev, lam)
    out = spike(u, v_th, alpha, out_scale)
    u = u.detach()
    if not trace:
        return out, u, None, None
    a, e = trace_step(rule, a, out.detach(), u, A_prev, e_prev, lam, v_th, signed)
    return out, u, a, e
