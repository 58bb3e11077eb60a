"""One forward per step, optimiser steps per mode."""
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import RecordingSGD, batch, make_model
from ndot.fast import accelerate
from ndot.layers import WSConv2d, reset_state, standardised_weights
from ndot.ops import traced_conv2d
from ndot.step import _autocast, eval_batch, step_loss, train_batch


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


class BoolTensors(TorchDispatchMode):
    """Records each op that returns a bool tensor, with the tensor's shape."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(str(func), list(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.bool]
        return out


@pytest.mark.parametrize("rule,mode", [("ndot", "A"), ("ndot", "O"), ("ottt", "O"), ("sltt", "A"), ("bptt", "A")])
def test_the_neurons_compare_into_floats_not_bool_masks(rule, mode):
    # On a CPU a comparison into a bool mask and its widening to a float take some nine times an arithmetic
    # pass over the layer, and torch.where reading the mask twenty: a seventh of a digits batch's time.
    # (The authors' rule ndot_ref keeps one mask per layer and step for its q, ndot.neuron._authors_q.)
    model = make_model("small_cnn", rule, dtype=torch.float32)
    x, y = batch(n=2, dtype=torch.float32)
    with BoolTensors() as b:
        train_batch(model, RecordingSGD(model.parameters()), x, y, rule=rule, mode=mode, T=3, loss_alpha=0.05)
        eval_batch(model, x, y, T=3, loss_alpha=0.05)
    assert b.made == []


def count_standardisations(model) -> list[int]:
    calls = [0]
    for m in model.modules():
        if isinstance(m, WSConv2d):
            def counted(*args, fn=m.standardise_fn):
                calls[0] += 1
                return fn(*args)
            m.standardise_fn = counted
    return calls


@pytest.mark.parametrize("mode,per_batch", [("O", lambda n, T: n * T), ("A", lambda n, T: 2 * n)])
def test_standardisations_per_batch(mode, per_batch):
    # Mode O: one per layer and step, inside the step's graph. Mode A: once without a graph for all T
    # steps, and once more at the exit, to push the summed gradient through.
    model = make_model(dtype=torch.float32)
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    calls = count_standardisations(model)
    x, y = batch(dtype=torch.float32)
    train_batch(model, RecordingSGD(model.parameters()), x, y, rule="ndot", mode=mode, T=3, loss_alpha=0.05)
    assert calls[0] == per_batch(n_convs, 3)


def weights_standardised_per_step(model, opt, x, y, T: int, precision: str) -> None:
    """Mode O as mode A's machinery would run it, one block per step: Ŵ without a graph, then rebuilt."""
    reset_state(model)
    for t in range(T):
        with standardised_weights(model):
            with _autocast(x, precision):
                o = model(x)
            step_loss(o, y, T, 0.05).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fused_ws", [False, True])
def test_mode_o_trains_as_with_weights_standardised_per_step(precision, fused_ws):
    # Two images: a CPU's bf16 convolutions are slow, and the size changes nothing the test compares.
    x, y = batch(n=2, dtype=torch.float32)
    def mode_o(model, opt, x, y, T: int, precision: str) -> None:
        train_batch(model, opt, x, y, rule="ndot", mode="O", T=T, loss_alpha=0.05, precision=precision)

    params = []
    for run in (weights_standardised_per_step, mode_o):
        model = accelerate(make_model("resnet_ws", dtype=torch.float32), fused_ws=fused_ws)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            run(model, opt, x, y, 2, precision)
        params.append(list(model.parameters()))
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


@pytest.mark.parametrize("rule,mode", [("ndot", "A"), ("ndot", "O"), ("bptt", "A")])
def test_reported_loss_and_logits_sum_every_step_in_training_and_evaluation_alike(rule, mode):
    # lr 0: the training forward is the evaluation's, so both must report Σ_t L[t] of the same o[t].
    T, alpha = 4, 0.05
    x, y = batch()
    y[y == 9] = 0  # a batch without the last class: the MSE target still holds a column for every class
    model = make_model(rule=rule)
    loss, logits = train_batch(model, RecordingSGD(model.parameters()), x, y, rule=rule, mode=mode, T=T, loss_alpha=alpha)
    test_loss, o = eval_batch(model, x, y, T=T, loss_alpha=alpha)
    assert o.shape == (T, len(y), 10) and not torch.equal(o[0], o[-1])
    onehot = torch.nn.functional.one_hot(y, 10).to(o.dtype)
    per_step = [((1 - alpha) * -o[t].log_softmax(1)[torch.arange(len(y)), y].mean()
                 + alpha * ((o[t] - onehot) ** 2).mean()) / T for t in range(T)]
    torch.testing.assert_close(test_loss, sum(per_step), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, test_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits, o.sum(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("model_rule,rule,mode,says", [
    ("ndot", "ottt", "A", "the model's neurons run rule ndot, not 'ottt': ndot.layers.configure(model, 'ottt') sets it"),
    ("bptt", "ndot", "A", "the model's neurons run rule bptt, not 'ndot'"),
    ("ndot", "ndot", "X", "mode must be O or A, got 'X'"),
    ("bptt", "bptt", "O", "mode must be A for bptt, got 'O'"),
])
def test_the_step_refuses_a_rule_or_mode_its_model_does_not_run(model_rule, rule, mode, says):
    # The rule argument alone picks no gradient: the neurons' rule does.
    model = make_model(rule=model_rule)
    opt = RecordingSGD(model.parameters())
    with pytest.raises(ValueError, match=f"^{re.escape(says)}"):
        train_batch(model, opt, *batch(), rule=rule, mode=mode, T=3, loss_alpha=0.05)
    assert not opt.records


@pytest.mark.parametrize("T,precision,frames,says", [
    (0, "fp32", None, "T must be a positive integer, got 0"),
    (2.0, "fp32", None, "T must be a positive integer, got 2.0"),
    (True, "fp32", None, "T must be a positive integer, got True"),
    (3, "fp16", None, "unknown precision 'fp16'; valid: fp32, bf16"),
    (3, "fp32", 2, "the event data has 2 frames per sample, fewer than T = 3"),
])
def test_training_and_evaluation_refuse_steps_they_cannot_run_before_any_work(T, precision, frames, says):
    # Before, T = 0 returned a zero loss (eval_batch failed in torch.stack), fp16 ran in fp32 and
    # too few frames failed at the step past the last one, after the earlier steps' backward.
    model = make_model()
    x, y = batch()
    if frames is not None:
        x = x[:, None].expand(-1, frames, -1, -1, -1)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    opt = RecordingSGD(model.parameters())
    for run in (functools.partial(train_batch, model, opt, rule="ndot", mode="A"), functools.partial(eval_batch, model)):
        with pytest.raises(ValueError, match=f"^{re.escape(says)}$"):
            run(x, y, T=T, loss_alpha=0.05, precision=precision)
    assert not calls and not opt.records


@pytest.mark.parametrize("rule", ["ndto", "ndot_O", "NDOT"])
@pytest.mark.parametrize("spiking", [True, False])
def test_an_unknown_rule_is_named_as_such_not_as_one_to_configure(rule, spiking):
    # Before, a typo read "the model's neurons run rule ndot, not 'ndto': ndot.layers.configure(model, 'ndto')
    # sets it", a call that refuses the name; a model without spiking neurons trained under it silently.
    model = make_model() if spiking else torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)).double()
    opt = RecordingSGD(model.parameters())
    with pytest.raises(ValueError, match=f"^unknown rule {rule!r}; valid rules: ndot, ndot_ref, ottt, sltt, bptt$"):
        train_batch(model, opt, *batch(), rule=rule, mode="A", T=2, loss_alpha=0.05)
    assert not opt.records


@pytest.mark.parametrize("shape,says", [
    ("half", "y must hold one class index per sample of x, shape [6], got [3] (x: [6, 1, 16, 16]"),
    ("one_hot", "y must hold one class index per sample of x, shape [6], got [6, 10] (x: [6, 1, 16, 16]"),
    ("time_first", "y must hold one class index per sample of x, shape [4], got [6] (x: [4, 6, 1, 16, 16]"),
])
def test_labels_that_do_not_match_the_batch_are_refused_before_any_work(shape, says):
    # Before, each failed in the loss after the first step's forward, as a size mismatch inside torch
    # ("The size of tensor a (6) must match the size of tensor b (3) at non-singleton dimension 0").
    model, (x, y) = make_model(), batch()
    if shape == "half":
        y = y[:3]
    elif shape == "one_hot":
        y = torch.nn.functional.one_hot(y, 10)
    else:  # event frames laid out [T, B, C, H, W]
        x = x[None].expand(4, -1, -1, -1, -1)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    opt = RecordingSGD(model.parameters())
    for run in (functools.partial(train_batch, model, opt, rule="ndot", mode="A"), functools.partial(eval_batch, model)):
        with pytest.raises(ValueError, match=f"^{re.escape(says)}"):
            run(x, y, T=2, loss_alpha=0.05)
    assert not calls and not opt.records


def test_a_numpy_integer_is_a_T_like_any_other():
    model, (x, y) = make_model(), batch()
    assert eval_batch(model, x, y, T=np.int64(2), loss_alpha=0.05)[1].shape[0] == 2
    train_batch(model, RecordingSGD(model.parameters()), x, y, rule="ndot", mode="O", T=np.int32(2), loss_alpha=0.05)


def test_a_batch_that_raised_midway_leaves_no_gradient_to_the_next():
    # E.g. out of memory at step 2: step 1's backward has filled the readout's and biases' .grad.
    model, x, y = make_model(), *batch()
    steps = []

    def fail_at_step_2(*_):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("out of memory")

    hook = model.register_forward_pre_hook(fail_at_step_2)
    opt = RecordingSGD(model.parameters())
    with pytest.raises(RuntimeError):
        train_batch(model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    assert any(p.grad is not None for p in model.parameters())
    hook.remove()
    train_batch(model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    fresh = make_model()
    fresh_opt = RecordingSGD(fresh.parameters())
    train_batch(fresh, fresh_opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    for a, b in zip(opt.records[0], fresh_opt.records[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_and_evaluation_run_in_their_own_mode_whatever_mode_the_model_was_left_in():
    x, y = batch()
    grads = []
    for left_in_eval in (False, True):
        model = make_model(rule="ndot", dropout=0.2)
        model.train(not left_in_eval)  # e.g. by an evaluation just before: its neurons would keep no traces
        opt = RecordingSGD(model.parameters())
        torch.manual_seed(5)
        train_batch(model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
        grads.append(opt.records[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A model fresh from training evaluates without dropout: the same batch twice gives the same outputs.
    assert model.training
    first, again = (eval_batch(model, x, y, T=3, loss_alpha=0.05)[1] for _ in range(2))
    assert torch.equal(first, again) and not model.training


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
    dtypes, currents = set(), set()
    for n in neurons(model):
        n.register_forward_hook(lambda m, i, o: dtypes.update(v.dtype for v in m.state.values() if v is not None))
        n.register_forward_hook(lambda m, i, o: currents.add(i[0].dtype))
    train_batch(model, RecordingSGD(model.parameters()), x, y, rule="ndot", mode="A", T=2, loss_alpha=0.05, precision="bf16")
    # The currents arrive in bf16 (else the run was fp32 throughout and the check below shows nothing).
    assert currents == {torch.bfloat16}
    assert dtypes == {torch.float32}


def test_the_traced_conv_casts_itself_under_autocast_and_saves_bf16():
    # A custom Function is opaque to autocast: TracedConv2d casts its operands itself, so that under
    # bf16 it saves (and its backward reads) half the bytes, as a plain conv under autocast would.
    s, a = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = traced_conv2d(s, a, w, b, 1, 1)
    assert out.dtype == torch.bfloat16 and saved == [torch.bfloat16, torch.bfloat16]
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


class FrameRecorder(torch.nn.Module):
    """A stand-in network that records what it is fed and returns logits from it (a linear map of its mean)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.readout = torch.nn.Linear(1, classes).double()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.readout(x.mean(dim=(1, 2, 3))[:, None])


@pytest.mark.parametrize("rule,mode", [("ndot", "A"), ("ndot", "O"), ("bptt", "A")])
def test_event_data_feeds_frame_t_at_step_t_and_a_static_image_at_every_step(rule, mode):
    # Event data carries a T axis ([B, T, C, H, W]): step t must see frame t, in training and evaluation;
    # a static image [B, C, H, W] is the input at every step (spec §4).
    T = 4
    g = torch.Generator().manual_seed(2)
    frames = torch.randn(3, T, 2, 5, 5, dtype=torch.float64, generator=g)
    image = frames[:, 0]
    y = torch.tensor([0, 1, 2])
    for x, expect in ((frames, [frames[:, t] for t in range(T)]), (image, [image] * T)):
        net = FrameRecorder()
        train_batch(net, RecordingSGD(net.parameters()), x, y, rule=rule, mode=mode, T=T, loss_alpha=0.05)
        eval_batch(net, x, y, T=T, loss_alpha=0.05)
        assert len(net.seen) == 2 * T
        for got, want in zip(net.seen, expect + expect):
            assert torch.equal(got, want)


@pytest.mark.parametrize("alpha", [0.0, 0.001, 0.5, 1.0])
def test_the_loss_weighs_cross_entropy_and_mse_by_the_alpha_it_is_given(alpha):
    # Every other test trains at α = 0.05: a loss that ignored its α for that constant would pass them,
    # and the DVS preset trains at 0.001. The spec's L[t] written out, on the logits the stand-in returned.
    T = 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, T, 2, 3, 3, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 3, 3, 9])
    net = FrameRecorder()
    with torch.no_grad():
        net.readout.weight.normal_(0, 3, generator=g)
    loss, _ = train_batch(net, RecordingSGD(net.parameters()), x, y, rule="ndot", mode="A", T=T, loss_alpha=alpha)
    test_loss, o = eval_batch(net, x, y, T=T, loss_alpha=alpha)
    n = torch.arange(len(y))
    expect = 0
    for t in range(T):
        ce = -(o[t] - o[t].exp().sum(1, keepdim=True).log())[n, y].mean()
        target = torch.zeros_like(o[t])
        target[n, y] = 1
        expect = expect + ((1 - alpha) * ce + alpha * ((o[t] - target) ** 2).sum() / o[t].numel()) / T
    torch.testing.assert_close(test_loss, expect, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)


def test_the_loss_of_bf16_logits_is_computed_in_fp32():
    # Under bf16 autocast the readout hands back bf16 logits; the loss (and its gradient) must be
    # taken on them widened, not in bf16, whose 8-bit mantissa would round the loss by about 1e-2.
    g = torch.Generator().manual_seed(4)
    o = (3 * torch.randn(16, 10, generator=g)).bfloat16()
    y = torch.randint(0, 10, (16,), generator=g)
    got = step_loss(o, y, 4, 0.05)
    w = o.double()
    n = torch.arange(16)
    target = torch.zeros_like(w)
    target[n, y] = 1
    expect = (0.95 * -(w - w.exp().sum(1, keepdim=True).log())[n, y].mean() + 0.05 * ((w - target) ** 2).mean()) / 4
    assert got.dtype == torch.float32
    assert abs(got.item() - expect.item()) <= 1e-6 * expect.item()


def test_bptt_standardises_once_per_batch_like_mode_a():
    # Ŵ once without a graph for the whole sequence, once more at the exit. Built inside the graph
    # instead, BPTT would standardise at every step and hold every step's Ŵ intermediates until
    # its one backward: the same gradients to rounding, which no comparison of values sees.
    model = make_model(rule="bptt", dtype=torch.float32)
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    calls = count_standardisations(model)
    x, y = batch(dtype=torch.float32)
    train_batch(model, RecordingSGD(model.parameters()), x, y, rule="bptt", mode="A", T=3, loss_alpha=0.05)
    assert calls[0] == 2 * n_convs


@pytest.mark.parametrize("rule,mode", [("ndot", "O"), ("ndot", "A"), ("bptt", "A")])
def test_the_state_is_freed_before_the_weights_backward_and_no_gradient_outlives_the_batch(rule, mode):
    # The neuron state is read by nothing once the last step's backward has run: dropped before the
    # standardisation's backward at the block's exit (memory), and the parameters' gradients once
    # applied (an evaluation between batches would otherwise hold a copy of the model's size).
    from ndot.layers import neurons
    model = make_model(rule=rule)
    states_at_exit = []
    for m in model.modules():
        if isinstance(m, WSConv2d):
            def recorded(*args, fn=m.standardise_fn):
                if torch.is_grad_enabled() and mode == "A":
                    states_at_exit.append([n.state for n in neurons(model)])
                return fn(*args)
            m.standardise_fn = recorded
    x, y = batch()
    train_batch(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, rule=rule, mode=mode, T=2, loss_alpha=0.05)
    assert all(s is None for states in states_at_exit for s in states)
    assert mode == "O" or states_at_exit
    assert all(p.grad is None for p in model.parameters())


def test_the_extending_guides_network_of_ones_own_trains_and_evaluates_as_written():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    [example] = re.findall(r"```python\n(import torch\nfrom ndot.layers import .*?)```", guide, re.S)
    scope: dict = {}
    exec(example, scope)
    assert scope["o"].shape == (4, 8, 10) and torch.isfinite(scope["loss"])


def _final_and_after_first_step(weight_change: float, lr: float, extra: bool = False):
    model = make_model(rule="ndot")
    if extra:
        model.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # no gradient from the loss
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    kept = []
    opt.register_step_post_hook(lambda *_: kept.append({n: p.detach().clone() for n, p in model.named_parameters()}))
    train_batch(model, opt, *batch(), rule="ndot", mode="O", T=2, loss_alpha=0.05, weight_change=weight_change)
    return kept[-1], kept[0]


def test_weight_change_adds_the_authors_term_to_each_online_step_after_the_first():
    # T = 2: step 1 starts from the same W1 and traces with the term or without, so the final weights differ by
    # -lr times the gradient at W1 of c Σ ||W - W0||₂ / √numel, W0 constant, written here on plain tensors.
    lr, c = 0.5, 0.3
    plain, W1 = _final_and_after_first_step(0.0, lr)
    penalised, _ = _final_and_after_first_step(c, lr)
    W0 = dict(make_model(rule="ndot").named_parameters())
    W = {n: w.clone().requires_grad_() for n, w in W1.items()}
    term = c * sum(((w - W0[n].detach()) ** 2).sum().sqrt() / w.numel() ** 0.5 for n, w in W.items())
    step = dict(zip(W, torch.autograd.grad(term, list(W.values()))))
    for n in plain:
        torch.testing.assert_close(penalised[n], plain[n] - lr * step[n], rtol=1e-12, atol=1e-15, msg=n)
        assert not torch.equal(penalised[n], plain[n])


def test_weight_change_leaves_a_parameter_the_last_step_did_not_move_unmoved():
    # ||W - W'|| at W = W' has no gradient: torch's subgradient there is 0, what the authors' torch.norm gives too.
    final, _ = _final_and_after_first_step(0.1, 0.5, extra=True)
    assert all(torch.isfinite(w).all() for w in final.values())
    assert torch.equal(final["unused"], torch.ones(3, dtype=torch.float64))


def test_weight_change_is_refused_in_mode_a():
    model = make_model(rule="ndot")
    with pytest.raises(ValueError, match="weight_change applies to mode O only"):
        train_batch(model, RecordingSGD(model.parameters()), *batch(), rule="ndot", mode="A", T=2, loss_alpha=0.05,
                    weight_change=0.1)


def test_weight_change_reads_the_weights_before_the_previous_step_not_the_batchs_first():
    # T = 3: a run without the term is made to follow the penalised run's weights, so that at each step the
    # gradients differ by the term's alone: none at step 0, then that of c Σ ||W_t - W_t-1||₂ / √numel.
    c = 0.3
    model = make_model(rule="ndot")
    path, penalised = [[p.detach().clone() for p in model.parameters()]], []
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt.register_step_pre_hook(lambda *_: penalised.append([p.grad.clone() for p in model.parameters()]))
    opt.register_step_post_hook(lambda *_: path.append([p.detach().clone() for p in model.parameters()]))
    train_batch(model, opt, *batch(), rule="ndot", mode="O", T=3, loss_alpha=0.05, weight_change=c)

    follower = make_model(rule="ndot")
    plain = RecordingSGD(follower.parameters())
    plain.register_step_post_hook(lambda o, *_: [p.data.copy_(w) for p, w in zip(follower.parameters(), path[len(o.records)])])
    train_batch(follower, plain, *batch(), rule="ndot", mode="O", T=3, loss_alpha=0.05)
    for t in range(3):
        W = [w.clone().requires_grad_() for w in path[t]]
        term = c * sum(((w - w0) ** 2).sum().sqrt() / w.numel() ** 0.5 for w, w0 in zip(W, path[t - 1])) if t else 0
        expected = torch.autograd.grad(term, W) if t else [torch.zeros_like(w) for w in W]
        for got, g, want in zip(penalised[t], plain.records[t], expected):
            torch.testing.assert_close(got - g, want, rtol=1e-9, atol=1e-14)
