"""Small shared pieces for the core tests."""
from __future__ import annotations

import re
from typing import Callable

import torch

from ndot.layers import configure
from ndot.models import NeuronArgs, build
from ndot.step import train_batch

# A bound on a wait that only a hang reaches (a subprocess, a sweep's driver): the longest, a sweep's resume
# running its remaining trials or a compile with an empty cache, took about a minute on a loaded 2-core
# day, and a machine 10x slower stays inside it.
HANG_S = 900


class RecordingSGD(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of every gradient it is asked to apply."""

    def __init__(self, params):
        params = list(params)
        super().__init__(params, lr=0.0)
        self.records: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.records.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.param_groups[0]["params"]])


def make_model(arch: str = "small_cnn", rule: str = "ndot", seed: int = 0, in_channels: int = 1, classes: int = 10,
               dtype=torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build(arch, in_channels, classes, NeuronArgs(**kw)).to(dtype)
    configure(m, rule)
    m.train()
    return m


def batch(seed: int = 1, n: int = 6, c: int = 1, size: int = 16, classes: int = 10, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Inputs large enough that every layer spikes in the first steps.
    x = 2.0 * torch.randn(n, c, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def grads(model: torch.nn.Module, rule: str, mode: str, x, y, T: int, precision: str = "fp32",
          **configure_kw) -> dict[str, torch.Tensor]:
    """Summed parameter gradients of one batch, taken through the real training step."""
    configure(model, rule, **configure_kw)
    opt = RecordingSGD(model.parameters())
    train_batch(model, opt, x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05, precision=precision)
    names = [n for n, _ in model.named_parameters()]
    total = [sum(r[i] for r in opt.records) for i in range(len(names))]
    return dict(zip(names, total))


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, name: str = "") -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def exit_status(main: Callable[..., int], *args) -> int:
    """What a command line's main(*args) exits with, argparse's own refusals (SystemExit) included."""
    try:
        return main(*args)
    except SystemExit as e:
        return e.code


def small_cnn_of_an_older_ndot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """small_cnn's weights named as ndot saved them at beaf66a (2026-11-28): a scale module after each neuron made
    the convolutions features.0, 3 and 6, not 0, 2 and 4."""
    return {re.sub(r"features\.(\d)", lambda m: f"features.{int(m[1]) * 3 // 2}", k): v for k, v in weights.items()}
