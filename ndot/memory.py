"""Memory of a training batch, measured the same way on every device; and an epoch's high-water mark.

- SavedTensorMeter: the storage autograd holds for backward, through saved-tensor hooks:
  exact and device-independent, the figure that separates online rules (flat in T) from BPTT.
- AllocationMeter: the most memory a block allocates at any one time, the neuron state
  and every temporary included: CUDA's allocator statistics on a GPU, the profiler's
  record of each allocation and free on a CPU, which keeps no statistics of its own.
- reset_peak_mem, peak_mem_mb: the high-water mark of a whole epoch, which the trainer
  reports: CUDA's peak allocated on a GPU, the process's peak resident set on a CPU.
- out_of_memory: a command's words for a batch that did not fit.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch


class _Saved:
    """Stands in for a saved tensor; its storage counts while autograd holds any tensor on it."""

    def __init__(self, meter: "SavedTensorMeter", t: torch.Tensor) -> None:
        self.meter, self.t = meter, t
        storage = t.untyped_storage()
        self.key = (t.device, storage.data_ptr())
        meter.hold(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensorMeter:
    """Context manager: `peak` is the most bytes of storage that tensors saved for backward hold at any one
    time inside the block.

    By storage, not by save: BPTT saves Ŵ and the input at every step, and a view keeps its whole base.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._held: dict[tuple[torch.device, int], tuple[int, int]] = {}  # storage -> (saves holding it, bytes)

    def hold(self, key: tuple[torch.device, int], nbytes: int) -> None:
        count, nbytes = self._held.get(key, (0, nbytes))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._held[key] = (count + 1, nbytes)

    def release(self, key: tuple[torch.device, int]) -> None:
        count, nbytes = self._held.pop(key)
        if count > 1:
            self._held[key] = (count - 1, nbytes)
        else:
            self.live -= nbytes

    def __enter__(self) -> "SavedTensorMeter":
        self.hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda p: p.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


class AllocationMeter:
    """Context manager: `peak` is the most bytes allocated at any one time inside the block, over what was
    allocated when it began.

    CUDA: max_memory_allocated over memory_allocated at entry. CPU: the running sum of the profiler's
    allocation and free events; memory allocated before the block and freed inside it is not seen there,
    so run the block from a state that frees nothing it did not allocate (ndot.layers.reset_state first)
    and the two devices measure the same thing.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "AllocationMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Kineto, under the profiler, writes two lines to stderr per block at its default level (read
            # at its first use in a process), which would bury a benchmark's own output; a level the
            # user set stands.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            self.prof = torch.autograd.profiler.profile(profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.prof.__exit__(*exc)
        events = [e for e in self.prof.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        live = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            self.peak = max(self.peak, live)


def reset_peak_mem(device: torch.device) -> None:
    """Start the high-water mark that peak_mem_mb reads: at the start of each epoch."""
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


def out_of_memory(e: torch.OutOfMemoryError, device: torch.device, batch_size: int, T: int) -> str:
    """One line for a batch that did not fit on `device`: its size and T, and what torch says of the memory."""
    # torch's message goes on with advice on its allocator's settings, which a smaller batch does not need.
    said = str(e).splitlines()[0].split(" Of the allocated memory")[0]
    return f"out of memory on {device} at batch size {batch_size}, T = {T} ({said})"
