"""CUDA-graph replay of a whole training step: every time step, every backward, every optimiser step.

A step of a small network launches hundreds of short kernels; replaying them
as one graph removes the CPU launch cost between them. The replay computes
what the eager step computes, given the conditions `GraphedStep` enforces,
except for random draws (dropout masks): those come from the captured
generator offsets, so a run with dropout is not bit-comparable to an eager one.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ndot.layers import reset_state

StepFn = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor], tuple[Tensor, ...]]

# Optimiser settings read on the CPU while a step is recorded, so baked into the graph.
_BAKED = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class GraphedStep:
    """Calls `step(model, opt, x, y)` by replaying a CUDA graph captured on first use.

    - One graph per input shape (a last, smaller batch gets its own).
    - The optimiser's hyperparameters are constants inside a graph: when one
      changes (the lr schedule) every graph is dropped and captured again.
    - Plain SGD with dampening 0 only: its momentum buffers are created as zeros
      before capture, which gives the same first update as a fresh buffer
      (buf = 0 * momentum + grad), so the graph holds the update of every later step.
    - Warm-up (CUDA handles, cuDNN heuristics, torch.compile) runs on a copy
      of model and optimiser, so the real ones only ever see real batches.
    Returns clones of the step's outputs: the graph's own are overwritten by the next replay.
    """

    def __init__(self, step: StepFn, model: nn.Module, opt: torch.optim.Optimizer, warmup: int = 2) -> None:
        if type(opt) is not torch.optim.SGD or any(g["dampening"] != 0 for g in opt.param_groups):
            raise ValueError("CUDA-graph replay supports torch.optim.SGD with dampening 0 only")
        self.step, self.model, self.opt, self.warmup = step, model, opt, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, ...]]] = {}
        self.baked: list[tuple] | None = None

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        baked = [tuple(g[k] for k in _BAKED) for g in self.opt.param_groups]
        if baked != self.baked:
            self.graphs.clear()
            self.baked = baked
        key = (x.shape, x.dtype, x.stride(), y.shape)
        # On the batch's GPU, not the current one (cuda:0 unless set): a capture stream of another GPU records
        # none of this one's kernels, which run eagerly on their GPU's own stream; the capture then fails where
        # they allocate, or the empty graph replays nothing.
        with torch.cuda.device(x.device):
            if key not in self.graphs:
                self.graphs[key] = self._capture(x, y)
            graph, sx, sy, out = self.graphs[key]
            sx.copy_(x)
            sy.copy_(y)
            graph.replay()
            return tuple(o.clone() for o in out)

    def _capture(self, x: Tensor, y: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, ...]]:
        # Neuron state left by the last batch may still hang on a BPTT graph, which deepcopy refuses;
        # every step starts by dropping it anyway.
        reset_state(self.model)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model, opt = copy.deepcopy((self.model, self.opt))
            for _ in range(self.warmup):
                self.step(model, opt, x, y)
            del model, opt
        torch.cuda.current_stream().wait_stream(side)

        for group in self.opt.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    state = self.opt.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.opt.zero_grad(set_to_none=True)
        sx, sy = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA (pinned allocations,
        # events) while this thread captures; under the default "global" mode that breaks the capture.
        # On `side`, of this GPU: torch.cuda.graph's own stream is made once per process, on the GPU current then.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = self.step(self.model, self.opt, sx, sy)
        return graph, sx, sy, tuple(out)
