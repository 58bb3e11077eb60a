"""One batch of training or evaluation under each rule and update mode (spec §3)."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ndot.config import MODES, PRECISIONS, RULES
from ndot.layers import neurons, reset_state, standardised_weights


def _widened(o: Tensor) -> Tensor:
    """Logits in fp32 at least: bf16 ones are widened, float64 ones kept."""
    return o.to(torch.promote_types(o.dtype, torch.float32))


def step_loss(o: Tensor, y: Tensor, T: int, alpha: float) -> Tensor:
    """L[t] = ((1 - α) CE(o[t], y) + α MSE(o[t], onehot(y))) / T, in fp32 at least."""
    o = _widened(o)
    mse = F.mse_loss(o, F.one_hot(y, o.shape[-1]).to(o.dtype))
    return ((1 - alpha) * F.cross_entropy(o, y) + alpha * mse) / T


def _input(x: Tensor, t: int) -> Tensor:
    # Static images repeat at every step; event data carries a T axis.
    return x[:, t] if x.dim() == 5 else x


def _autocast(x: Tensor, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_batch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    rule: str,
    mode: str,
    T: int,
    loss_alpha: float,
    weight_change: float = 0.0,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Train on one batch; returns (Σ_t L[t], Σ_t o[t]) detached, without a device sync.

    x: [B, C, H, W], the input of every step (static images), or [B, T', C, H, W] with T' >= T, frame t
    the input of step t (event data); y: [B] class indices. The model maps one step's input to o[t].
    Online rules run backward at every step (the graph never spans two steps);
    mode "O" also steps the optimiser at every step, mode "A" once per batch.
    BPTT builds the whole sequence and runs one backward. Mode "O" with `weight_change` c > 0 adds, as the
    authors' CIFAR10-DVS script does, c Σ_W ||W - W'||₂ / √numel(W) over the model's parameters to the loss of
    every step after the batch's first, W' (constant) being W before the previous step's update; the loss
    returned leaves it out. The model's neurons compute the
    gradient: they must run `rule` (ndot.layers.configure sets it; ValueError otherwise).
    The model is put in training mode, in which its neurons keep traces. Gradients left in `opt`'s
    parameters (by a call that raised midway, e.g. out of memory) are dropped first.
    """
    _check_rule(model, rule, mode)
    _check_steps(x, y, T, precision)
    if weight_change and mode != "O":  # W does not change inside the batch: the term would be zero
        raise ValueError(f"weight_change applies to mode O only, not {mode!r}")
    model.train()
    reset_state(model)
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=x.device)
    logits = None

    def forward(t: int) -> Tensor:
        nonlocal logits, loss_sum
        with _autocast(x, precision):
            o = model(_input(x, t))
        loss = step_loss(o, y, T, loss_alpha)
        logits = _widened(o.detach()) if logits is None else logits + _widened(o.detach())
        loss_sum = loss_sum + loss.detach()
        return loss

    if rule == "bptt" or mode == "A":
        with standardised_weights(model):
            if rule == "bptt":
                sum(forward(t) for t in range(T)).backward()
            else:
                for t in range(T):
                    forward(t).backward()
            reset_state(model)  # read by nothing now: freed before Ŵ's backward and the SGD step
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        # One backward per optimiser step: each conv builds Ŵ with its graph and that backward goes
        # through it, one standardisation fewer per layer and step than building Ŵ without a graph
        # and rebuilding it at a block's exit (the same bits; tests/test_step.py).
        params = list(model.parameters())
        before: list[Tensor] = []
        for t in range(T):
            loss = forward(t)
            if weight_change and t > 0:
                # At W = W' the norm's gradient is torch's zero (a parameter the last step left unmoved), as
                # in the authors' code; their reg_lambda 0.05 times their 0.5 is c = 0.025.
                loss = loss + weight_change * sum(torch.linalg.vector_norm(p - q) / math.sqrt(p.numel())
                                                  for p, q in zip(params, before))
            if weight_change and t < T - 1:
                before = [p.detach().clone() for p in params]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss_sum, logits


def _check_rule(model: nn.Module, rule: str, mode: str) -> None:
    # The argument only picks BPTT's single backward or the online steps: a model configured for another
    # rule would train by that one's gradient (or fail in autograd), whatever the caller asked for.
    if rule not in RULES:  # before the neurons' rule: configure() would refuse the name it would suggest
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
    ran = {n.rule for n in neurons(model)}
    if ran and ran != {rule}:  # (a network without spiking neurons has no rule of its own)
        raise ValueError(f"the model's neurons run rule {', '.join(sorted(ran))}, not {rule!r}: "
                         f"ndot.layers.configure(model, {rule!r}) sets it")
    if mode not in MODES or (rule == "bptt" and mode != "A"):
        raise ValueError(f"mode must be {' or '.join(MODES) if rule != 'bptt' else 'A for bptt'}, got {mode!r}")


def _check_steps(x: Tensor, y: Tensor, T: int, precision: str) -> None:
    # T = 0 would return a zero loss and no logits, and an unknown precision would run in fp32, silently.
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    # Labels that are not one class index per sample (one-hot, or a batch of [T, B, ...] frames whose first
    # axis is T) failed in the loss, after the first step's forward, as a size mismatch inside torch.
    if y.dim() != 1 or x.dim() < 1 or len(y) != len(x):
        raise ValueError(f"y must hold one class index per sample of x, shape [{len(x) if x.dim() else ''}], "
                         f"got {list(y.shape)} (x: {list(x.shape)}, [B, C, H, W] or [B, T, C, H, W])")
    if x.dim() == 5 and x.shape[1] < T:
        raise ValueError(f"the event data has {x.shape[1]} frames per sample, fewer than T = {T}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


@torch.no_grad()
def eval_batch(model: nn.Module, x: Tensor, y: Tensor, *, T: int, loss_alpha: float, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Evaluate one batch in evaluation mode (no traces, no dropout), without a graph; the model is left
    in that mode. Returns (Σ_t L[t], o) with o[t] the logits of step t, [T, B, classes]."""
    _check_steps(x, y, T, precision)
    model.eval()
    reset_state(model)
    loss_sum = torch.zeros((), device=x.device)
    outputs = []
    with standardised_weights(model):
        for t in range(T):
            with _autocast(x, precision):
                o = _widened(model(_input(x, t)))
            loss_sum = loss_sum + step_loss(o, y, T, loss_alpha)
            outputs.append(o)
    return loss_sum, torch.stack(outputs)
