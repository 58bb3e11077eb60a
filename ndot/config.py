"""One training configuration: a flat, serialisable dataclass, validated up front."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

ONLINE_RULES = ("ndot", "ndot_ref", "ottt", "sltt")
RULES = (*ONLINE_RULES, "bptt")
MODES = ("O", "A")
# Fields that change only some rules, or only one mode: turned on for another, they would change nothing, silently.
RULE_FLAGS = {"signed_factor": ("ndot",), "detach_reset": ("bptt",), "readout_trace": ONLINE_RULES}
MODE_FLAGS = {"weight_change": ("O",)}
# Fields read from a batch's second time step on (weight_change compares W with W before the previous step): at
# T = 1 they would change nothing, silently.
MULTISTEP_FLAGS = ("weight_change",)
PRECISIONS = ("fp32", "bf16")
LOADERS = ("auto", "device", "cpu")
DVS_ENCODINGS = ("counts", "authors")
# Far past any experiment (the paper's longest is T = 10, 300 epochs): a count beyond is a slip, an extra
# digit or 1e12, that would run for years, or overflow torch's int64 in the loss, instead of being refused.
MAX_T, MAX_EPOCHS = 10_000, 100_000
# Loader processes, forked every epoch: more than the largest machine's CPUs (512 threads) is a slip, such
# as 10000, which forked until memory or pids ran out (64 took 6.4 s to load 8 small batches that 2 loaded in
# 0.7 s on a 2-CPU machine).
MAX_WORKERS = 512
# The optimiser holds lr and weight decay in the parameters' dtype: a larger one fails in the first step.
FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line meant for the user."""


def _is_int(value: Any) -> bool:
    # bool is an int to Python: True as a batch size or a seed, in a config built by hand, is a slip, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


# What a config built in Python may hold in each kind of field (the int fields have their ranges'
# checks). A string "false" for a flag would be true, and "0.1" for lr a TypeError deep in a check.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    # An empty folder name would read as none given: the data root would silently be $NDOT_DATA's.
    "str | None": (lambda v: v is None or (isinstance(v, str) and v != ""), "a folder or None"),
}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    arch: str = "small_cnn"
    rule: str = "ndot"
    mode: str = "A"
    T: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 5
    batch_size: int = 128
    # Loss: ((1 - loss_alpha) * CE + loss_alpha * MSE) / T per step (spec §3).
    loss_alpha: float = 0.05
    # Slope of the sigmoid surrogate for dH/du (spec §1).
    surrogate_alpha: float = 4.0
    tau: float = 2.0
    v_th: float = 1.0
    dropout: float = 0.0
    # NDOT on a zero denominator: lambda (paper default) or lambda * sign(A[t]).
    signed_factor: bool = False
    # BPTT only: cut the gradient through the soft reset (OTTT's theory assumes this).
    detach_reset: bool = False
    # Online rules: the readout's weight gradient reads the last layer's trace, as in the authors'
    # code, instead of its spikes (exact for a readout, which has no membrane after it).
    readout_trace: bool = False
    # Mode O: the authors' CIFAR10-DVS script adds weight_change * Σ_W ||W - W_prev||₂ / √numel(W) to the
    # loss of every step but the first of a batch, W_prev being W before the previous step's update (spec §2).
    weight_change: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    # Fast path (ndot.fast, ndot.graphs): how a step runs, not what it computes; off by default
    # because none is free everywhere (a layout conversion, compile time, CUDA only).
    channels_last: bool = False
    fused_neuron: bool = False
    fused_ws: bool = False
    cuda_graph: bool = False
    # Data.
    data_root: str | None = None
    download: bool = False
    loader: str = "auto"
    workers: int = 4
    crop: bool = True
    flip: bool = True
    autoaugment: bool = True
    cutout: bool = True
    # CIFAR10-DVS frames: event counts, or the authors' uint8/PIL encoding (ndot/data/dvs.py).
    dvs_encoding: str = "counts"
    # Modules, comma-separated, imported by validate before it checks the names: a module of the user's that
    # registers an architecture (ndot.models.register) or a dataset (ndot.data.register). Named here, not imported
    # by the caller alone, so that every process that runs the config imports them: a sweep's trials, a resume,
    # ndot.evaluate.
    imports: str = ""

    def __post_init__(self) -> None:
        # A Path is what Python code hands over for a folder; checkpoints hold the config and load
        # with weights_only, which refuses a Path object.
        if isinstance(self.data_root, os.PathLike):
            self.data_root = os.fspath(self.data_root)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError on the first bad field; cheap checks only, no data is touched."""
        from ndot.models import ARCHS
        from ndot.data import DATASETS

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in _KINDS and not _KINDS[f.type][0](value):
                bad(f"{f.name} must be {_KINDS[f.type][1]}, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                bad(f"{f.name} must be a finite number, got {value!r}")
        _import_modules(self.imports)
        if not _is_int(self.T) or not 0 < self.T <= MAX_T:
            bad(f"T must be an integer in [1, {MAX_T}], got {self.T!r}")
        if self.rule not in RULES:
            # The paper's and the sweep tables' method names (NDOT_O, ottt_A) join the rule and the mode.
            rule, _, mode = self.rule.lower().rpartition("_")
            is_method = rule in RULES and mode.upper() in MODES
            hint = f"; {self.rule} is rule {rule!r} with mode {mode.upper()!r}" if is_method else ""
            bad(f"unknown rule {self.rule!r}; valid rules: {', '.join(RULES)}{hint}")
        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        if self.rule == "bptt" and self.mode == "O":
            bad("rule 'bptt' needs the whole sequence before its one backward pass: use mode 'A'")
        # In a process of its own (a sweep's trial) an architecture or dataset registered by the code that started
        # it is unknown but where one of `imports` registers it.
        registers = f" (registered by none of imports {self.imports})" if self.imports else ""
        if self.arch not in ARCHS:
            bad(f"unknown architecture {self.arch!r}{registers}; valid architectures: {', '.join(sorted(ARCHS))}")
        if self.dataset not in DATASETS:
            bad(f"unknown dataset {self.dataset!r}{registers}; valid datasets: {', '.join(sorted(DATASETS))}")
        if not 0 < self.lr <= FLOAT32_MAX:
            bad(f"lr must be > 0 and at most float32's largest {FLOAT32_MAX:.4g}, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.weight_decay <= FLOAT32_MAX:
            bad(f"weight_decay must be >= 0 and at most float32's largest {FLOAT32_MAX:.4g}, got {self.weight_decay!r}")
        if not _is_int(self.epochs) or not 0 < self.epochs <= MAX_EPOCHS:
            bad(f"epochs must be an integer in [1, {MAX_EPOCHS}], got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0 <= self.loss_alpha <= 1:
            bad(f"loss_alpha must be in [0, 1], got {self.loss_alpha!r}")
        if not 0 < self.surrogate_alpha <= FLOAT32_MAX:
            # The surrogate multiplies fp32 tensors by it: past float32's largest it is inf there, and
            # inf·0 makes every gradient NaN (a silent network, which ndot.models.finite tells).
            bad(f"surrogate_alpha must be > 0 and at most float32's largest {FLOAT32_MAX:.4g}, got {self.surrogate_alpha!r}")
        if not self.tau > 1:
            bad(f"tau must be > 1 (lambda = 1 - 1/tau in (0, 1)), got {self.tau!r}")
        if not 0 < self.v_th <= FLOAT32_MAX:
            # Past float32's largest the threshold is inf in the membrane's dtype: nothing ever fires, and
            # BPTT's reset u - Vth·s is inf·0 = NaN (a silent network, which ndot.models.finite tells).
            bad(f"v_th must be > 0 and at most float32's largest {FLOAT32_MAX:.4g}, got {self.v_th!r}")
        if not 0 <= self.weight_change <= FLOAT32_MAX:
            bad(f"weight_change must be >= 0 and at most float32's largest {FLOAT32_MAX:.4g}, got {self.weight_change!r}")
        if not 0 <= self.dropout < 1:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            # numpy's global generator, which the trainer seeds too, takes no other seed.
            bad(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not _is_int(self.workers) or not 0 <= self.workers <= MAX_WORKERS:
            bad(f"workers must be an integer in [0, {MAX_WORKERS}], got {self.workers!r}")
        if self.precision not in PRECISIONS:
            bad(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.loader not in LOADERS:
            bad(f"unknown loader {self.loader!r}; valid: {', '.join(LOADERS)}")
        if self.dvs_encoding not in DVS_ENCODINGS:
            bad(f"unknown dvs_encoding {self.dvs_encoding!r}; valid: {', '.join(DVS_ENCODINGS)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            bad(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.cuda_graph and self.device == "cpu":
            bad("cuda_graph replays CUDA graphs: it needs device 'cuda' (or 'auto' on a machine with a GPU)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a dict of TrainConfig's fields; ConfigError naming a key that is none, which would
        otherwise be passed over and leave the field it was meant for at its default (learning_rate for lr)."""
        check_settings(d)
        return cls(**d)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TrainConfig":
        """Build from the fields among a record's keys, its other keys passed over: a sweep's epoch row
        (ids, metrics) or a checkpoint's config, where a setting this version does not know is a newer
        ndot's, and checkpoint.FORMAT, raised where that would be misread, refuses the checkpoint."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def import_names(imports: str) -> list[str]:
    """The module names of TrainConfig.imports, comma-separated, each as written past its spaces."""
    return [n.strip() for n in imports.split(",") if n.strip()]


def _import_modules(names: str) -> None:
    """Import each of the comma-separated module names (TrainConfig.imports); ConfigError for one that cannot be
    imported, itself or a module it imports (named in the line), or that raises ConfigError (registers a name
    already taken).

    Any other error raised inside a module is its author's to read, and keeps its traceback.
    """
    for name in import_names(names):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r} ({e}); every process that runs the config imports it: "
                              "install it, or put its folder on PYTHONPATH") from None
        except ConfigError as e:  # e.g. a name it registers is taken: which module of imports tried, in one line
            raise ConfigError(f"imports: {name!r}: {e}") from None


def importing() -> tuple[str, ...]:
    """The modules whose top-level code is running in the caller's stack, innermost first: a register call's,
    the modules whose import registers its name (one named in TrainConfig.imports does so in every process)."""
    frame, names = sys._getframe(1), []
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            names.append(frame.f_globals.get("__name__", "__main__"))
        frame = frame.f_back
    return tuple(names)


def check_settings(keys: Iterable[str]) -> None:
    """ConfigError naming the keys that are no TrainConfig field, and the fields spelled like them."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in keys if k not in names]
    if not unknown:
        return
    close = [m for k in unknown for m in difflib.get_close_matches(k, names, n=2)]
    known = f"did you mean {' or '.join(map(repr, dict.fromkeys(close)))}?" if close else \
        f"settings are TrainConfig's fields: {', '.join(names)}"
    raise ConfigError(f"unknown setting{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; {known}")


def rule_flags_off(run: Mapping[str, Any]) -> dict[str, Any]:
    """Each setting of RULE_FLAGS, MODE_FLAGS and MULTISTEP_FLAGS that changes nothing for the rule, mode or T that
    `run` holds, off (its default): what a run records, whatever a sweep of several rules, modes or T set for the others."""
    off = [name for name, applies in RULE_FLAGS.items() if "rule" in run and run["rule"] not in applies]
    off += [name for name, applies in MODE_FLAGS.items() if "mode" in run and run["mode"] not in applies]
    off += [name for name in MULTISTEP_FLAGS if run.get("T") == 1]
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in off}


def check_rule_flags(settings: Mapping[str, Any], rules: Sequence[str], modes: Sequence[str], Ts: Sequence[int],
                     spelled: Callable[[str], str]) -> None:
    """ConfigError when a setting of RULE_FLAGS (MODE_FLAGS, MULTISTEP_FLAGS) is on and changes none of `rules`
    (`modes`, `Ts`); `spelled` names it as given."""
    for flags, kind, given in ((RULE_FLAGS, "rule", rules), (MODE_FLAGS, "mode", modes)):
        for name, applies in flags.items():
            if settings.get(name) and not set(given) & set(applies):
                raise ConfigError(f"{spelled(name)} applies to {kind} {' or '.join(applies)} only, not {', '.join(given)}")
    for name in MULTISTEP_FLAGS:
        if settings.get(name) and max(Ts) == 1:
            raise ConfigError(f"{spelled(name)} applies to T > 1 only, not T = 1: it compares the weights with those "
                              "before a batch's previous time step")


def check_data_flags(settings: Mapping[str, Any], dataset: str, spelled: Callable[[str], str]) -> None:
    """ConfigError when data_root or download is set for `dataset` (a valid one) and the dataset reads no
    data folder (digits ships inside scikit-learn): the setting would change nothing."""
    from ndot import data

    if data.info(dataset).in_data_root:
        return
    for name in ("data_root", "download"):
        if settings.get(name):
            raise ConfigError(f"{spelled(name)} does not apply to dataset {dataset!r}, which reads no data folder")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def method(rule: str, mode: str) -> str:
    """The paper's name for a rule run in a mode, e.g. ndot_O."""
    return f"{rule}_{mode}"


def parse_method(name: str) -> dict[str, str]:
    """"ndot_O" -> {"rule": "ndot", "mode": "O"}; ValueError where it is no RULE_MODE that TrainConfig runs,
    raised here so that the flag that gave it can be named (--rules)."""
    rule, sep, mode = name.rpartition("_")
    if name in RULES:  # e.g. ndot_ref, whose "_ref" would read as a mode
        raise ValueError(f"rule {name!r} needs its mode, written RULE_MODE: {name}_A" + ("" if name == "bptt" else f" or {name}_O"))
    if not sep or not rule:
        raise ValueError(f"rule {name!r} must be written RULE_MODE, e.g. ndot_O or bptt_A")
    TrainConfig(rule=rule, mode=mode).validate()  # an unknown rule or mode, or bptt_O
    return {"rule": rule, "mode": mode}


def parse_field(name: str, text: str) -> Any:
    """A TrainConfig field's value from command-line text; ConfigError for an unknown field or a malformed value."""
    check_settings([name])
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    if kind == "bool":
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{name} is true or false, got {text!r}")
    if kind.startswith("str"):
        return text
    try:
        return {"int": int, "float": float}[kind](text)
    except ValueError:
        raise ConfigError(f"{name} is a number ({kind}), got {text!r}") from None


# What each TrainConfig field means, for the command line's --help (the comments in the class say why).
FIELD_HELP = {
    "dataset": "dataset",
    "arch": "network",
    "rule": "learning rule",
    "mode": "O steps the optimiser after every time step, A once per batch, accumulating over T",
    "T": f"time steps per input, at most {MAX_T}",
    "lr": "SGD learning rate, cosine to zero over the epochs",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "epochs": f"epochs to train, at most {MAX_EPOCHS}; more than a checkpoint's extends it on --resume",
    "batch_size": "batch size",
    "loss_alpha": "alpha in the loss ((1 - alpha) CE + alpha MSE) / T per step",
    "surrogate_alpha": "slope of the sigmoid surrogate for dH/du",
    "tau": "membrane time constant; lambda = 1 - 1/tau",
    "v_th": "firing threshold",
    "dropout": "dropout probability",
    "signed_factor": "NDOT on a zero denominator: lambda * sign(A[t]) instead of lambda",
    "detach_reset": "bptt only: no gradient through the soft reset",
    "readout_trace": "online rules: the readout's weight gradient reads the last layer's trace, not its spikes",
    "weight_change": "mode O, T > 1: adds this times the sum over parameters W of ||W - W before the previous step||_2 / "
                     "sqrt(numel W) to every step's loss but a batch's first (the authors' CIFAR10-DVS script: 0.025)",
    "seed": "seed of the weights, shuffles and augmentations",
    "device": "where to train: auto (the GPU where there is one), cpu or cuda[:N]",
    "precision": "compute precision (bf16: autocast, for GPUs; a CPU without bf16 units runs it several times slower)",
    "channels_last": "fast path: NHWC layout",
    "fused_neuron": "fast path: the neuron's step compiled into one kernel",
    "fused_ws": "fast path: the weight standardisation and its backward compiled into a kernel or two per layer",
    "cuda_graph": "fast path: each batch replayed as a CUDA graph (CUDA only)",
    "data_root": "data folder (default: $NDOT_DATA, else ~/data)",
    "download": "fetch a missing dataset",
    "loader": "input pipeline: device (batches built on the training device), cpu (CIFAR: torchvision on CPU "
              "workers; CIFAR10-DVS: frames kept in host memory, moved per batch); auto is device",
    "workers": f"CPU loader processes (loader cpu, DVS conversion), at most {MAX_WORKERS}",
    "crop": "augmentation: random crop, padding 4 (CIFAR and CIFAR10-DVS; digits has none)",
    "flip": "augmentation: horizontal flip (CIFAR only)",
    "autoaugment": "augmentation: AutoAugment, CIFAR-10 policy (CIFAR only)",
    "cutout": "augmentation: Cutout 16x16 (CIFAR only)",
    "dvs_encoding": "CIFAR10-DVS frames: event counts, or the authors' uint8/PIL encoding",
    "imports": "modules to import first, comma-separated, e.g. my_arch, which register architectures "
               "(ndot.models.register) or datasets (ndot.data.register); saved with the run",
}
