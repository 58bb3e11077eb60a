"""Memory of a training batch against T: flat for online rules, linear for BPTT (spec §6 memory claim).

Two measures (ndot.memory): the bytes autograd saves for backward, and the most memory a
batch allocates at once, which also sees the neuron state and every temporary.
"""
import functools

import pytest
import torch

from helpers import RecordingSGD, batch, make_model
from ndot.config import ONLINE_RULES
from ndot.layers import reset_state
from ndot.memory import AllocationMeter, SavedTensorMeter
from ndot.step import train_batch

ONLINE = [(r, m) for r in ONLINE_RULES for m in "OA"]


def peak_saved_bytes(rule: str, mode: str, T: int) -> int:
    model = make_model(rule=rule, dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    with SavedTensorMeter() as m:
        train_batch(model, RecordingSGD(model.parameters()), x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05)
    assert m.live == 0, "saved tensors outlived the batch"
    return m.peak


def peak_allocated_bytes(rule: str, mode: str, T: int) -> int:
    model = make_model(rule=rule, dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = functools.partial(train_batch, model, opt, x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05)
    run()  # the momentum buffers exist before the measured batch, as in training
    reset_state(model)
    with AllocationMeter(torch.device("cpu")) as m:
        run()
    return m.peak


@pytest.mark.parametrize("rule,mode", ONLINE)
def test_online_rules_save_the_same_bytes_for_any_T(rule, mode):
    peaks = {T: peak_saved_bytes(rule, mode, T) for T in (1, 4, 16)}
    assert peaks[1] > 0
    assert peaks[1] == peaks[4] == peaks[16], peaks


def test_bptt_saved_bytes_grow_linearly_in_T():
    # From T = 2: at T = 1 the most saved at once can be Ŵ's graph, rebuilt after the steps.
    p = {T: peak_saved_bytes("bptt", "A", T) for T in (2, 4, 16)}
    per_step = (p[4] - p[2]) / 2
    assert per_step > 0
    assert p[16] - p[4] == 12 * per_step, p
    assert p[16] > 4 * p[2]


@pytest.mark.parametrize("rule,mode", ONLINE)
def test_online_rules_allocate_no_more_at_any_T_than_at_T_1(rule, mode):
    """The state never holds two steps at once (trace and factor are updated in place), so neither it
    nor the temporaries around it grow with T: every step after the first allocates as the one before."""
    peaks = {T: peak_allocated_bytes(rule, mode, T) for T in (1, 2, 16)}
    assert peaks[2] == peaks[16], peaks
    assert peaks[16] <= 1.05 * peaks[1], peaks


def test_bptt_allocation_grows_linearly_in_T():
    # From T = 4: with few steps the most allocated at once is Ŵ's backward, after the steps.
    p = {T: peak_allocated_bytes("bptt", "A", T) for T in (4, 8, 16)}
    early, late = (p[8] - p[4]) / 4, (p[16] - p[8]) / 8
    assert early > 0 and 0.8 <= late / early <= 1.25, p


def test_allocation_meter_counts_the_most_held_at_once():
    with AllocationMeter(torch.device("cpu")) as m:
        a = torch.empty(1 << 20)
        b = torch.empty(1 << 20)
        del a
        c = torch.empty(1 << 19)
    assert m.peak == 8 << 20 and b.numel() + c.numel() > 0


def test_saved_tensor_meter_counts_each_storage_once():
    # BPTT saves Ŵ and the input at every step: held once, however often saved; a view holds its base.
    w = torch.randn(256, requires_grad=True)
    x = torch.randn(4, 256, requires_grad=True)
    with SavedTensorMeter() as m:
        loss = sum((x[t] * w).sum() for t in range(4))  # each product saves w and a view of x
        assert m.live == w.nbytes + x.nbytes
        loss.backward()
    assert m.peak == w.nbytes + x.nbytes and m.live == 0


def test_sltt_keeps_nothing_of_its_trace_between_steps():
    # SLTT's trace is the step's own spikes, which the next step never reads: kept in the state, they
    # would stay alive through the next step, a layer of spikes per neuron that the 5% margin above
    # (and a peak that does not grow with T) would let pass.
    from ndot.layers import LIF
    lif = LIF().train()
    lif.rule = "sltt"
    for _ in range(2):
        s, a = lif(torch.full((8,), 1.5))
        assert a is not None and torch.equal(a, s)
        assert lif.state.get("a") is None and lif.state.get("e") is None
