"""Where a run executes and what memory it peaks at: the device a config names, and its high-water mark."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

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


def reset_peak_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: restart the resident-set high-water mark, so that an epoch's figure
    # is its own even when a process runs several trials (Tune reuses actors).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: peak resident set of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
