"""One forward per step, optimiser steps per mode."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import RecordingSGD, batch, make_model
from ndot.layers import WSConv2d
from ndot.step import eval_batch, train_batch


class CountConvs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet_ws", "vgg11_ws"])
@pytest.mark.parametrize("rule,mode", [("ndot", "A"), ("ndot", "O"), ("ndot_ref", "A"), ("ottt", "O"), ("sltt", "A"), ("bptt", "A")])
def test_each_weight_op_runs_once_per_step(arch, rule, mode):
    model = make_model(arch, rule, dtype=torch.float32)
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    x, y = batch(n=2, size=16 if arch == "small_cnn" else 32, dtype=torch.float32)
    T = 3
    with CountConvs() as c:
        train_batch(model, RecordingSGD(model.parameters()), x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05)
    assert c.forward == n_convs * T
    assert c.backward == n_convs * T
    with CountConvs() as c:
        eval_batch(model.eval(), x, y, T=T, loss_alpha=0.05)
    assert (c.forward, c.backward) == (n_convs * T, 0)


def test_eval_computes_no_traces():
    model = make_model()
    x, y = batch()
    eval_batch(model.eval(), x, y, T=3, loss_alpha=0.05)
    from ndot.layers import neurons
    for n in neurons(model):
        assert n.state.get("a") is None and set(n.state) <= {"v", "mask"}


@pytest.mark.parametrize("rule", ["ndot", "ottt"])
def test_mode_o_steps_T_times_mode_a_once(rule):
    x, y = batch()
    for mode, expect in (("O", 5), ("A", 1)):
        model = make_model(rule=rule)
        opt = RecordingSGD(model.parameters())
        train_batch(model, opt, x, y, rule=rule, mode=mode, T=5, loss_alpha=0.05)
        assert len(opt.records) == expect


def test_state_does_not_leak_between_batches():
    model = make_model(rule="ndot")
    x, y = batch()
    opt = RecordingSGD(model.parameters())
    train_batch(model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    first = [g.clone() for g in opt.records[0]]
    # A different batch in between must not change what the same batch gives.
    x2, y2 = batch(seed=9)
    train_batch(model, opt, x2, y2, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    train_batch(model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    for a, b in zip(first, opt.records[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_keeps_the_membrane_in_fp32():
    model = make_model(rule="ndot", dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    from ndot.layers import neurons
    dtypes = set()
    for n in neurons(model):
        n.register_forward_hook(lambda m, i, o: dtypes.update(v.dtype for v in m.state.values() if v is not None))
    train_batch(model, RecordingSGD(model.parameters()), x, y, rule="ndot", mode="A", T=2, loss_alpha=0.05, precision="bf16")
    assert dtypes == {torch.float32}
