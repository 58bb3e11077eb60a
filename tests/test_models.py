"""Architectures: shapes, the paper's VGG-11-WS size, weight standardisation, neuron dropout."""
import pytest
import torch

from ndot.layers import LIF, WSConv2d, neurons, reset_state
from ndot.config import RULES, TrainConfig
from ndot.models import ARCHS, build, from_config, register


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    macs = []

    def hook(m, inp, out):
        cur = out[0]
        macs.append(cur.shape[1] * cur.shape[2] * cur.shape[3] * m.weight[0].numel())

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, WSConv2d)]
    model(x)
    for h in hs:
        h.remove()
    return sum(macs)


@pytest.mark.parametrize("c,size,classes", [(3, 32, 10), (3, 32, 100), (2, 48, 10)])
def test_vgg11_ws_shapes(c, size, classes):
    m = build("vgg11_ws", c, classes).eval()
    reset_state(m)
    assert m(torch.randn(2, c, size, size)).shape == (2, classes)


def test_vgg11_ws_is_the_papers_network():
    m = build("vgg11_ws", 3, 10).eval()
    convs = [x for x in m.modules() if isinstance(x, WSConv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert m.readout.in_features == 512
    # 605 M multiply-adds per image per time step at 32x32 (spec §4).
    reset_state(m)
    assert conv_macs(m, torch.randn(1, 3, 32, 32)) == pytest.approx(605e6, rel=0.01)
    assert torch.all(m.readout.bias == 0) and m.readout.weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_runs_on_its_input_size(arch):
    m = build(arch, 1, 10).eval()
    reset_state(m)
    size = ARCHS[arch].input_size
    assert m(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match=f"valid architectures: {', '.join(sorted(ARCHS))}$"):
        build("lenet", 1, 10)


def test_scaled_weight_standardisation():
    conv = WSConv2d(16, 8)
    with torch.no_grad():
        conv.weight.normal_(3.0, 5.0)
    w = conv.standardise()
    fan_in = 16 * 9
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-6)
    assert torch.allclose(w.var(dim=(1, 2, 3)) * fan_in, torch.ones(8), rtol=1e-3)
    assert w.requires_grad, "the standardisation must stay differentiable"


def test_a_conv_with_one_weight_per_output_channel_is_refused_not_standardised_to_nan():
    with pytest.raises(ValueError, match="at least 2 weights per output channel, got 1 input channel"):
        WSConv2d(1, 4, kernel_size=1, padding=0)
    w = WSConv2d(2, 4, kernel_size=1, padding=0).standardise()  # the smallest that standardises
    assert torch.isfinite(w).all()


def test_neuron_dropout_mask_is_fixed_over_time_and_training_only():
    torch.manual_seed(0)
    lif = LIF(dropout=0.5).train()
    lif.rule = "ottt"
    current = torch.full((4000,), 5.0)  # fires at every step
    outs = [lif(current)[0] for _ in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert set(outs[0].unique().tolist()) == {0.0, 2.0}  # kept spikes scaled by 1/(1-p)
    assert abs((outs[0] == 0).float().mean().item() - 0.5) < 0.05
    lif.eval()
    lif.state = None
    assert torch.all(lif(current)[0] == 1.0)


def test_dropout_mask_keeps_its_scale_under_a_bf16_current():
    torch.manual_seed(0)
    lif = LIF(dropout=0.1).train()
    s, _ = lif(torch.full((1000,), 5.0, dtype=torch.bfloat16))
    assert set(s.unique().tolist()) == {0.0, torch.tensor(1 / 0.9, dtype=torch.float32).item()}


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.5, -2.0])
def test_a_neuron_without_a_decay_in_0_1_is_refused_as_trainconfig_refuses_it(tau):
    # Before, tau 0 raised ZeroDivisionError and any other tau <= 1 built a neuron with lambda outside (0, 1).
    with pytest.raises(ValueError, match=rf"^tau must be > 1 \(lambda = 1 - 1/tau in \(0, 1\)\), got {tau!r}$"):
        LIF(tau=tau)


def test_a_neuron_handed_a_pair_names_seq_not_a_failure_inside_its_step():
    # nn.Sequential hands a conv's (y, trace) pair on whole; it failed as "'tuple' object has no attribute 'to'".
    net = torch.nn.Sequential(WSConv2d(1, 4), LIF())
    with pytest.raises(TypeError, match=r"^LIF takes a current tensor, got tuple: .* ndot.layers.Seq, not nn.Sequential$"):
        net(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("training", [True, False])
def test_a_batch_of_another_shape_without_reset_state_is_refused_by_name(training):
    # A hand-written loop that forgets reset_state between batches failed inside the membrane update
    # ("The size of tensor a (2) must match the size of tensor b (4)").
    m = build("small_cnn", 1, 10).train(training)
    m(torch.randn(4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"^the neurons hold the state of a batch of shape \[4, 32, 16, 16\], not "
                                         r"\[2, 32, 16, 16\]: ndot.layers.reset_state\(model\) drops it before a new batch$"):
        m(torch.randn(2, 1, 16, 16))
    reset_state(m)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_last_neuron_emits_no_trace():
    m = build("small_cnn", 1, 10)
    flags = [n.emit_trace for n in neurons(m)]
    assert flags[-1] is False and all(flags[:-1])


@pytest.mark.parametrize("rule,signed,detach", [("ndot", True, False), ("ndot_ref", False, True), ("bptt", False, True)])
def test_the_config_reaches_every_neuron(rule, signed, detach):
    cfg = TrainConfig(rule=rule, signed_factor=signed, detach_reset=detach, tau=4.0, v_th=0.5, surrogate_alpha=2.0)
    lifs = list(neurons(from_config(cfg, 1, 10)))
    assert lifs and all((n.rule, n.signed, n.detach_reset) == (rule, signed, detach) for n in lifs)
    assert all((n.lam, n.v_th, n.alpha) == (0.75, 0.5, 2.0) for n in lifs)


def test_an_unknown_rule_is_refused_when_the_model_is_built_not_at_its_first_step():
    with pytest.raises(ValueError, match=f"^unknown rule 'foo'; valid rules: {', '.join(RULES)}$"):
        from_config(TrainConfig(rule="foo"), 1, 10)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_neuron_emits_the_scaled_ws_constant(arch):
    # Spikes carry ×2.74 (README, the authors' constant) into the next WS layer, in every architecture.
    assert {n.out_scale for n in neurons(build(arch, 3, 10))} == {2.74}
    lif = LIF(out_scale=2.74).eval()
    assert torch.all(lif(torch.full((4,), 5.0))[0] == 2.74)


def test_resnet_ws_halves_the_side_in_every_block_but_the_first():
    m = build("resnet_ws", 3, 10).eval()
    reset_state(m)
    sides = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: sides.append((out[0].shape[1], out[0].shape[2])))
             for b in m.features[1:]]
    m(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sides == [(64, 32), (128, 16), (256, 8), (512, 4)]


def test_small_cnn_is_sized_for_16px_inputs():
    # README: small_cnn's input is 16x16, the size digits are resized to.
    assert ARCHS["small_cnn"].input_size == 16 and ARCHS["vgg11_ws"].input_size == 32


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_initial_weights_are_kaiming_fan_out_with_zero_biases(arch):
    # Spec §4: convs Kaiming normal (fan_out, relu), bias 0, gain 1. Weight standardisation hides W's
    # scale from the forward, but not from training: W's gradient scales as 1/|W|, so a fan_in init
    # changes the effective learning rate of every layer whose fan-in and fan-out differ.
    torch.manual_seed(0)
    m = build(arch, 3, 10)
    for name, c in m.named_modules():
        if isinstance(c, WSConv2d):
            fan_out = c.out_channels * c.kernel_size[0] * c.kernel_size[1]
            std = (2 / fan_out) ** 0.5
            assert c.weight.std().item() == pytest.approx(std, rel=0.15 if c.weight.numel() < 2000 else 0.05), name
            assert abs(c.weight.mean().item()) < 0.2 * std, name
            assert torch.all(c.bias == 0) and torch.all(c.gain == 1), name


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_neuron_dropout_drops_a_fraction_p_of_the_neurons(p):
    # The test above drops half, where a mask keeping p and one keeping 1 - p look alike.
    torch.manual_seed(0)
    lif = LIF(dropout=p).train()
    s, _ = lif(torch.full((20000,), 5.0))  # every neuron fires
    assert (s == 0).double().mean().item() == pytest.approx(p, abs=0.015)
    assert s.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])



def test_a_name_registered_for_another_architecture_is_refused():
    # Tables, checkpoints and the benchmark's FLOP counts go by the name: it must not come to mean another network.
    with pytest.raises(ValueError, match="architecture 'small_cnn' is registered already, by ndot.models"):
        register("small_cnn", ARCHS["vgg11_ws"].build, 16)
    register("small_cnn", ARCHS["small_cnn"].build, 16)  # the same again, as a module imported twice does
    assert ARCHS["small_cnn"].build.__name__ == "small_cnn"
