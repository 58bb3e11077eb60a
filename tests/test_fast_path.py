"""The fast path (ndot.fast, ndot.graphs) computes what the plain path computes.

On a machine with CUDA the same tests also run there, where channels_last picks
cuDNN's NHWC kernels and the fused neuron is a Triton kernel; bench/gpu_check.sh runs them.
"""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from helpers import HANG_S, assert_close, batch, exit_status, grads, make_model
from ndot.bench import cli as bench_cli
from ndot.bench.cli import main as bench_main, read_run
from ndot.bench.measure import Levers, Setup, fresh_model, gflop_per_image_step, synthetic_batch
from ndot.bench.profile import backward_regions, labelled_model
from ndot.bench import report
from ndot.bench.report import _against_device, memory_checks
from ndot.config import ONLINE_RULES, RULES, ConfigError, TrainConfig
from ndot import fast
from ndot.fast import accelerate, fused_neuron_step, fused_standardise
from ndot.graphs import GraphedStep
from ndot.layers import WSConv2d, neurons, standardise
from ndot.models import build
from ndot.neuron import neuron_step
from ndot.step import train_batch
from ndot.train import train

CUDA = torch.cuda.is_available()
CASES = [(r, m) for r in ONLINE_RULES for m in "AO"] + [("bptt", "A")]
# float32 is held to 1e-5 per parameter, the fast path's contract; float64 on CUDA shows any float32 gap is rounding.
PLACES = [("cpu", torch.float32)] + ([("cuda", torch.float32), ("cuda", torch.float64)] if CUDA else [])


@pytest.fixture
def exact_cudnn():
    """Plain float32 convolutions on CUDA, where cuDNN would otherwise use TF32 for both paths, and
    deterministic ones: a weight-gradient kernel summing with atomics differs by rounding from run to
    run, enough to flip a spike that sits at the threshold and fail a 1e-5 comparison by chance.
    No autotuning either (the trainer turns it on for the process): timing may pick FFT or Winograd
    kernels, whose rounding is further from the plain path's."""
    b = torch.backends
    saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    b.cudnn.deterministic = True
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved


def on(device, dtype, **fast):
    def model(rule):
        return accelerate(make_model(rule=rule, dtype=dtype).to(device), **fast)
    x, y = batch(n=2, size=16, dtype=dtype)
    return model, x.to(device), y.to(device)


# The CUDA-only tests come first: should gpu_check.sh's time limit cut the run, the
# paths that have no CPU stand-in have run.
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
# weight_change: the weights' copies that its term reads are taken inside the captured step.
@pytest.mark.parametrize("rule,mode,weight_change", [("ndot", "A", 0.0), ("ndot", "O", 0.0), ("ndot", "O", 0.025),
                                                     ("bptt", "A", 0.0)])
# A second GPU while the first is the current one (--device cuda:1): the capture must be of its stream.
@pytest.mark.parametrize("gpu", ["cuda:0", pytest.param("cuda:1", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs a second GPU"))])
def test_cuda_graph_replay_trains_like_the_eager_step(rule, mode, weight_change, gpu, exact_cudnn):
    models = [make_model(rule=rule, dtype=torch.float32).to(gpu) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    step = partial(train_batch, rule=rule, mode=mode, T=3, loss_alpha=0.05, weight_change=weight_change)
    graphed = GraphedStep(step, models[1], opts[1])
    # Two batches, a new lr (a new capture), and a smaller last batch (a graph of its own).
    for i, (n, lr) in enumerate([(4, 0.1), (4, 0.1), (4, 0.05), (3, 0.05)]):
        x, y = (t.to(gpu) for t in batch(seed=10 + i, n=n, size=16, dtype=torch.float32))
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr
        eager = step(models[0], opts[0], x, y)
        replay = graphed(x, y)
        for a, b in zip(eager, replay):
            assert_close(b, a, 1e-5, f"batch {i} output")
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert_close(q.detach(), p.detach(), 1e-5, f"batch {i} {name}")
    assert len(graphed.graphs) == 2


@pytest.mark.skipif(not CUDA, reason="needs CUDA (bench/gpu_check.sh runs this)")
def test_trainer_on_cuda_with_every_lever():
    # The product's GPU path end to end: data on the device, bf16, channels_last, the fused neuron,
    # and a CUDA graph captured again when the second epoch's lr changes.
    cfg = TrainConfig(dataset="digits", arch="small_cnn", T=2, batch_size=32, epochs=2, seed=3, device="cuda",
                      precision="bf16", channels_last=True, fused_neuron=True, fused_ws=True, cuda_graph=True)
    seen = []
    result = train(cfg, lambda m, s: seen.append(m))
    assert result.status == "completed" and [m["epoch"] for m in seen] == [1, 2]
    assert seen[-1]["test_acc"] > 0.5 and seen[-1]["peak_mem_mb"] > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA (bench/gpu_check.sh runs this)")
def test_cuda_epochs_never_make_the_host_wait_for_the_gpu():
    # A host sync inside the loop over batches (a blocking copy, .item(), bool of a tensor) idles the
    # GPU at every batch; CUDA's sync debug mode "error" raises at any. What a run does once (compiles,
    # cuDNN's choices, the capture, the AutoAugment tables) happens in a first epoch, outside it.
    import numpy as np
    from ndot.data import cifar
    from ndot.data.loader import DeviceLoader
    from ndot.evaluate import topk_correct

    cuda = torch.device("cuda")
    rng = np.random.default_rng(0)
    split = (rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 48))
    cfg = TrainConfig(dataset="cifar10", batch_size=16, loader="device", workers=0)  # every augmentation
    on_gpu, _ = cifar.build(cfg, cuda, split, split)
    workers, _ = cifar.build(dataclasses.replace(cfg, loader="cpu"), cuda, split, split)
    # Held in host memory, each batch moved (CIFAR10-DVS's loader "cpu"), then prepared on the GPU.
    from_host = DeviceLoader(torch.from_numpy(split[0]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(split[1]),
                             16, shuffle=True, prepare=cifar.DeviceRecipe(cfg, *cifar.NORMALISATION["cifar10"], True, cuda),
                             device=cuda)
    models = [accelerate(make_model(in_channels=3, dtype=torch.float32).cuda(), channels_last=True, fused_neuron=True,
                         fused_ws=True) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    step = partial(train_batch, rule="ndot", T=2, loss_alpha=0.05, precision="bf16")
    runs = [partial(step, models[0], opts[0], mode="O"), GraphedStep(partial(step, mode="A"), models[1], opts[1])]

    def epoch(loader, run) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, correct = torch.zeros((), device=cuda), torch.zeros((), device=cuda, dtype=torch.long)
        for x, y in loader:
            loss, logits = run(x, y)
            loss_sum += loss * len(y)
            correct += topk_correct(logits, y, 1)
        return loss_sum, correct

    for loader in (on_gpu, from_host, workers):
        for run in runs:
            epoch(loader, run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = [epoch(loader, run) for loader in (on_gpu, from_host, workers) for run in runs]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) and 0 <= int(correct) <= 48 for loss, correct in sums)


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("rule,mode", CASES)
def test_fast_path_gradients_equal_plain_path(rule, mode, device, dtype, exact_cudnn, monkeypatch):
    model, x, y = on(device, dtype)
    plain = grads(model(rule), rule, mode, x, y, T=3)
    fast_model, x, y = on(device, dtype, channels_last=True, fused_neuron=True, fused_ws=True)
    m = fast_model(rule)
    last = list(neurons(m))[-1]
    layouts = []
    last.register_forward_hook(lambda n, i, o: layouts.append(n.state["v"].is_contiguous(memory_format=torch.channels_last)))
    # A silent fall-back to eager would pass the comparison without testing anything: the fused
    # step's eager branch (tensors with no flat view) must not be taken by these layers.
    eager = []
    monkeypatch.setattr(fast, "neuron_step", lambda *a, **k: eager.append(a[0].shape) or neuron_step(*a, **k))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        fast_grads = grads(m, rule, mode, x, y, T=3)
    assert not eager, f"the fused neuron ran eagerly on {eager}"
    assert last.step_fn is fused_neuron_step()
    assert all(c.standardise_fn is fused_standardise() for c in m.modules() if isinstance(c, WSConv2d))
    if dtype == torch.float32:  # cuDNN keeps float64 convolutions in NCHW
        assert layouts and all(layouts)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        assert_close(fast_grads[name], plain[name], 1e-5 if dtype == torch.float32 else 1e-10, name)


# float64 on the CPU with OTTT: graphs no other test here compiles, so that their count starts from none.
OTTT_STEP = dict(rule="ottt", lam=0.5, v_th=1.0, alpha=4.0, signed=False, detach_reset=False, through_time=False,
                 trace=True, out_scale=2.74)


def _eager_and_fused(*currents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(eager, fused) pairs of s, v and â at each of the successive `currents`, a backward after each, and of their gradients."""
    runs = []
    for step in (neuron_step, fused_neuron_step()):
        state, outputs, grads = (None, None, None), [], []
        for c in currents:
            current = c.detach().requires_grad_()  # keeps the layout, gaps included, where clone would close them
            s, v, a, e = step(current, *state, **OTTT_STEP)
            s.backward(torch.ones_like(s))
            state = (v, a, e)
            outputs += [s, v, a]  # OTTT keeps no e
            grads.append(current.grad)
        runs.append(outputs + grads)
    return list(zip(*runs))


def test_the_fused_step_is_one_graph_for_every_layout_and_keeps_each_layout():
    g = torch.Generator().manual_seed(0)
    nchw = 2 * torch.randn(2, 6, 3, 5, dtype=torch.float64, generator=g)
    graphs = []
    for x in [nchw, nchw.to(memory_format=torch.channels_last), 2 * torch.randn(4, 7, dtype=torch.float64, generator=g)]:
        for eager, fused in _eager_and_fused(x, x):  # the first step and a later one: a graph each
            assert fused.shape == eager.shape and fused.stride() == eager.stride()
            assert_close(fused.detach(), eager.detach(), 1e-12)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0], f"graphs compiled after each layout: {graphs}"


def test_the_fused_standardisation_is_exact_for_every_layer_of_vgg11_in_a_few_graphs():
    convs = [m for m in build("vgg11_ws", 3, 10).double().modules() if isinstance(m, WSConv2d)]
    g = torch.Generator().manual_seed(0)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for fmt in (torch.contiguous_format, torch.channels_last):
        for c in convs:
            w = c.weight.detach().to(memory_format=fmt)
            gain = 1 + 0.1 * torch.randn(c.gain.shape, dtype=torch.float64, generator=g)
            grad_out = torch.randn(w.shape, dtype=torch.float64, generator=g).to(memory_format=fmt)
            with torch.no_grad():
                assert fused_standardise()(w, gain, c.eps).stride() == w.stride()
            runs = []
            for fn in (standardise, fused_standardise()):
                wi, gi = w.clone().requires_grad_(), gain.clone().requires_grad_()
                w_hat = fn(wi, gi, c.eps)
                w_hat.backward(grad_out)
                runs.append((w_hat.detach(), wi.grad, gi.grad))
            for eager, fused in zip(*runs):
                assert_close(fused, eager, 1e-12, f"{tuple(w.shape)} {fmt}")
    # Six distinct layer shapes x two layouts x two grad modes would be 24 graphs with a graph per shape;
    # the shapes share them (6 under torch 2.14), split by a few guards: the first layer's 3 input
    # channels equal the kernel's 3, and a fan-in above 4096 is reduced otherwise.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= 8, f"{graphs} graphs for 32 layer, layout and grad-mode cases"


# Ray Tune runs each trial of a reused worker process in a thread of its own, and Dynamo's config is
# per thread: a fresh process, so that the second trial's graphs are new to it.
TRIALS_IN_THREADS = textwrap.dedent("""
    import threading, torch
    from ndot.fast import fused_neuron_step
    from ndot.neuron import neuron_step

    def trial(rule, through_time, results):
        kw = dict(rule=rule, lam=0.5, v_th=1.0, alpha=4.0, signed=False, detach_reset=False,
                  through_time=through_time, trace=not through_time, out_scale=2.74)
        x = 2 * torch.randn(2, 6, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for step in (neuron_step, fused_neuron_step()):
                current = x.clone().requires_grad_()
                s, v, a, e = step(current, None, None, None, **kw)
                s2 = step(current, v, a, e, **kw)[0]
                (s + s2).sum().backward()
                results.append((s2.detach(), current.grad))

    for rule, through_time in (("ndot", False), ("bptt", True)):
        results = []
        thread = threading.Thread(target=trial, args=(rule, through_time, results))
        thread.start()
        thread.join()
        (s_eager, g_eager), (s_fused, g_fused) = results
        torch.testing.assert_close(s_fused, s_eager, rtol=0, atol=1e-12)
        torch.testing.assert_close(g_fused, g_eager, rtol=0, atol=1e-12)
        print(rule, "exact")
""")


def test_the_fused_step_compiles_alike_in_every_thread_as_the_trials_of_a_reused_tune_worker():
    proc = subprocess.run([sys.executable, "-c", TRIALS_IN_THREADS], capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0 and proc.stdout.split() == ["ndot", "exact", "bptt", "exact"], proc.stderr[-3000:]


def test_runs_of_several_taus_in_one_process_each_compile_within_the_recompile_limit(monkeypatch):
    # λ is baked into the fused step's graphs, a set of graphs per τ: in a notebook, or a Tune worker reused
    # over a τ sweep, the runs of a few τ reached Dynamo's limit, where fullgraph fails. A limit of one graph
    # stands for the real one here: each λ below needs one graph, and with the limit shared the second failed.
    monkeypatch.setattr(fast, "_RECOMPILE_LIMIT", 1)
    # This thread's configuration, if made here, is undone with the patch below: forgotten with it too, or a later
    # test's fused step took it as made and ran at Dynamo's default limit of 8 (FailOnRecompileLimitHit).
    monkeypatch.setattr(fast, "_configured", threading.local())
    kw = dict(rule="ndot", v_th=1.0, alpha=4.0, signed=False, detach_reset=False, through_time=False, trace=True,
              out_scale=1.5)  # c of no other test: graphs of their own
    x = 2 * torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for lam in (0.2, 0.3, 0.7):
            _, v, a, e = neuron_step(x, None, None, None, lam=lam, **kw)
            # A later step, the first that reads λ; the trace is updated in place, so each takes a copy.
            eager = neuron_step(x, v, a.clone(), e.clone(), lam=lam, **kw)
            fused = fused_neuron_step()(x, v, a.clone(), e.clone(), lam=lam, **kw)
            for f, want in zip(fused, eager):
                assert_close(f, want, 1e-12, f"lambda {lam}")


def test_the_fused_step_without_a_flat_view_is_still_exact():
    # A current with gaps in memory, and a layout that changes between steps: no flat view, so the
    # eager step takes the tensors as they are. (The flat graphs of the test above serve the NHWC step.)
    x = 2 * torch.randn(2, 12, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for currents in [(x[:, ::2],), (x.to(memory_format=torch.channels_last), x)]:
        for eager, fused in _eager_and_fused(*currents):
            assert_close(fused.detach(), eager.detach(), 1e-12)


@pytest.mark.parametrize("rule,option", [("ndot", "signed"), ("bptt", "detach_reset")])
def test_the_fused_step_runs_the_rule_options_as_the_eager_step(rule, option):
    """--signed_factor and --detach_reset are branches of the step that the fused comparisons above, all at
    the defaults, never compile. Potentials on multiples of 1/16 hit A = 0 exactly, where the signed factor
    λ·sign(A[t]) differs from λ; each option must change the eager result, or the check would be empty."""
    g = torch.Generator().manual_seed(4)
    currents = torch.randint(-8, 17, (4, 2, 8, 16), generator=g).double() / 8
    weights = torch.randn(currents.shape, dtype=torch.float64, generator=g)
    through_time = rule == "bptt"

    def run(step, on: bool) -> list[torch.Tensor]:
        kw = dict(rule=rule, lam=0.5, v_th=1.0, alpha=4.0, signed=False, detach_reset=False,
                  through_time=through_time, trace=not through_time, out_scale=2.74)
        kw[option] = on
        x = currents.clone().requires_grad_()
        state, outs, traces = (None, None, None), [], []
        for I, w in zip(x, weights):
            s, v, a, e = step(I, *state, **kw)
            state = (v, a, e)
            outs.append(s)
            if not through_time:  # each step's backward before the next, which updates â and e in place
                (w * s).sum().backward()
                traces.append(a.clone())
        if through_time:
            sum((w * s).sum() for w, s in zip(weights, outs)).backward()
        return [torch.stack(outs).detach(), x.grad, *traces]

    eager, fused = run(neuron_step, True), run(fused_neuron_step(), True)
    for i, (f, want) in enumerate(zip(fused, eager)):
        assert_close(f, want, 1e-12, f"{option}: output {i}")
    off = run(neuron_step, False)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(eager, off)), f"{option} changed nothing here"


@pytest.mark.parametrize("rule", RULES)
def test_channels_last_alone_is_exact_in_float64(rule):
    model, x, y = on("cpu", torch.float64)
    plain = grads(model(rule), rule, "A", x, y, T=3)
    fast_model, x, y = on("cpu", torch.float64, channels_last=True)
    fast = grads(fast_model(rule), rule, "A", x, y, T=3)
    for name in plain:
        assert_close(fast[name], plain[name], 1e-12, name)


def test_channels_last_draws_the_dropout_masks_of_the_plain_layout():
    # A mask is drawn in storage order: drawn in NHWC memory, the same generator would drop other neurons.
    x, y = batch(n=2, size=16)
    runs = []
    for channels_last in (False, True):
        model = accelerate(make_model(rule="ndot", dropout=0.3), channels_last=channels_last)
        runs.append(grads(model, "ndot", "A", x, y, T=3))
    plain, fast = runs
    for name in plain:
        assert_close(fast[name], plain[name], 1e-12, name)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("mode", "AO")
def test_bf16_fast_path_is_finite_and_close_to_fp32(mode, device):
    model, x, y = on(device, torch.float32)
    ref = grads(model("ndot"), "ndot", mode, x, y, T=3)
    fast_model, x, y = on(device, torch.float32, channels_last=True, fused_neuron=True, fused_ws=True)
    low = grads(fast_model("ndot"), "ndot", mode, x, y, T=3, precision="bf16")
    # bf16 ran: its rounding shows far beyond the fp32 fast path's 1e-5 (a run left in fp32 passes the rest).
    rel = max(((low[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    assert rel > 1e-3, f"gradients within {rel:.1e} of fp32: did bf16 run?"
    for name in ref:
        assert torch.isfinite(low[name]).all(), name
        # bf16 moves potentials across the threshold, so spikes (and with them
        # the readout's gradient) differ: the direction must still agree.
        cos = torch.nn.functional.cosine_similarity(low[name].flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.8, f"{name}: cosine {cos:.3f} to the fp32 gradient"


def test_trainer_applies_the_levers_and_trains_alike(monkeypatch):
    import ndot.train as train_module
    built = []  # the model each run trains: the real one, kept to see which functions its layers run
    real_from_config = train_module.from_config
    monkeypatch.setattr(train_module, "from_config", lambda *a: built.append(real_from_config(*a)) or built[-1])
    base = dict(dataset="digits", arch="small_cnn", T=1, batch_size=32, epochs=1, seed=3, device="cpu")
    runs = []
    for levers in ({}, {"channels_last": True, "fused_neuron": True, "fused_ws": True}):
        seen = []
        train(TrainConfig(**base, **levers), lambda m, s: seen.append((m, s)))
        runs.append(seen[-1])
    (plain, _), (fast, state) = runs
    assert state["model"]["features.2.weight"].is_contiguous(memory_format=torch.channels_last)
    # Each lever reached the layers: a trainer that dropped the fused ones would train alike too.
    plain_model, fast_model = built
    convs = lambda m: [c for c in m.modules() if isinstance(c, WSConv2d)]  # noqa: E731
    assert all(n.step_fn is fused_neuron_step() for n in neurons(fast_model))
    assert all(c.standardise_fn is fused_standardise() for c in convs(fast_model))
    assert all(n.step_fn is neuron_step for n in neurons(plain_model))
    assert all(c.standardise_fn is standardise for c in convs(plain_model))
    # One epoch of updates on gradients equal to rounding: the same loss to rounding.
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)


def _series(rule: str, mb: list[float], metric: str = "peak_mem_mb", cuda_graph: bool = False) -> list[dict]:
    case = {"kind": "snn", "arch": "vgg11_ws", "batch": 128, "rule": rule, "mode": "A", "precision": "bf16",
            "channels_last": True, "fused_neuron": True, "fused_ws": True, "cuda_graph": cuda_graph, "peak_mem_mb": None,
            "batch_peak_mb": None, "saved_mb": 1.0}
    return [{**case, "T": T, metric: m} for T, m in zip([1, 2, 4, 6, 20], mb)]


def test_online_memory_is_judged_flat_from_T_1():
    flat, rising, low_at_1, bptt = memory_checks(_series("ndot", [1000, 1000, 1010, 1020, 1040]) +
                                                 _series("ottt", [1000, 1000, 1020, 1040, 1100]) +
                                                 _series("sltt", [900, 1000, 1000, 1000, 1000]) +
                                                 _series("bptt", [900, 1300, 2100, 2900, 8500]))
    assert flat["ok"] and flat["metric"] == "peak_mem_mb" and flat["growth"] == pytest.approx(0.04)
    assert not rising["ok"]
    assert not low_at_1["ok"], "T = 1 is judged with the rest"
    assert bptt["ok"] and bptt["mb_per_step"] > 0


def test_memory_is_judged_at_every_T_and_bptts_as_a_line():
    hump, step = memory_checks(_series("ndot", [1000, 1000, 1200, 1000, 1000]) + _series("bptt", [900, 900, 900, 900, 8500]))
    assert not hump["ok"], "a peak between the ends is growth too"
    assert not step["ok"] and step["mb_per_step"] > 0 and step["r2"] < 0.99, "BPTT's memory grows by a step each, not at once"


def test_targets_are_the_issues_and_read_the_fastest_levers_at_the_lever_T():
    assert (report.A_BF16_OVER_CEILING, report.O_OVER_A_BF16, report.A_FP32_IMAGE_STEPS_PER_S) == (0.8, 0.85, 2.5 * 5_700)
    base = {"kind": "snn", "arch": "vgg11_ws", "batch": 128, "T": 4, **{k: False for k in Levers.__dataclass_fields__}}
    fused = {"fused_neuron": True, "channels_last": True}
    rows = [{**base, "rule": "ndot", "mode": "A", "precision": "bf16", "image_steps_per_s": 1000.0, "ratio_to_ceiling": 0.4},
            {**base, **fused, "rule": "ndot", "mode": "A", "precision": "bf16", "image_steps_per_s": 2000.0, "ratio_to_ceiling": 0.8},
            {**base, **fused, "rule": "ndot", "mode": "O", "precision": "bf16", "image_steps_per_s": 1800.0, "ratio_to_ceiling": 0.72},
            {**base, "rule": "ndot", "mode": "O", "precision": "bf16", "image_steps_per_s": 900.0, "ratio_to_ceiling": 0.36},
            # Over 14,000, under the 2.5 x 5,700 asked.
            {**base, "rule": "ndot", "mode": "A", "precision": "fp32", "image_steps_per_s": 14_100.0, "ratio_to_ceiling": None},
            {**base, "rule": "ndot", "mode": "O", "precision": "fp32", "image_steps_per_s": 11_280.0, "ratio_to_ceiling": None},
            {**base, **fused, "T": 2, "rule": "ndot", "mode": "A", "precision": "bf16", "image_steps_per_s": 9e9, "ratio_to_ceiling": 9.0}]
    got = report.targets(rows, {"lever_T": 4, "lever_arch": "vgg11_ws", "lever_batch": 128})
    assert got["ndot_A_bf16_ratio_to_ceiling"] == 0.8 and got["ndot_A_bf16_ok"] and got["ndot_A_bf16_levers"]["fused_neuron"]
    assert got["ndot_O_over_A_bf16"] == pytest.approx(0.9) and got["ndot_O_ok"] and got["ndot_O_bf16_levers"]["fused_neuron"]
    assert got["ndot_A_fp32_image_steps_per_s"] == 14_100 and not got["ndot_A_fp32_ok"]
    assert got["ndot_O_over_A_fp32"] == pytest.approx(0.8)  # no target, but docs/performance.md quotes it beside bf16's
    # No fp32 NDOT_O measured (its case failed): no ratio, the fp32 target still judged.
    without = report.targets([r for r in rows if (r["mode"], r["precision"]) != ("O", "fp32")],
                             {"lever_T": 4, "lever_arch": "vgg11_ws", "lever_batch": 128})
    assert "ndot_O_over_A_fp32" not in without and without["ndot_A_fp32_image_steps_per_s"] == 14_100
    assert "NDOT_A fp32 >= 14,250 image-steps/s" in got["note"]


def test_memory_is_judged_on_the_allocator_peak_where_there_is_one_else_on_the_batchs_own():
    on_cpu, = memory_checks(_series("ndot", [4.0, 4.0, 4.0, 4.0, 4.0], metric="batch_peak_mb"))
    replayed, = memory_checks(_series("ndot", [4.0, 4.0, 4.0, 4.0, 4.4], metric="batch_peak_mb", cuda_graph=True))
    older = [{k: v for k, v in r.items() if k != "batch_peak_mb"} for r in _series("ndot", [2.0] * 5, metric="saved_mb")]
    assert on_cpu["metric"] == "batch_peak_mb" and on_cpu["ok"]
    assert replayed["metric"] == "batch_peak_mb" and not replayed["ok"]
    assert memory_checks(older)[0]["metric"] == "saved_mb"


def test_cuda_graph_is_refused_without_cuda():
    with pytest.raises(ConfigError, match="cuda_graph"):
        TrainConfig(cuda_graph=True, device="cpu").validate()


H200_RUN = Path(__file__).parents[1] / "bench" / "results" / "h200-3bfcb5a"


def test_the_stored_h200_run_reads_back_into_the_tables_it_printed(capsys):
    # docs/performance.md's GPU figures: a run from before the fused_ws lever, which --table reads as off.
    assert bench_main(["--table", str(H200_RUN / "bench.jsonl")]) == 0
    assert capsys.readouterr().out == (H200_RUN / "bench.md").read_text()
    target, = (r for r in read_run(str(H200_RUN / "bench.jsonl")) if r["kind"] == "targets")
    assert target["ndot_A_bf16_ok"] and target["ndot_A_fp32_ok"] and not target["ndot_O_ok"]


def test_bench_small_prints_the_expected_json_lines(gpu_check_dry_run, capsys, tmp_path):
    # The dry run of bench/gpu_check.sh ran python -m ndot.bench --profile --small (test_gpu_check.py).
    _, out = gpu_check_dry_run
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "env" and kinds[-1] == "targets" and "error" not in kinds
    levers = {"channels_last", "fused_neuron", "fused_ws", "cuda_graph"}
    snn = [r for r in rows if r["kind"] == "snn"]
    assert {(r["rule"], r["mode"]) for r in snn} == {("ndot", "A"), ("ndot", "O"), ("ottt", "A"), ("sltt", "A"), ("bptt", "A")}
    for r in snn:
        assert {"arch", "T", "batch", "precision", "image_steps_per_s", "saved_mb", "peak_mem_mb", "batch_peak_mb",
                "ceiling_images_per_s", "ratio_to_ceiling"} | levers <= set(r)
        assert r["image_steps_per_s"] > 0 and r["ceiling_images_per_s"] > 0 and r["batch_peak_mb"] > 0 and r["saved_mb"] > 0
    ann = [r for r in rows if r["kind"] == "ann"]
    matmul = [r for r in rows if r["kind"] == "matmul"]
    assert {r["precision"] for r in matmul} == {"fp32", "bf16"} and all(r["tflop_per_s"] > 0 for r in matmul)
    gflop = gflop_per_image_step("small_cnn")
    assert all(r["tflop_per_s"] == pytest.approx(gflop * r["images_per_s"] / 1e3) for r in ann)
    assert all(r["tflop_per_s"] == pytest.approx(gflop * r["image_steps_per_s"] / 1e3) for r in snn)
    assert {r["precision"] for r in ann} == {"fp32", "bf16"} and all(r["images_per_s"] > 0 for r in ann)
    # The ceiling is the fastest ANN step under every lever that applies to one, the compiled standardisation too.
    assert {(r["channels_last"], r["fused_ws"]) for r in ann} == {(False, False), (True, False), (True, True)}
    assert {r["ceiling_images_per_s"] for r in snn} == {max(r["images_per_s"] for r in ann)}
    checks = [r for r in rows if r["kind"] == "memory_vs_T"]
    assert {c["rule"] for c in checks} == {"ndot", "ottt", "sltt", "bptt"}
    assert all(c["ok"] and c["metric"] == "batch_peak_mb" for c in checks), [c for c in checks if not c["ok"]]
    assert all(c["growth"] > 1 for c in checks if c["rule"] == "bptt")
    # A profile names the ops that own the most of a batch: what its "other" holds.
    profiles = [r for r in rows if r["kind"] == "profile"]
    assert {(r["rule"], r["mode"], r["precision"]) for r in profiles} == {("ndot", m, p) for m in "AO" for p in ("fp32", "bf16")}
    for prof in profiles:
        ops = prof["top_ops"]
        # A convolution's backward: the dispatcher's wrapper, or the kernel it owns its time to (bf16 on a CPU
        # runs aten::_slow_conv2d_backward, and the wrapper's own time then falls out of the top ops).
        assert ops and any("conv" in o["op"] and "backward" in o["op"] for o in ops), ops
        assert all(o["ms_per_batch"] > 0 and o["calls_per_batch"] > 0 for o in ops)
        assert sum(o["ms_per_batch"] for o in ops) <= prof["batch_ms"]
    # What autograd saves is the same to the byte at every T.
    saved: dict[tuple, set] = {}
    for r in snn:
        saved.setdefault((r["rule"], r["mode"], r["precision"], *(r[k] for k in levers)), set()).add(r["saved_mb"])
    assert all(len(v) == 1 for k, v in saved.items() if k[0] != "bptt"), saved

    # --table of a run cut short before its summaries shows the same summaries, read off its rows.
    def markdown(kept: list[dict]) -> str:
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        assert bench_main(["--table", str(tmp_path / "rows.jsonl")]) == 0
        return capsys.readouterr().out

    whole = markdown(rows)
    assert "Memory over T" in whole and "Targets" in whole and "Against the device" in whole
    assert markdown([r for r in rows if r["kind"] not in ("memory_vs_T", "targets")]) == whole


def test_against_the_device_names_the_ceiling_only_in_its_own_precision():
    # On a GPU the ceiling is the bf16 step under graph replay; fp32's fastest ANN step is slower, and not it.
    ann = {"kind": "ann", "arch": "vgg11_ws", "batch": 128, **dataclasses.asdict(Levers())}
    rows = [{"kind": "matmul", "precision": p, "n": 8192, "math": p, "tflop_per_s": 700.0} for p in ("fp32", "bf16")]
    rows += [{**ann, "precision": "fp32", "images_per_s": 22_000.0, "tflop_per_s": 80.0},
             {**ann, "precision": "bf16", "images_per_s": 35_000.0, "tflop_per_s": 127.0}]
    names = {(line[0], line[1]) for line in _against_device(rows, {"lever_arch": "vgg11_ws", "lever_batch": 128})}
    assert ("fp32", "ANN step") in names and ("bf16", "ANN step (the ceiling)") in names


def test_the_against_the_device_table_holds_each_precisions_fastest_cases_as_fractions_of_its_matrix_product():
    # The stored H200 run predates the matrix product rows, so its tables never show this section.
    plain = dataclasses.asdict(Levers())
    case = {"arch": "vgg11_ws", "batch": 128, **plain, "peak_mem_mb": None, "batch_peak_mb": None, "saved_mb": 1.0,
            "ratio_to_ceiling": None, "image_steps_per_s": 1.0}
    rows = [{"kind": "env", "lever_T": 4, "lever_arch": "vgg11_ws", "lever_batch": 128},
            {"kind": "matmul", "precision": "fp32", "n": 8192, "math": "tf32", "tflop_per_s": 100.0},
            {"kind": "matmul", "precision": "bf16", "n": 8192, "math": "bf16", "tflop_per_s": 400.0},
            {**case, "kind": "ann", "precision": "fp32", "images_per_s": 20_000.0, "tflop_per_s": 40.0},
            {**case, "kind": "ann", "precision": "bf16", "images_per_s": 30_000.0, "tflop_per_s": 80.0}]
    for precision, rule, mode, T, tflop, levers in (
            ("fp32", "ndot", "A", 4, 30.0, {}), ("fp32", "ndot", "O", 4, 70.0, {}),
            ("bf16", "ndot", "A", 4, 60.0, {"channels_last": True}), ("bf16", "ndot", "A", 4, 55.0, {}),
            ("bf16", "ndot", "O", 4, 48.0, {}), ("bf16", "ndot", "A", 2, 90.0, {}), ("bf16", "ottt", "A", 4, 95.0, {})):
        rows.append({**case, **levers, "kind": "snn", "precision": precision, "rule": rule, "mode": mode, "T": T,
                     "tflop_per_s": tflop})
    expected = "\n".join([
        "| precision | case | levers | TFLOP/s | x matrix product |",
        "|---|---|---|---|---|",
        "| fp32 | matrix product 8192^3 (tf32) | – | 100 | 1.00 |",
        "| fp32 | ANN step | plain | 40 | 0.40 |",
        "| fp32 | ndot_A T=4 | plain | 30 | 0.30 |",
        "| fp32 | ndot_O T=4 | plain | 70 | 0.70 |",
        "| bf16 | matrix product 8192^3 (bf16) | – | 400 | 1.00 |",
        "| bf16 | ANN step (the ceiling) | plain | 80 | 0.20 |",
        "| bf16 | ndot_A T=4 | channels_last | 60 | 0.15 |",
        "| bf16 | ndot_O T=4 | plain | 48 | 0.12 |",
    ])
    assert expected + "\n" in report.table(rows) + "\n"  # the whole section: no other row follows


def test_the_tables_tell_apart_the_architectures_batches_and_levers_of_checks_and_errors():
    # Without those columns a run at --batch-size 64,128 printed two memory rows alike, and the per-lever runs'
    # failures (an OOM without the graph, a capture error with it) the same case twice.
    series = _series("ndot", [1000.0] * 5) + [{**r, "batch": 64, "peak_mem_mb": 500.0} for r in _series("ndot", [0.0] * 5)]
    plain = dataclasses.asdict(Levers())
    errors = [{"kind": "error", "case": "snn", "arch": "vgg11_ws", "batch": 128, "args": ["ndot", "A", 4, "bf16"], **plain,
               "cuda_graph": graph, "error": "RuntimeError: out of memory"} for graph in (False, True)]
    errors.append({"kind": "error", "case": "matmul", "arch": "vgg11_ws", "batch": 128, "args": ["bf16", 8192], **plain,
                   "error": "RuntimeError: out of memory"})
    lines = report.table(memory_checks(series) + errors).splitlines()
    memory = [line for line in lines if "| peak_mem_mb |" in line]
    assert [line.split(" | ")[:3] for line in memory] == [["| vgg11_ws", "128", "ndot_A"], ["| vgg11_ws", "64", "ndot_A"]]
    assert lines[lines.index("Errors") + 2:] == [
        "| case | arch | batch | args | levers | error |", "|---|---|---|---|---|---|",
        "| snn | vgg11_ws | 128 | ['ndot', 'A', 4, 'bf16'] | plain | RuntimeError: out of memory |",
        "| snn | vgg11_ws | 128 | ['ndot', 'A', 4, 'bf16'] | cuda_graph | RuntimeError: out of memory |",
        "| matmul | – | – | ['bf16', 8192] | – | RuntimeError: out of memory |"]


def test_memory_over_T_is_judged_per_precision():
    # fp32 holds twice bf16's activations: one series of both would read as growth.
    bf16 = _series("ndot", [1000.0] * 5)
    fp32 = [{**r, "precision": "fp32"} for r in _series("ndot", [2000.0] * 5)]
    checks = memory_checks(bf16 + fp32)
    assert sorted((c["precision"], c["mb"][0], c["ok"]) for c in checks) == [("bf16", 1000.0, True), ("fp32", 2000.0, True)]


def test_bench_sweeps_batch_sizes_each_against_its_own_ceiling_and_reads_the_targets_at_the_first(capsys):
    argv = ["--small", "--batch", "4,8", "--T", "1,4", "--rules", "ndot_A,ndot_O", "--precisions", "fp32",
            "--ablation-T", "0", "--warmup", "0", "--min-seconds", "0.01"]
    assert bench_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["lever_batch"] == 4 and rows[0]["lever_arch"] == "small_cnn"
    ceiling = {b: max(r["images_per_s"] for r in rows if r["kind"] == "ann" and r["batch"] == b) for b in (4, 8)}
    snn = [r for r in rows if r["kind"] == "snn"]
    assert sorted((r["batch"], r["mode"], r["T"]) for r in snn) == [(b, m, T) for b in (4, 8) for m in "AO" for T in (1, 4)]
    assert all(r["ceiling_images_per_s"] == ceiling[r["batch"]] for r in snn)
    assert sorted((c["batch"], c["mode"]) for c in rows if c["kind"] == "memory_vs_T") == [(4, "A"), (4, "O"), (8, "A"), (8, "O")]
    target = rows[-1]
    a4 = next(r for r in snn if (r["batch"], r["mode"], r["T"]) == (4, "A", 4))
    assert (target["kind"], target["batch"], target["T"]) == ("targets", 4, 4)
    assert target["ndot_A_fp32_image_steps_per_s"] == a4["image_steps_per_s"]


@pytest.mark.parametrize("fused", [False, True])
def test_the_profile_ties_each_backward_node_to_the_region_whose_forward_made_it(fused):
    s = Setup(torch.device("cpu"), "small_cnn", 4, 0, 0.01)
    model, opt = labelled_model(s, Levers(channels_last=fused, fused_neuron=fused, fused_ws=fused), "ndot")
    x, y = synthetic_batch(s)
    step = partial(train_batch, model, opt, x, y, rule="ndot", mode="A", T=3, loss_alpha=0.05)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    regions = backward_regions(events)
    found: dict[str | None, list[str]] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function: "):
            found.setdefault(regions.get(e.sequence_nr), []).append(e.name.split(": ")[1])
    lifs, convs = len(list(neurons(model))), sum(isinstance(m, WSConv2d) for m in model.modules())
    if fused:  # one compiled node per neuron and step, one per layer's standardisation (mode A: once a batch)
        assert found["neuron"].count("CompiledFunctionBackward") == lifs * 3, found["neuron"]
        # and the flat views that the compiled step is called on
        assert set(found["neuron"]) - {"CompiledFunctionBackward"} <= {"PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0"}
        assert found["standardise"].count("CompiledFunctionBackward") == convs, found["standardise"]
    else:  # the surrogate at every step, the membrane's sum from the second on
        assert sorted(set(found["neuron"])) == ["AddBackward0", "SpikeFnBackward"]
        assert found["neuron"].count("SpikeFnBackward") == lifs * 3 and found["neuron"].count("AddBackward0") == lifs * 2
        assert {"MeanBackward1", "VarBackward0"} <= set(found["standardise"]) and "SpikeFnBackward" not in found["standardise"]
    # The convolutions, pooling, readout and loss belong to neither.
    assert {"TracedConv2dBackward", "ConvolutionBackward0"} <= set(found[None])
    assert not {"TracedConv2dBackward", "ConvolutionBackward0"} & set(found["neuron"] + found["standardise"])


def test_the_flop_count_is_vgg11s_convolutions_and_readout_forward_and_backward():
    # The spec's VGG-11 on 3x32x32 (c_in, c_out, side), a pool after the 2nd, 4th and 6th conv; 512 -> 10 readout.
    convs = [(3, 64, 32), (64, 128, 32), (128, 256, 16), (256, 256, 16), (256, 512, 8), (512, 512, 8), (512, 512, 4), (512, 512, 4)]
    forward = [2 * side * side * c_out * c_in * 9 for c_in, c_out, side in convs] + [2 * 512 * 10]
    # Backward: a weight gradient for every layer, an input gradient for all but the first (the image needs none).
    assert gflop_per_image_step("vgg11_ws") * 1e9 == pytest.approx(3 * sum(forward) - forward[0], rel=1e-12)


@pytest.mark.parametrize("argv, says", [
    (["--arch", "nope"], "unknown architecture 'nope'"),
    (["--T", "0"], "T must be an integer in [1, 10000]"),
    (["--precisions", "fp16"], "unknown precision 'fp16'"),
    (["--rules", "bptt_O"], "argument --rules: rule 'bptt' needs the whole sequence"),
    (["--rules", "ndot_X"], "argument --rules: unknown mode 'X'; valid modes: O, A"),
    (["--batch", "0"], "batch_size must be a positive integer"),
    (["--batch", "8,0"], "batch_size must be a positive integer"),
    (["--ablation-T", "-1"], "--ablation-T"),
    (["--T", "1,,2"], "comma-separated list of int"),
    (["--threads", "0"], "--threads: must be a whole number in [1, "),
    (["--threads", "100000"], "--threads: must be a whole number in [1, "),
    (["--ablation-T", "100000"], "--ablation-T must be in [0, 10000]"),
    (["--device", "mps"], "device must be 'auto', 'cpu' or 'cuda[:N]'"),
    (["--device", "meta"], "device must be 'auto', 'cpu' or 'cuda[:N]'"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--min-seconds", "0"], "--min-seconds must be a finite number > 0"),
    (["--min-seconds", "nan"], "--min-seconds must be a finite number > 0"),
    (["--min-seconds", "inf"], "--min-seconds must be a finite number > 0"),
    (["--out", "/nonexistent/rows.jsonl"], "cannot open --out /nonexistent/rows.jsonl"),
    (["--out", ""], "--out: must name a file or folder, got an empty string"),  # not: no --out at all
    (["--table", "rows.jsonl"], "--table prints a run's rows and measures nothing: --small would be ignored"),
] + ([] if CUDA else [(["--levers", "cuda_graph"], "CUDA device"), (["--device", "cuda"], "CUDA device")]))
def test_bench_refuses_bad_input_in_one_line_before_measuring(argv, says, capsys):
    assert exit_status(bench_main, ["--small", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and says in captured.err


@pytest.mark.parametrize("content, says", [
    (None, "cannot read --table"),
    ("no path", "cannot read --table"),
    ("", "holds no rows"),
    ('{"epoch": 1, "train_loss": 0.5, "test_acc": 0.9}\n', "line 1 is not a row of python -m ndot.bench"),
    ('{"kind": "env", "device": "cpu"}\n[1, 2]\n', "line 2 is not a row of python -m ndot.bench"),
    ('{"kind": "env", "device": "cpu"}\n\nnot json\n{"kind": "env", "device": "cpu"}\n', "line 3 is not JSON"),
    ('not json\n', "line 1 is not JSON"),
])
def test_bench_table_refuses_a_file_that_is_not_a_run_in_one_line(content, says, tmp_path, capsys, monkeypatch):
    # Read as no --table, "" would start the full-size benchmark: an hour on a CPU, not a failure.
    monkeypatch.setattr(bench_cli, "plan", lambda *a: pytest.fail("--table measured instead of reading"))
    path = tmp_path / "metrics.jsonl"
    if content not in (None, "no path"):
        path.write_text(content)
    assert exit_status(bench_main, ["--table", "" if content == "no path" else str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and says in captured.err


def test_bench_table_refuses_the_flags_of_a_measurement_in_one_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"kind": "env", "device": "cpu"}\n')
    argv = ["--table", str(rows), "--out", str(tmp_path / "tables.md"), "--T", "2"]
    assert exit_status(bench_main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "measures nothing: --T, --out would be ignored" in captured.err, captured.err


def test_bench_table_reads_a_run_whose_last_row_was_cut_off(tmp_path):
    # A run killed mid-write (a device's time limit) keeps every row but its last, half-written one.
    path = tmp_path / "bench.jsonl"
    path.write_text('{"kind": "env", "device": "cpu"}\n{"kind": "ann", "arch')
    assert read_run(str(path)) == [{"kind": "env", "device": "cpu"}]
    # A run appended to it after that starts on a line of its own: the half row is cut off.
    with bench_cli._open_out(str(path)) as out:
        out.write('{"kind": "env", "device": "cuda"}\n')
    assert read_run(str(path)) == [{"kind": "env", "device": "cpu"}, {"kind": "env", "device": "cuda"}]


def test_bench_measures_an_architecture_that_a_module_named_in_imports_registers(user_arch):
    module, arch = user_arch
    cpu = torch.device("cpu")
    args = ["--small", "--archs", arch]
    with pytest.raises(ConfigError, match=f"unknown architecture '{arch}'"):
        bench_cli.check_plan(bench_cli.plan(bench_cli._parser().parse_args(args), cpu), cpu)
    bench_cli.check_plan(bench_cli.plan(bench_cli._parser().parse_args([*args, "--imports", module]), cpu), cpu)
    # Its FLOPs, counted on its ANN twin as for ndot's own: two 3x3 convolutions (3 -> 16 channels at 16x16, 16 -> 32
    # at 8x8) and the 32 -> 10 readout, forward and backward (no input gradient for the image).
    forward = [2 * 16 * 16 * 16 * 3 * 9, 2 * 8 * 8 * 32 * 16 * 9, 2 * 32 * 10]
    assert gflop_per_image_step(arch) * 1e9 == pytest.approx(3 * sum(forward) - forward[0], rel=1e-12)


def test_each_benchmark_case_starts_from_the_same_weights_and_leaves_the_callers_generator_alone():
    # Run from a notebook, the benchmark seeded torch's global generator: the caller's later draws were seed 0's.
    s = Setup(torch.device("cpu"), "small_cnn", batch=2, warmup=0, min_seconds=0.0)
    torch.manual_seed(7)
    drawn = torch.get_rng_state()
    one, _ = fresh_model(s, Levers())
    assert torch.equal(torch.get_rng_state(), drawn)
    two, _ = fresh_model(s, Levers())
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))


def test_bench_plans_the_documented_sizes_and_reads_the_targets_at_the_lever_T():
    # docs/performance.md: the default is the real size (VGG-11-WS, batch 128, T 1, 2, 4, 6, 20, fp32 and bf16), targets
    # read at the per-lever T, 4 by default; --small is small_cnn, batch 8, T 1, 2, 4, one thread, lever T 2.
    cpu = torch.device("cpu")
    real = bench_cli.plan(bench_cli._parser().parse_args([]), cpu)
    assert (real["archs"], real["batches"], real["Ts"], list(real["precisions"]), real["ablation_T"], real["threads"]) == \
        (["vgg11_ws"], [128], [1, 2, 4, 6, 20], ["fp32", "bf16"], 4, None)
    small = bench_cli.plan(bench_cli._parser().parse_args(["--small"]), cpu)
    assert (small["archs"], small["batches"], small["Ts"], small["ablation_T"], small["threads"]) == (["small_cnn"], [8], [1, 2, 4], 2, 1)
    # --ablation-T 0 (no per-lever runs) is allowed, and the targets are then read at T = 4.
    none = bench_cli.plan(bench_cli._parser().parse_args(["--small", "--ablation-T", "0"]), cpu)
    bench_cli.check_plan(none, cpu)
    assert bench_cli.lever_case(none) == {"lever_arch": "small_cnn", "lever_batch": 8, "lever_T": 4}


def test_the_benchmark_imports_nothing_the_gpu_machine_lacks():
    code = ("import sys, ndot, ndot.bench.cli, ndot.bench.data, ndot.train; "
            "bad = {'ray', 'optuna', 'tonic', 'faery'} & {m.split('.')[0] for m in sys.modules}; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1)])
def test_cuda_graph_replay_refuses_an_optimiser_it_cannot_replay(make):
    # Checked at construction, before any CUDA call: so on this CPU too. Any other optimiser's state
    # would be created inside the capture, and a first step with dampening differs from a later one.
    model = make_model(rule="ndot")
    with pytest.raises(ValueError, match="SGD with dampening 0 only"):
        GraphedStep(partial(train_batch, rule="ndot", mode="A", T=1, loss_alpha=0.05), model, make(model.parameters()))


def test_timed_runs_at_least_three_calls_after_its_warmup_and_one_probe():
    from ndot.bench.measure import timed
    calls = []
    seconds, peak = timed(lambda: calls.append(1), torch.device("cpu"), warmup=2, min_seconds=1e-12)
    assert len(calls) == 2 + 1 + 3 and seconds > 0 and peak is None


def test_matmul_tflops_count_a_multiply_and_an_add_per_term(monkeypatch):
    from ndot.bench import measure
    monkeypatch.setattr(measure, "timed", lambda *a, **k: (1e-3, None))
    row = measure.bench_matmul(Setup(torch.device("cpu"), "small_cnn", 1, 0, 0.01), "fp32", 64)
    assert row["tflop_per_s"] == pytest.approx(2 * 64**3 / 1e-3 / 1e12)


def test_no_peak_memory_is_reported_under_graph_replay():
    # A replay allocates nothing the allocator's peak would see: its figure would be a false low.
    from ndot.bench.measure import _unless_graph
    assert _unless_graph(5.0, Levers(cuda_graph=True)) is None and _unless_graph(5.0, Levers()) == 5.0


def test_every_batch_runs_the_whole_grid_even_where_the_first_batchs_lever_runs_cover_it():
    cpu = torch.device("cpu")
    args = bench_cli._parser().parse_args(["--small", "--batch", "4,8", "--T", "2", "--rules", "ndot_A",
                                           "--precisions", "fp32", "--ablation-T", "2"])
    snn = [(s.batch, case) for kind, s, case in bench_cli.cases(bench_cli.plan(args, cpu), cpu) if kind == "snn"]
    grid_case = ("ndot", "A", 2, "fp32", Levers())
    # Batch 4's lever runs hold the grid's case (run once); batch 8 has no lever runs, so the grid runs it.
    assert snn.count((4, grid_case)) == 1 and snn.count((8, grid_case)) == 1


def test_the_grids_lists_take_the_sweeps_spellings_and_their_own_first_ones():
    cpu = torch.device("cpu")
    plan = lambda argv: bench_cli.plan(bench_cli._parser().parse_args(["--small", *argv]), cpu)
    for argv in (["--archs", "resnet_ws", "--batch-size", "4,16"], ["--arch", "resnet_ws", "--batch", "4,16"],
                 ["--archs=resnet_ws", "--batch_size=4,16"]):
        assert (plan(argv)["archs"], plan(argv)["batches"]) == (("resnet_ws",), (4, 16)), argv


def test_small_runs_on_one_thread_unless_told_and_full_size_keeps_torchs():
    cpu = torch.device("cpu")
    plan = lambda argv: bench_cli.plan(bench_cli._parser().parse_args(argv), cpu)["threads"]
    assert (plan(["--small"]), plan(["--small", "--threads", "2"]), plan([])) == (1, 2, None)


def test_a_case_that_raises_is_an_error_row_and_the_run_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "bench_matmul", lambda s, precision, n: {"kind": "matmul", "precision": precision,
                                                                            "n": n, "math": precision, "tflop_per_s": 1.0})
    monkeypatch.setattr(bench_cli, "bench_ann", lambda s, precision, lv: {
        "kind": "ann", "arch": s.arch, "batch": s.batch, "precision": precision, **dataclasses.asdict(lv),
        "images_per_s": 10.0, "tflop_per_s": 1.0, "step_ms": 1.0, "peak_mem_mb": None})

    def oom(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench_cli, "bench_snn", oom)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not --small's one thread, which ends with the command
    try:
        assert bench_main(["--small", "--T", "1", "--rules", "ndot_A", "--precisions", "fp32", "--ablation-T", "0"]) == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] for r in rows if r["kind"] == "error"] == ["RuntimeError: out of memory"]
    assert rows[0]["kind"] == "env" and rows[0]["cpu_threads"] == 1, rows[0]  # measured on --small's one thread


def test_each_case_says_which_of_how_many_it_is_before_it_is_measured(caplog):
    # A GPU run measures some hundred cases, and one can compile for minutes: its rows alone said neither.
    cpu = torch.device("cpu")
    args = bench_cli._parser().parse_args(["--small", "--T", "1", "--rules", "ndot_A", "--precisions", "fp32",
                                           "--ablation-T", "0", "--warmup", "0", "--min-seconds", "0.001"])
    p = {**bench_cli.plan(args, cpu), "ann_levers": [Levers()], "matmul_n": 64}
    caplog.set_level(logging.INFO, logger="ndot")
    said_before = []  # the progress lines there were when each row came
    bench_cli.run_cases(p, cpu, lambda row: said_before.append((row["kind"], len(caplog.messages))))
    assert caplog.messages == ["bench: 1/3 matmul 64x64 fp32", "bench: 2/3 ann small_cnn batch 8: fp32 plain",
                               "bench: 3/3 snn small_cnn batch 8: ndot_A T=1 fp32 plain"]
    assert said_before == [("env", 0), ("matmul", 1), ("ann", 2), ("snn", 3)]


def test_levers_read_back_as_written():
    for text in ("plain", "channels_last", "channels_last+fused_neuron+fused_ws+cuda_graph"):
        assert str(Levers.parse(text)) == text


def test_the_profile_puts_each_part_of_a_batch_in_its_category():
    from ndot.bench.profile import CATEGORIES, profile_snn
    row = profile_snn(Setup(torch.device("cpu"), "small_cnn", 2, 0, 0.01), "ndot", "A", 1, "fp32", Levers(), batches=1)
    ms = row["ms_per_batch"]
    assert set(ms) == {*CATEGORIES, "other"}
    # Every category is found: the backward of the neuron and of the standardisation apart from their forward.
    assert all(ms[c] > 0 for c in CATEGORIES), ms
    assert sum(row["fraction"].values()) == pytest.approx(1.0)
    # The optimiser's step is SGD's time; zeroing the gradients is not.
    from types import SimpleNamespace
    from ndot.bench.profile import _category
    assert _category(SimpleNamespace(name="Optimizer.step#SGD.step", sequence_nr=-1), {}) == "sgd"
    assert _category(SimpleNamespace(name="Optimizer.zero_grad#SGD.zero_grad", sequence_nr=-1), {}) is None


def test_the_fused_standardisation_of_the_parameters_themselves_shares_its_graphs():
    # The test above passes detached copies; the model passes its parameters, whose shapes Dynamo holds
    # static (a graph per layer shape, all of VGG-11's in one epoch) unless fused_standardise hides them.
    convs = [m for m in build("vgg11_ws", 3, 10).double().modules() if isinstance(m, WSConv2d)]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for c in convs:
        w_hat = fused_standardise()(c.weight, c.gain, c.eps)
        assert_close(w_hat.detach(), standardise(c.weight, c.gain, c.eps).detach(), 1e-12, str(tuple(c.weight.shape)))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= 3, f"{graphs} graphs for the {len(convs)} convs' parameters"
