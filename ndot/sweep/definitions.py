"""The three sweeps and their presets.

A sweep names the axes that are strata (every value is run with the same
Optuna budget); every other axis takes one value. A preset fills every
command-line default: "smoke" runs offline on digits on a CPU in minutes,
"paper" is the spec's CIFAR recipe (§5) on GPUs, "paper_dvs" its CIFAR10-DVS
one (time steps only).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

BASELINES = ("ndot_O", "ndot_A", "ottt_A", "bptt_A")


@dataclass(frozen=True)
class Preset:
    dataset: str
    arch: tuple[str, ...]
    method: tuple[str, ...]
    T: tuple[int, ...]
    epochs: int
    trials: int
    lr: tuple[float, float]
    momentum: tuple[float, float] = (0.9, 0.9)
    loss_alpha: tuple[float, float] = (0.05, 0.05)
    batch_size: tuple[int, ...] = (128,)
    # The point every stratum tries first (only its searched parameters count).
    first: Mapping[str, Any] = field(default_factory=dict)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    # ASHA: no trial is stopped before this epoch.
    grace_period: int = 1
    # Other TrainConfig fields, fixed for the whole sweep.
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    name: str
    about: str
    # Axes among "method" (a rule in a mode, e.g. ndot_O), "T" and "arch".
    strata: tuple[str, ...]
    presets: Mapping[str, Preset]


# Spec §5's optimiser and loss: the point every stratum tries first, of what a sweep searches.
RECIPE = {"lr": 0.1, "momentum": 0.9, "loss_alpha": 0.05, "batch_size": 128}

# Batch 32: digits has 1,437 training images, 12 SGD steps an epoch at batch 128
# (45 at 32), too few in the smoke run's epochs for any rule to leave chance.
SMOKE = Preset(
    dataset="digits", arch=("small_cnn",), method=BASELINES, T=(1, 2, 4, 6),
    epochs=3, trials=1, lr=(0.02, 0.5), first=RECIPE, batch_size=(32,),
)

# Spec §5: SGD lr 0.1, momentum 0.9, no weight decay, cosine over 300 epochs,
# batch 128, crop + flip + AutoAugment + Cutout. The lr is searched around the
# recipe's 0.1, which every stratum runs first.
PAPER = Preset(
    dataset="cifar10", arch=("vgg11_ws",), method=BASELINES, T=(1, 2, 4, 6),
    epochs=300, trials=4, lr=(0.03, 0.3), first=RECIPE,
    cpus_per_trial=2.0, gpus_per_trial=0.25, grace_period=30,
    # Loader workers match the trial's CPUs, so four trials share a node's cores.
    config={"weight_decay": 0.0, "workers": 2},
)

# Spec §5-6, CIFAR10-DVS: the same optimiser and schedule, frames = T from 2 to 10 (the paper's
# DVS table), and the authors' DVS loss α of 0.001, which is also the first point where α is
# searched (--loss-alpha LOW,HIGH). Frames are 48x48 with pad-4 crops, no flip. Their DVS script's
# --online_update also adds the weight-change term (spec §2): weight_change, read in mode O at T > 1 only.
PAPER_DVS = replace(PAPER, dataset="cifar10dvs", T=(2, 4, 6, 8, 10), loss_alpha=(0.001, 0.001),
                    first={**RECIPE, "loss_alpha": 0.001}, config={**PAPER.config, "weight_change": 0.025})

TIMESTEPS = Sweep(
    name="timesteps",
    about="Accuracy, memory and speed against the number of time steps T, per rule (the paper's table).",
    strata=("T", "method"),
    presets={"smoke": SMOKE, "paper": PAPER, "paper_dvs": PAPER_DVS},
)

ARCHITECTURES = Sweep(
    name="architectures",
    about="Accuracy of each rule on each architecture at one T.",
    strata=("arch", "method"),
    presets={
        # vgg11_ws and resnet_ws take minutes per epoch on a CPU: the smoke run keeps the cheap one.
        "smoke": replace(SMOKE, method=("ndot_A", "bptt_A"), T=(2,)),
        "paper": replace(PAPER, arch=("vgg11_ws", "resnet_ws"), T=(6,)),
    },
)

LEARNING_RATES = Sweep(
    name="learning_rates",
    about="How each rule's accuracy depends on the learning rate (and momentum, loss alpha).",
    strata=("method",),
    presets={
        "smoke": replace(SMOKE, T=(2,), trials=3, lr=(1e-3, 1.0), first={}),
        "paper": replace(
            PAPER, T=(4,), trials=8, lr=(0.01, 1.0), momentum=(0.8, 0.95), loss_alpha=(0.0, 0.2),
        ),
    },
)
