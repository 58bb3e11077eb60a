"""What autograd holds for backward: the memory that separates online rules (flat in T) from BPTT (linear in T).

Measured through saved-tensor hooks, so it is exact and device-independent:
the figure the benchmark reports on a CPU, where no allocator keeps a peak.
"""
from __future__ import annotations

import torch


class _Saved:
    """Stands in for a saved tensor; counts its bytes while autograd holds it."""

    def __init__(self, meter: "SavedTensorMeter", t: torch.Tensor):
        self.meter, self.t, self.n = meter, t, t.numel() * t.element_size()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.n


class SavedTensorMeter:
    """Context manager: `peak` is the most bytes of tensors saved for backward at any one time inside the block."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> "SavedTensorMeter":
        self.hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda p: p.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
