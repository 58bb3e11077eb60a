"""The fast path: levers that change how a training step runs, never what it computes.

- channels_last: NHWC activations and weights, the layout the GPU's conv kernels prefer.
- fused neuron: `neuron_step` (LIF update, NDOT factor, trace) compiled by
  torch.compile into one kernel per layer and step, and its surrogate backward
  into one more; the eager function stays the reference it is tested against.
- fused ws: `standardise` (Ŵ from W and the gain) compiled the same way, a kernel or
  two per layer for its forward and its backward where eager runs some forty small ops:
  mode O standardises at every time step, and on a GPU under graph replay those
  kernels' fixed cost, not their bytes, is what they take.

bf16 autocast (`precision`) and Ŵ once per optimiser step (`standardised_weights`)
live in ndot.step and ndot.layers; CUDA-graph replay of a whole batch is in ndot.graphs.
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ndot.layers import WSConv2d, neurons, standardise
from ndot.neuron import Step, neuron_step

# Distinct graphs of `neuron_step` for one run's λ, Vth, α and c: rule x first/later step x training/eval x
# dtype. Dynamo's default of 8 per function would silently send the rest back to eager.
_RECOMPILE_LIMIT = 64


# A 1-D tensor on the input's storage that autograd does not count as a view of it (reshape's own
# building block). Not a view: Dynamo guards the layout of a view's base, which would bring the
# layout back into the graph's guards.
_unsafe_view = torch.ops.aten._unsafe_view.default


@functools.cache
def _layout(shape: torch.Size, stride: tuple[int, ...]) -> tuple[list[int], list[int], list[int]] | None:
    """(perm, its sizes, its inverse): the order of the dims in memory (NCHW: identity, NHWC: 0,2,3,1);
    None where the tensor does not cover its memory densely and has no flat view."""
    perm = sorted(range(len(shape)), key=lambda d: -stride[d])
    dense = 1
    for d in reversed(perm):
        if shape[d] != 1 and stride[d] != dense:
            return None
        dense *= shape[d]
    return perm, [shape[d] for d in perm], sorted(range(len(perm)), key=perm.__getitem__)


# Dynamo's config is per thread, and Ray Tune runs each trial of a reused worker in a new thread:
# set once per thread, not once per process, or a later trial compiles without it (bptt's graph
# then fails inside Dynamo, and the other rules fall back to eager after 8 graphs).
_configured = threading.local()


def _configure_dynamo() -> None:
    if getattr(_configured, "dynamo", False):
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # λ, Vth, α and the output scale are constants of a run: baked in, rather than wrapped at every
    # call into 0-d CPU tensors that the graph reads back (and that make Inductor build a host C++
    # kernel beside the GPU ones).
    torch._dynamo.config.specialize_float = True
    _configured.dynamo = True


# torch.compile traces under FakeTensorMode, which on a CUDA build without a GPU registers a no-op CUDA
# device guard from the thread that compiles. In torch 2.11, a compile in another thread once that one
# has ended (as Tune may run the trials of a reused worker) then segfaults (seen here with 2.11.0+cu130 on
# a CPU; not with 2.14.1). Registered at import, from a thread that outlives the trials', it does not.
if not torch.cuda.is_available() and hasattr(torch._C, "_ensureCUDADeviceGuardSet"):
    torch._C._ensureCUDADeviceGuardSet()


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own: Dynamo keeps a function's graphs, and counts them against
    its recompile limit, per code object."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@functools.cache
def fused_neuron_step() -> Callable[..., Step]:
    """`neuron_step` compiled once per process and set of float constants, called on its tensors flat, in memory order.

    Elementwise work reads no shape or layout, only that every tensor has the same one:
    flat, an NCHW layer, an NHWC one and a 2-D one share a graph, where the tensors as
    they are would compile one each (most of a CPU benchmark's time, and a GPU run's
    minutes). The size is symbolic, so that every layer shares it too.
    λ, Vth, α and c are baked into the graphs (_configure_dynamo): each set of them is compiled
    from a copy of the step of its own, with the recompile limit to itself. Compiled as one
    function, runs of a few τ, Vth or α in one process (a notebook, a Tune worker that trials
    reuse) reached the limit, and fullgraph then fails (FailOnRecompileLimitHit).
    """
    source = neuron_step  # bound once, here: the eager branch below looks the name up at every call

    @functools.cache
    def compiled(floats: tuple[tuple[str, float], ...]) -> Callable[..., Step]:
        return torch.compile(_own_code(source), fullgraph=True, dynamic=True)

    def step(current: Tensor, *state: Tensor | None, **constants) -> Step:
        _configure_dynamo()
        shape, stride = current.shape, current.stride()
        layout = _layout(shape, stride)
        if layout is None or any(t is not None and t.stride() != stride for t in state):
            # No flat view (gaps in memory, or the layout changed between steps): the eager step. Compiled,
            # the tensors as they are would each need a graph, and torch 2.11's Dynamo refuses writes
            # into non-contiguous ones (out=).
            return neuron_step(current, *state, **constants)
        perm, dims, back = layout

        # The state is views that earlier calls returned, of flat tensors: flat bases, as Dynamo needs.
        # Views of them, not _unsafe_view: the trace is updated in place, and autograd must see it.
        # as_strided is the cheapest view, but its backward writes a buffer the size of the storage:
        # only where there is no gradient.
        def flat(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.permute(perm).view(-1) if t.requires_grad else t.as_strided((t.numel(),), (1,))

        def unflat(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.view(dims).permute(back) if t.requires_grad else t.as_strided(shape, stride)

        floats = tuple(sorted((k, v) for k, v in constants.items() if isinstance(v, float)))
        out = compiled(floats)(_unsafe_view(current.permute(perm), (-1,)), *map(flat, state), **constants)
        return tuple(map(unflat, out))

    return step


@functools.cache
def fused_standardise() -> Callable[[Tensor, Tensor, float], Tensor]:
    """`standardise` compiled once per process, dynamic in shape: a few graphs that every layer's shape shares (a test holds
    VGG-11-WS's 32 layer, layout and grad-mode cases to at most 8)."""
    compiled = torch.compile(standardise, fullgraph=True, dynamic=True)

    def fn(w: Tensor, gain: Tensor, eps: float) -> Tensor:
        _configure_dynamo()
        # Dynamo holds a parameter's shape static, a graph per layer: the same tensors, not as parameters.
        return compiled(_unsafe_view(w, w.shape), _unsafe_view(gain, gain.shape), eps)

    return fn


def accelerate(model: nn.Module, *, channels_last: bool = False, fused_neuron: bool = False,
               fused_ws: bool = False) -> nn.Module:
    """Apply the levers to `model` in place and return it; with both fused levers off its layers run the
    plain functions (undoing an earlier call's), and without channels_last its layout is left as it is.

    The fused levers, once they run, have raised Dynamo's recompile limit to 64 and turned on its
    float specialisation in that thread, which torch.compile elsewhere in the thread then sees too.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step = fused_neuron_step() if fused_neuron else neuron_step
    for n in neurons(model):
        n.step_fn = step
    ws = fused_standardise() if fused_ws else standardise
    for m in model.modules():
        if isinstance(m, WSConv2d):
            m.standardise_fn = ws
    return model
