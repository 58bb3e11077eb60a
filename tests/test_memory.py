"""What autograd keeps for backward: flat in T for online rules, linear in T for BPTT (spec §6 memory claim)."""
import pytest
import torch

from helpers import RecordingSGD, batch, make_model
from ndot.memory import SavedTensorMeter
from ndot.step import train_batch


def peak_saved_bytes(rule: str, mode: str, T: int) -> int:
    model = make_model(rule=rule, dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    with SavedTensorMeter() as m:
        train_batch(model, RecordingSGD(model.parameters()), x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05)
    assert m.live == 0, "saved tensors outlived the batch"
    return m.peak


@pytest.mark.parametrize("rule,mode", [(r, m) for r in ("ndot", "ndot_ref", "ottt", "sltt") for m in "OA"])
def test_online_rules_save_the_same_bytes_for_any_T(rule, mode):
    peaks = {T: peak_saved_bytes(rule, mode, T) for T in (1, 4, 16)}
    assert peaks[1] > 0
    assert peaks[1] == peaks[4] == peaks[16], peaks


def test_bptt_saved_bytes_grow_linearly_in_T():
    p = {T: peak_saved_bytes("bptt", "A", T) for T in (1, 4, 16)}
    per_step = (p[4] - p[1]) / 3
    assert per_step > 0
    assert p[16] - p[4] == 12 * per_step, p
    assert p[16] > 4 * p[1]
