"""The fast path: levers that change how a training step runs, never what it computes.

- channels_last: NHWC activations and weights, the layout the GPU's conv kernels prefer.
- fused neuron: `neuron_step` (LIF update, NDOT factor, trace) compiled by
  torch.compile into one kernel per layer and step, and its surrogate backward
  into one more; the eager function stays the reference it is tested against.

bf16 autocast (`precision`) and Ŵ once per optimiser step (`standardised_weights`)
live in ndot.step and ndot.layers; CUDA-graph replay of a whole batch is in ndot.graphs.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

from ndot.layers import neurons
from ndot.neuron import Step, neuron_step

# Distinct graphs of `neuron_step`: rule x first/later step x training/eval x
# dtype x layout. Dynamo's default of 8 per function would silently send the
# rest back to eager.
_RECOMPILE_LIMIT = 64


@functools.cache
def fused_neuron_step() -> Callable[..., Step]:
    """`neuron_step` compiled once per process; shapes are symbolic so every layer shares one graph."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # λ, Vth, α and the output scale are constants of a run: baked in, rather than wrapped at every
    # call into 0-d CPU tensors that the graph reads back (and that make Inductor build a host C++
    # kernel beside the GPU ones).
    torch._dynamo.config.specialize_float = True
    return torch.compile(neuron_step, fullgraph=True, dynamic=True)


def accelerate(model: nn.Module, *, channels_last: bool = False, fused_neuron: bool = False) -> nn.Module:
    """Apply the levers to `model` in place and return it; with both off the model is untouched."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step = fused_neuron_step() if fused_neuron else neuron_step
    for n in neurons(model):
        n.step_fn = step
    return model
