"""The LIF neuron and the presynaptic traces of the online rules, as step functions over explicit state.

    u[t] = λ (u[t-1] - Vth s[t-1]) + I[t]      s[t] = H(u[t] - Vth)      A[t] = u[t] - Vth s[t]

The module `LIF` in ndot.layers holds the state between steps; the functions here
take it and return the next, so they can be tested against independent formulas.
One exception, for memory: an online step writes the trace and the NDOT factor into
the previous step's buffers (trace_step), so the state never holds two steps at once.
"""
from __future__ import annotations

import torch
from torch import Tensor

ONLINE_RULES = ("ndot", "ndot_ref", "ottt", "sltt")


class SpikeFn(torch.autograd.Function):
    """Heaviside with H(0) = 1 forward; sigmoid surrogate α·sig(αx)(1 - sig(αx)) backward."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.alpha * x)
        return grad * (ctx.alpha * sg * (1 - sg)), None


def spike(x: Tensor, alpha: float) -> Tensor:
    return SpikeFn.apply(x, alpha)


class OnlineSpikeFn(torch.autograd.Function):
    """c·s[t] with s[t] = H(u - Vth), and the state A[t] = u - Vth s[t] (no gradient), for a step whose state is detached.

    The surrogate needs x = u - Vth, which A and s give back exactly: x = A where s = 1 and
    x = A - Vth where s = 0 (Vth·s is exact for s in {0, 1}). The neuron keeps A as its state
    anyway, so backward holds one byte per neuron (s) instead of x in fp32.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v_th: float, alpha: float, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        # H(u - Vth) without the difference: fl(u - Vth) >= 0 exactly when u >= Vth.
        fired = u >= v_th
        s = fired.to(u.dtype)
        A = torch.sub(u, s, alpha=v_th)
        ctx.mark_non_differentiable(A, fired)
        ctx.save_for_backward(A, fired)
        ctx.v_th, ctx.alpha, ctx.scale = v_th, alpha, scale
        return (s.mul_(scale) if scale != 1.0 else s), A, fired

    @staticmethod
    def backward(ctx, grad: Tensor, _A: None, _fired: None) -> tuple[Tensor, None, None, None]:
        A, fired = ctx.saved_tensors
        # In place where the arithmetic allows, in SpikeFn's order: the widest layer's backward
        # is where a batch peaks, and each temporary there is a layer of activations.
        x = A - ctx.v_th
        sg = torch.where(fired, A, x, out=x).mul_(ctx.alpha).sigmoid_()
        one_minus = torch.rsub(sg, 1)  # before sg becomes α·sg below
        surrogate = sg.mul_(ctx.alpha).mul_(one_minus)
        return surrogate.mul_(grad * ctx.scale if ctx.scale != 1.0 else grad), None, None, None


def membrane(current: Tensor, A_prev: Tensor | None, lam: float) -> Tensor:
    """u[t] = λ A[t-1] + I[t], from the post-reset potential A[t-1] = u[t-1] - Vth s[t-1] (None at t = 1, where A[0] = 0).

    The membrane integrates in fp32 at least, also when autocast hands it a bf16 current:
    spikes near threshold and NDOT's ratio A[t] / A[t-1] need the precision.
    """
    if A_prev is None:
        return current.to(torch.promote_types(current.dtype, torch.float32))
    return torch.add(current, A_prev, alpha=lam)


def factor(num: Tensor, den: Tensor | None, lam: float, signed: bool = False, out: Tensor | None = None) -> Tensor:
    """NDOT's e = num / den clamped to [-λ, λ], written into `out` when given (the previous step's e).

    Where the ratio is undefined (zero denominator, which is always the case at
    the first transition, den None, or a non-finite value) the paper only says "check the
    sign, then clamp": the default is λ, the signed reading is λ·sign(num).
    """
    if den is None:
        return lam * torch.sign(num) if signed else torch.full_like(num, lam)
    r = torch.div(num, den, out=out)
    if signed:
        return torch.where(torch.isfinite(r), r.clamp_(-lam, lam), lam * torch.sign(num), out=r)
    # λ for nan and ±inf, then the clamp leaves λ as it is: the default reading, in place.
    return r.nan_to_num_(lam, lam, lam).clamp_(-lam, lam)


@torch.no_grad()
def trace_step(
    rule: str,
    a: Tensor | None,
    s: Tensor,
    q: Tensor,
    q_prev: Tensor | None,
    e_prev: Tensor | None,
    lam: float,
    signed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Advance the presynaptic trace â of one layer by one step.

    a: â[t-1] (None at t = 1, where â[1] = s[1] for every rule).
    q, q_prev: the quantity whose ratio gives the NDOT factor, at t and t-1:
      A[t] for "ndot", A[t] - Vth s[t] for "ndot_ref" (the authors' code);
      q_prev is None at t = 1 (q[0] = 0).
    e_prev: "ndot" only, the factor e[t-1] computed at the previous step.
    Returns (â[t], e to keep for the next step, or None). â[t] and e[t] are written into
    the buffers of â[t-1] and e[t-1] (e_ref[t] into q[t-1]'s): an online step's backward has
    run before the next step, so nothing reads them any more, and the state never holds two
    steps at once.
    A trace that is not s itself gets its own buffer at t = 1, so that the spikes a step
    emitted are never overwritten.
    """
    if rule not in ONLINE_RULES:
        raise ValueError(f"no trace for rule {rule!r}; online rules: {', '.join(ONLINE_RULES)}")
    if rule == "sltt":
        return s, None
    if a is None:
        return s.clone(), (factor(q, None, lam, signed) if rule == "ndot" else None)
    if rule == "ottt":
        return a.mul_(lam).add_(s), None
    if rule == "ndot":
        a.mul_(e_prev).add_(s)
        return a, factor(q, q_prev, lam, signed, out=e_prev)
    # ndot_ref: e_ref[t] is used at once; it takes the buffer of q[t-1], which nothing reads after it.
    return a.mul_(factor(q, q_prev, lam, out=q_prev)).add_(s), None


Step = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


def neuron_step(
    current: Tensor,
    A_prev: Tensor | None,
    fired_prev: Tensor | None,
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
    A_prev, fired_prev, a, e_prev: the state the previous step returned, None at t = 1.
    through_time: keep the graph across steps (BPTT in training); otherwise the
    new state is detached. trace: advance â (online rule, training, read downstream);
    â and e are then updated in place (trace_step).
    out_scale: c, the constant the network multiplies spikes by before the next
    layer; the step emits c·s[t] and, every trace being linear in s, the trace of
    c·s, which is c·â[t]. The reset and the NDOT factor read s itself.
    Returns (c·s[t], A[t], s[t] as bool for "ndot_ref", c·â[t], e[t] for "ndot");
    the last three are None without a trace.
    """
    u = membrane(current, A_prev, lam)
    if through_time:
        s = spike(u - v_th, alpha)
        reset = s.detach() if detach_reset else s
        return (s * out_scale if out_scale != 1.0 else s), u - v_th * reset, None, None, None
    out, A, fired = OnlineSpikeFn.apply(u, v_th, alpha, out_scale)
    if not trace:
        return out, A, None, None, None
    if rule == "ndot_ref":
        # The authors' ratio reads q = A - Vth s at t and t-1: from A and s kept as one byte per
        # neuron, rather than q as a state of its own. A + (-Vth)·s rounds as A - Vth s does (-Vth s
        # is exact) and needs no float copy of s. (A[t-1] itself stays: the surrogate saved it.)
        q = A.add(fired, alpha=-v_th)
        q_prev = None if A_prev is None else A_prev.add(fired_prev, alpha=-v_th)
    else:
        q, q_prev = A, A_prev
    a, e = trace_step(rule, a, out.detach(), q, q_prev, e_prev, lam, signed)
    return out, A, (fired if rule == "ndot_ref" else None), a, e
