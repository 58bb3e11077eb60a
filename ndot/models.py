"""Spiking architectures with scaled weight standardisation, by name.

Every model runs ONE time step per call: logits o[t] = readout(GAP(s[t])).
The readout has no neuron, so by default its gradient reads the spikes
themselves: with no membrane to carry W's effect into later steps, s[t] is the
exact gradient signal. `readout_trace` feeds it the last layer's trace instead,
as the authors' code does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ndot.config import ConfigError, importing
from ndot.layers import LIF, Seq, WSConv2d, avg_pool, configure, neurons
from ndot.ops import traced_conv2d

if TYPE_CHECKING:
    from ndot.config import TrainConfig

# Every spike is multiplied by this before the next layer: it keeps the variance of the
# next WS layer's input near 1 (the authors' constant). The neuron emits it (LIF.out_scale).
SCALE = 2.74


@dataclass(frozen=True)
class NeuronArgs:
    tau: float = 2.0
    v_th: float = 1.0
    alpha: float = 4.0
    dropout: float = 0.0

    def make(self) -> LIF:
        return LIF(self.tau, self.v_th, self.alpha, self.dropout, out_scale=SCALE)


class SpikingNet(nn.Module):
    """features (a module of ndot.layers taking and returning (x, â) pairs, e.g. a Seq of WSConv2d and LIF),
    then global average pooling and a Linear readout from `width` channels to `num_classes` logits.

    One call is one time step: [B, C, H, W] in, o[t] of shape [B, num_classes] out. The neurons keep
    their state between calls (ndot.layers.reset_state drops it); ndot.step runs the T steps of a batch.
    The last neuron emits no trace (set_readout_trace), and the initialisation is the spec's.
    """

    def __init__(self, features: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.readout = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, WSConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.readout.weight, 0.0, 0.01)
        nn.init.zeros_(self.readout.bias)
        self.set_readout_trace(False)

    def set_readout_trace(self, on: bool) -> None:
        """Feed the readout's weight gradient the last layer's trace (the authors' code) or, off, its spikes."""
        list(neurons(self))[-1].emit_trace = on

    def forward(self, x: Tensor) -> Tensor:
        s, a = self.features(x, None)
        s = s.mean(dim=(2, 3))
        if a is None:
            return self.readout(s)
        # The readout as a 1x1 conv, so that its weight gradient reads GAP(â) like every other layer's.
        w, b = self.readout.weight, self.readout.bias
        return traced_conv2d(s[..., None, None], a.mean(dim=(2, 3))[..., None, None], w[..., None, None], b).flatten(1)


def _conv_stack(cfg: list, c_in: int, n: NeuronArgs) -> Seq:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "AP":
            layers.append(avg_pool(2))
        else:
            layers += [WSConv2d(c_in, v), n.make()]
            c_in = v
    return Seq(*layers)


VGG11 = [64, 128, "AP", 256, 256, "AP", 512, 512, "AP", 512, 512]


def vgg11_ws(in_channels: int, num_classes: int, n: NeuronArgs) -> SpikingNet:
    """The paper's VGG-11-WS (spec §4): 1.21 GFLOP per image-step forward at 32x32 (3.63 with its backward)."""
    return SpikingNet(_conv_stack(VGG11, in_channels, n), 512, num_classes)


def small_cnn(in_channels: int, num_classes: int, n: NeuronArgs) -> SpikingNet:
    """Three WS conv layers (32-64-128), cheap enough for CPU sweeps.

    It downsamples with stride-2 convs: an average pool shrinks the variance of
    sparse spike maps, and with one time step the pooled input could no longer
    drive the next layer to threshold (it stays silent at T = 1).
    """
    layers: list[nn.Module] = []
    for c_in, c_out, stride in ((in_channels, 32, 1), (32, 64, 2), (64, 128, 2)):
        layers += [WSConv2d(c_in, c_out, stride=stride), n.make()]
    return SpikingNet(Seq(*layers), 128, num_classes)


class Block(nn.Module):
    """Spiking basic block: the shortcut's spikes join the second conv's current before the neuron."""

    def __init__(self, c_in: int, c_out: int, stride: int, n: NeuronArgs) -> None:
        super().__init__()
        self.body = Seq(WSConv2d(c_in, c_out, stride=stride), n.make(), WSConv2d(c_out, c_out))
        self.shortcut = WSConv2d(c_in, c_out, 1, stride, 0) if (stride, c_in) != (1, c_out) else None
        self.out = n.make()

    def forward(self, x: Tensor, a: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        current, _ = self.body(x, a)
        current = current + (self.shortcut(x, a)[0] if self.shortcut is not None else x)
        return self.out(current, None)


def resnet_ws(in_channels: int, num_classes: int, n: NeuronArgs) -> SpikingNet:
    """ResNet-10-style WS network: a stem and four basic blocks (64-128-256-512)."""
    stem = Seq(WSConv2d(in_channels, 64), n.make())
    widths = [64, 128, 256, 512]
    blocks = [Block(c_in, c_out, 1 if i == 0 else 2, n) for i, (c_in, c_out) in enumerate(zip([64] + widths, widths))]
    return SpikingNet(Seq(stem, *blocks), 512, num_classes)


@dataclass(frozen=True)
class Arch:
    build: Callable[[int, int, NeuronArgs], SpikingNet]
    # Side length of the input the model is sized for; datasets without a
    # native size (digits) are resized to it.
    input_size: int


ARCHS: dict[str, Arch] = {
    "vgg11_ws": Arch(vgg11_ws, 32),
    "small_cnn": Arch(small_cnn, 16),
    "resnet_ws": Arch(resnet_ws, 32),
}
# ndot's own, known in every process; the others are known where the module that registered them was imported.
BUILT_IN_ARCHS = frozenset(ARCHS)
# The others' name -> the modules whose import registered it (ndot.config.importing).
REGISTERED_BY: dict[str, tuple[str, ...]] = {}


def register(name: str, build: Callable[[int, int, NeuronArgs], SpikingNet], input_size: int) -> None:
    """Add an architecture to ARCHS: `build(in_channels, num_classes, neuron)` makes its SpikingNet, sized for
    `input_size` x `input_size` input (a dataset without a native size, digits, is resized to it).

    Registered from a module of its own, named in TrainConfig.imports (--imports, --set imports=...), it is
    known in every process that runs the config, a sweep's trials too. ConfigError (a ValueError, one line on the
    command line) where `name` is taken by another architecture: the name is what tables, checkpoints and the
    benchmark's cached FLOP counts go by.
    """
    arch = Arch(build, input_size)
    if ARCHS.get(name, arch) != arch:
        raise ConfigError(f"architecture {name!r} is registered already, by {ARCHS[name].build.__module__}")
    ARCHS[name] = arch
    REGISTERED_BY[name] = importing()


def build(name: str, in_channels: int, num_classes: int, neuron: NeuronArgs | None = None,
          readout_trace: bool = False) -> SpikingNet:
    """The architecture `name` (one of ARCHS) for `in_channels` x H x W input and `num_classes` classes.

    Its neurons run rule "ndot" until ndot.layers.configure sets another.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; valid architectures: {', '.join(sorted(ARCHS))}")
    net = ARCHS[name].build(in_channels, num_classes, neuron or NeuronArgs())
    net.set_readout_trace(readout_trace)
    return net


def from_config(cfg: "TrainConfig", in_channels: int, num_classes: int) -> SpikingNet:
    """The network a training configuration describes: architecture, neuron, readout and gradient rule."""
    neuron = NeuronArgs(cfg.tau, cfg.v_th, cfg.surrogate_alpha, cfg.dropout)
    net = build(cfg.arch, in_channels, num_classes, neuron, cfg.readout_trace)
    configure(net, cfg.rule, cfg.signed_factor, cfg.detach_reset)
    return net


def finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one device sync).

    The loss alone misses a network whose convolutions went non-finite: a NaN membrane never
    reaches the threshold, so such a layer is silent, the readout sees zeros and its bias alone
    gives finite logits and a finite loss, epoch after epoch, at chance.
    """
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())
