"""The LIF neuron and the presynaptic traces of the online rules, as pure step functions.

    u[t] = λ (u[t-1] - Vth s[t-1]) + I[t]      s[t] = H(u[t] - Vth)      A[t] = u[t] - Vth s[t]

The module `LIF` in ndot.layers holds the state between steps; everything here
is stateless so it can be tested against independent formulas.
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


def lif_step(A_prev: Tensor, current: Tensor, lam: float, v_th: float, alpha: float) -> tuple[Tensor, Tensor]:
    """One LIF update from the post-reset potential A[t-1] = u[t-1] - Vth s[t-1]; returns (s[t], u[t])."""
    u = lam * A_prev + current
    return spike(u - v_th, alpha), u


def factor(num: Tensor, den: Tensor, lam: float, signed: bool = False) -> Tensor:
    """NDOT's e = num / den clamped to [-λ, λ].

    Where the ratio is undefined (zero denominator, which is always the case at
    the first transition, or a non-finite value) the paper only says "check the
    sign, then clamp": the default is λ, the signed reading is λ·sign(num).
    """
    r = num / den
    fill = lam * torch.sign(num) if signed else torch.full_like(r, lam)
    return torch.where(torch.isfinite(r), r.clamp(-lam, lam), fill)


@torch.no_grad()
def trace_step(
    rule: str,
    a: Tensor | None,
    s: Tensor,
    q: Tensor,
    q_prev: Tensor,
    e_prev: Tensor | None,
    lam: float,
    signed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Advance the presynaptic trace â of one layer by one step.

    a: â[t-1] (None at t = 1, where â[1] = s[1] for every rule).
    q, q_prev: the quantity whose ratio gives the NDOT factor, at t and t-1:
      A[t] for "ndot", A[t] - Vth s[t] for "ndot_ref" (the authors' code);
      q_prev is 0 at t = 1.
    e_prev: "ndot" only, the factor e[t-1] computed at the previous step.
    Returns (â[t], e to keep for the next step, or None).
    """
    if rule == "sltt":
        return s, None
    if rule == "ottt":
        return (s if a is None else lam * a + s), None
    if rule == "ndot":
        e = factor(q, q_prev, lam, signed)
        return (s if a is None else e_prev * a + s), e
    if rule == "ndot_ref":
        e = factor(q, q_prev, lam)
        return (s if a is None else e * a + s), None
    raise ValueError(f"no trace for rule {rule!r}; online rules: {', '.join(ONLINE_RULES)}")


Step = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


def neuron_step(
    current: Tensor,
    A_prev: Tensor,
    q_prev: Tensor | None,
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
    through_time: keep the graph across steps (BPTT in training); otherwise the
    new state is detached. trace: advance â (online rule, training, read downstream).
    out_scale: c, the constant the network multiplies spikes by before the next
    layer; the step emits c·s[t] and, every trace being linear in s, the trace of
    c·s, which is c·â[t]. The reset and the NDOT factor read s itself.
    Returns (c·s[t], A[t], q[t], c·â[t], e[t]); the last three are None without a trace.
    """
    s, u = lif_step(A_prev, current, lam, v_th, alpha)
    out = s * out_scale if out_scale != 1.0 else s
    if through_time:
        reset = s.detach() if detach_reset else s
        return out, u - v_th * reset, None, None, None
    A = (u - v_th * s).detach()
    if not trace:
        return out, A, None, None, None
    q = A - v_th * s.detach() if rule == "ndot_ref" else A
    a, e = trace_step(rule, a, out.detach(), q, q_prev, e_prev, lam, signed)
    return out, A, q, a, e
