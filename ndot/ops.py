"""The weight op fed by spikes that run ONE forward per time step.

The forward uses the spikes s; the backward takes the weight gradient from the
presynaptic trace â and the input gradient from the weight. The input gradient
of a linear op does not depend on its input values, so nothing else is needed
(spec §2). Under autocast the op casts its inputs itself, because a custom
Function is opaque to autocast.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _autocast(*xs: Tensor | None) -> tuple[Tensor | None, ...]:
    device = next(x for x in xs if x is not None).device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if x is None else x.to(dtype) for x in xs)


class TracedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: Tensor, a: Tensor, w: Tensor, b: Tensor | None, stride: int, padding: int) -> Tensor:
        s, a, w, b = _autocast(s, a, w, b)
        ctx.save_for_backward(a, w)
        ctx.conf = (stride, padding, b is not None)
        return F.conv2d(s, w, b, stride, padding)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None, None]:
        a, w = ctx.saved_tensors
        stride, padding, has_b = ctx.conf
        need_s, _, need_w, need_b = ctx.needs_input_grad[:4]
        # `a` stands in for the input: it has the input's shape, which is all
        # the input gradient needs, and it is the signal the weight gradient reads.
        gs, gw, gb = torch.ops.aten.convolution_backward(
            g.to(w.dtype), a, w, [w.shape[0]] if has_b else None,
            [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
            [need_s, need_w, has_b and need_b],
        )
        return gs, None, gw, gb, None, None


def traced_conv2d(s: Tensor, a: Tensor, w: Tensor, b: Tensor | None, stride: int = 1, padding: int = 0) -> Tensor:
    """conv2d(s, w, b) forward; backward: the weight gradient from the trace `a`, the input gradient from w."""
    return TracedConv2d.apply(s, a, w, b, stride, padding)

