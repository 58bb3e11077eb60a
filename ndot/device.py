"""Where a run executes: the torch device a config names."""
from __future__ import annotations

import torch

from ndot.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's `device`: "auto" is the GPU where there is one; a CUDA device
    this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # mps, meta, xpu: torch names them, ndot runs on neither
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} asked for, but torch sees {count} CUDA device(s) here")
    return device


def described(device: torch.device) -> str:
    """What a run ran on, for a results table: "cpu", or the CUDA device and its model ("cuda:0 NVIDIA H100 80GB HBM3"),
    where a config's "auto" does not say, and its peak memory means another thing on each."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"
