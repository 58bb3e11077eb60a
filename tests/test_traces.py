"""The presynaptic traces against independent formulas (spec §2)."""
import numpy as np
import pytest
import torch

from ndot.config import RULES
from ndot import neuron
from ndot.layers import LIF

LAM, VTH = 0.5, 1.0


def run_lif(currents: np.ndarray, rule: str, signed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drive a trained-mode LIF with the given currents [T, N]; returns (s, A, â) per step."""
    lif = LIF(tau=1 / (1 - LAM), v_th=VTH)
    lif.rule, lif.signed = rule, signed
    lif.train()
    s_, A_, a_ = [], [], []
    for I in torch.tensor(currents, dtype=torch.float64):
        s, a = lif(I)
        # Copies: the next step writes its trace into this one's buffer. The neuron keeps u; A is u after the reset.
        u = lif.state["v"].numpy()
        s_.append(s.numpy().copy())
        A_.append(u - VTH * (u >= VTH))
        a_.append(a.numpy().copy())
    return np.array(s_), np.array(A_), np.array(a_)


def drive(lif: LIF, currents: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Each step's output s (in the graph), trace â and membrane u (copies: the next step writes into them)."""
    outs, traces, potentials = [], [], []
    for I in currents:
        s, a = lif(I)
        outs.append(s)
        traces.append(None if a is None else a.detach().clone())
        potentials.append(lif.state["v"].detach().clone())
    return outs, traces, torch.stack(potentials)


def dyadic_dynamics(T: int, n: int, seed: int) -> np.ndarray:
    """Currents whose post-reset potentials A[t] are chosen from multiples of 1/8,
    zero included, so that zero denominators and binding clamps occur exactly."""
    rng = np.random.default_rng(seed)
    A_prev = np.zeros(n)
    currents = []
    for _ in range(T):
        A = rng.integers(-8, 8, n) / 8.0
        fire = (A >= 0) & (rng.random(n) < 0.5)
        u = A + VTH * fire
        currents.append(u - LAM * A_prev)
        A_prev = A
    return np.array(currents)


def naive_factor(num: float, den: float, signed: bool) -> float:
    if den == 0:
        return LAM * np.sign(num) if signed else LAM
    return min(max(num / den, -LAM), LAM)


def naive_trace(s: np.ndarray, q: np.ndarray, t: int, n: int, signed: bool, current_step: bool) -> float:
    """â[t] = Σ_k (Π_{i=k}^{t-1} e[i]) s[k] with e[i] from q; for the reference
    rule the factor applied at step i+1 is e_ref[i+1] instead of e[i]."""
    total = 0.0
    for k in range(t + 1):
        prod = 1.0
        for i in range(k, t):
            j = i + 1 if current_step else i
            prod *= naive_factor(q[j, n], q[j - 1, n] if j > 0 else 0.0, signed)
        total += prod * s[k, n]
    return total


@pytest.mark.parametrize("signed", [False, True])
def test_ndot_trace_equals_product_formula(signed):
    currents = dyadic_dynamics(T=8, n=64, seed=3)
    s, A, a = run_lif(currents, "ndot", signed)
    # The dynamics must exercise what the formula is about.
    ratios = A[1:] / np.where(A[:-1] == 0, np.nan, A[:-1])
    assert (A[:-1] == 0).any() and (np.abs(ratios) > LAM).any() and (a < 0).any()
    for t in range(8):
        for n in range(64):
            assert a[t, n] == pytest.approx(naive_trace(s, A, t, n, signed, current_step=False), abs=1e-12)


def test_ndot_trace_telescopes_where_the_clamp_does_not_bind():
    rng = np.random.default_rng(5)
    T, n = 10, 32
    # A[t] = r A[t-1] with 0.2 <= |r| <= 0.45 < λ: every ratio is inside the clamp.
    A = [rng.uniform(0.1, 0.9, n)]
    for _ in range(T - 1):
        A.append(rng.choice([-1, 1], n) * rng.uniform(0.2, 0.45, n) * A[-1])
    A = np.array(A)
    fire = (A >= 0) & (rng.random((T, n)) < 0.5)
    u = A + VTH * fire
    currents = u - LAM * np.vstack([np.zeros(n), A[:-1]])
    s, A_run, a = run_lif(currents, "ndot")
    np.testing.assert_allclose(A_run, A, atol=1e-12)
    A = A_run  # the identity holds for the potentials the neuron computed
    for t in range(1, T):
        # Π_{i=k}^{t-1} e[i] = A[t-1] / A[k-1] for k >= 2; e[1] = λ (A[0] = 0).
        expect = s[t] + LAM * A[t - 1] / A[0] * s[0] + sum(A[t - 1] / A[k - 1] * s[k] for k in range(1, t))
        np.testing.assert_allclose(a[t], expect, rtol=1e-10, atol=1e-12)


def test_ndot_ref_trace_equals_product_formula():
    currents = dyadic_dynamics(T=8, n=64, seed=4)
    s, A, a = run_lif(currents, "ndot_ref")
    q = A - VTH * s
    for t in range(8):
        for n in range(64):
            assert a[t, n] == pytest.approx(naive_trace(s, q, t, n, False, current_step=True), abs=1e-12)


def test_ndot_ref_hand_computed():
    # λ = 0.5, Vth = 1, one neuron:
    # t=1: u = 1.5, s = 1, A = 0.5,   q = A - s = -0.5,  â = 1
    # t=2: u = 0.45, s = 0, A = 0.45, q = 0.45,  e_ref = 0.45 / -0.5 = -0.9 -> -0.5,  â = -0.5
    # t=3: u = 1.225, s = 1, A = 0.225, q = -0.775, e_ref = -0.775 / 0.45 -> -0.5,  â = 0.25 + 1 = 1.25
    # t=4: u = 0.1125 + 0.8875 = 1.0, s = 1, A = 0, q = -1,  e_ref = -1 / -0.775 -> 0.5,  â = 0.625 + 1 = 1.625
    # t=5: u = 0 + 0.3 = 0.3, s = 0, A = 0.3, q = 0.3, e_ref = 0.3 / -1 = -0.3,  â = -0.4875
    # t=6: u = 0.15 - 0.15 = 0, s = 0, A = 0, q = 0, e_ref = 0 / 0.3 = 0,  â = 0
    # t=7: u = 0.2, s = 0, A = 0.2, q = 0.2, e_ref = 0.2 / 0 -> λ (zero denominator),  â = 0
    currents = np.array([[1.5], [0.2], [1.0], [0.8875], [0.3], [-0.15], [0.2]])
    s, _, a = run_lif(currents, "ndot_ref")
    np.testing.assert_array_equal(s[:, 0], [1, 0, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(a[:, 0], [1, -0.5, 1.25, 1.625, -0.4875, 0.0, 0.0], atol=1e-12)
    # The paper's factor on the same dynamics uses e[t-1] = A[t-1] / A[t-2]:
    # e[1] = λ (A[0] = 0), e[2] = 0.45/0.5 -> 0.5, e[3] = 0.225/0.45 = 0.5, e[4] = 0/0.225 = 0, e[5] = 0.3/0 -> λ, e[6] = 0
    s, _, a = run_lif(currents, "ndot")
    np.testing.assert_allclose(a[:, 0], [1, 0.5, 1.25, 1.625, 0.0, 0.0, 0.0], atol=1e-12)


def test_a_negative_potential_after_a_zero_one_takes_lambda():
    # The default reading of an undefined ratio is λ whatever the numerator's sign, -inf included.
    # (Under the signed reading this case never reaches a trace: a zero potential before it makes
    # the factor before it λ·sign(0) = 0.)
    # t=1: u = 1, s = 1, A = 0, â = 1.   t=2: u = 1, s = 1, A = 0, e[1] = λ (first transition), â = 1.5.
    # t=3: u = -0.5, A = -0.5, e[2] = 0/0 -> λ, â = 0.75.   t=4: u = -0.25, e[3] = -0.5/+0 = -inf -> λ, â = 0.375.
    s, A, a = run_lif(np.array([[1.0], [1.0], [-0.5], [0.0]]), "ndot")
    np.testing.assert_array_equal(A[:, 0], [0.0, 0.0, -0.5, -0.25])
    np.testing.assert_array_equal(a[:, 0], [1.0, 1.5, 0.75, 0.375])


def test_baseline_traces():
    currents = dyadic_dynamics(T=6, n=16, seed=6)
    s, _, a = run_lif(currents, "ottt")
    expect = np.zeros_like(s[0])
    for t in range(6):
        expect = LAM * expect + s[t]
        np.testing.assert_allclose(a[t], expect, atol=1e-12)
    s, _, a = run_lif(currents, "sltt")
    np.testing.assert_array_equal(a, s)


def test_ndot_factor_never_exceeds_lambda():
    currents = np.random.default_rng(7).normal(0.6, 1.0, (30, 256))
    for rule in ("ndot", "ndot_ref"):
        s, _, a = run_lif(currents, rule)
        _, _, ottt = run_lif(currents, "ottt")
        assert (np.abs(a) <= ottt + 1e-12).all()


@pytest.mark.parametrize("rule", RULES)
def test_out_scale_scales_what_the_neuron_emits_not_its_dynamics(rule):
    """LIF(out_scale=c) emits c·s and c·â; u, the reset and the factor still read s, and the
    surrogate gradient is c times as large: the same as a ×c op after the neuron."""
    c = 2.74
    currents = torch.tensor(dyadic_dynamics(T=8, n=64, seed=8), requires_grad=True)
    runs = []
    for out_scale in (1.0, c):
        lif = LIF(tau=1 / (1 - LAM), v_th=VTH, out_scale=out_scale).train()
        lif.rule = rule
        outs, traces, potentials = drive(lif, currents)
        grad, = torch.autograd.grad(sum((s * torch.arange(64.0)).sum() for s in outs), currents)
        runs.append((torch.stack(outs).detach(), traces, potentials, grad))
    (s1, a1, v1, g1), (sc, ac, vc, gc) = runs
    assert torch.equal(sc, c * s1) and torch.equal(vc, v1)
    torch.testing.assert_close(gc, c * g1, rtol=1e-12, atol=0)
    if rule != "bptt":
        torch.testing.assert_close(torch.stack(ac), c * torch.stack(a1), rtol=1e-12, atol=1e-12)


def reference_lif(currents: torch.Tensor, rule: str, lam: float, v_th: float, alpha: float):
    """The spec's neuron and traces written out for any λ, Vth and surrogate slope α: (s, u, â) per step,
    with s carrying the sigmoid surrogate's gradient; online rules cut every path across steps."""
    s_, u_, a_ = [], [], []
    A_prev, a, e_prev, q_prev = torch.zeros_like(currents[0]), None, None, None
    for I in currents:
        u = lam * A_prev + I
        sg = torch.sigmoid(alpha * (u - v_th))
        s = (u >= v_th).to(u.dtype) + (sg - sg.detach())  # exactly 0 or 1 in value
        A = u - v_th * s
        if rule == "bptt":
            A_prev = A
        else:
            sd, A = s.detach(), A.detach()
            if rule == "sltt":
                a = sd
            elif rule == "ottt":
                a = sd if a is None else lam * a + sd
            elif rule == "ndot":
                a = sd if a is None else e_prev * a + sd
                e_prev = torch.full_like(A, lam) if len(a_) == 0 else torch.where(
                    A_prev == 0, torch.full_like(A, lam), (A / A_prev).clamp(-lam, lam))
            elif rule == "ndot_ref":  # q = A - Vth s, the ratio of this step's q to the last one's, applied at once
                q = A - v_th * sd
                if a is None:
                    a = sd
                else:
                    a = torch.where(q_prev == 0, torch.full_like(q, lam), (q / q_prev).clamp(-lam, lam)) * a + sd
                q_prev = q
            else:
                raise ValueError(f"the formulas have no trace for rule {rule!r}")
            A_prev = A
        s_.append(s)
        u_.append(u.detach())
        a_.append(a)
    return s_, u_, a_


@pytest.mark.parametrize("rule", RULES)
def test_the_neuron_follows_its_formulas_for_any_tau_threshold_and_surrogate_slope(rule):
    """Every other test runs at λ = 0.5, Vth = 1 and α = 4, where a constant written in place of the
    parameter (0.5 for λ, 1 for Vth, 4 for α) gives the same numbers; tau, v_th and surrogate_alpha are
    options of a run. Here λ = 0.75, Vth = 0.5, α = 2, against the formulas written out."""
    lam, v_th, alpha = 0.75, 0.5, 2.0
    g = torch.Generator().manual_seed(11)
    currents = (0.4 + 0.6 * torch.randn(8, 256, dtype=torch.float64, generator=g)).requires_grad_()
    weights = torch.randn(8, 256, dtype=torch.float64, generator=g)
    lif = LIF(tau=1 / (1 - lam), v_th=v_th, alpha=alpha).train()
    lif.rule = rule
    s_, a_, u = drive(lif, currents)
    grad, = torch.autograd.grad(sum((w * s).sum() for w, s in zip(weights, s_)), currents)
    rs, ru, ra = reference_lif(currents, rule, lam, v_th, alpha)
    expect, = torch.autograd.grad(sum((w * s).sum() for w, s in zip(weights, rs)), currents)
    s, rs = torch.stack(s_).detach(), torch.stack(rs).detach()
    assert 0.1 < s.mean() < 0.9, "the check needs neurons that fire and neurons that do not"
    assert torch.equal(s, rs)
    # BPTT keeps A = u - Vth s as its state, the online rules u.
    v = torch.stack(ru) - v_th * rs if rule == "bptt" else torch.stack(ru)
    torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expect, rtol=1e-12, atol=1e-12)
    if rule != "bptt":
        torch.testing.assert_close(torch.stack(a_), torch.stack(ra), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v_th", [1.0, 0.3, 1.7])
def test_spike_and_reset_hold_at_the_threshold_its_neighbours_zeros_infinities_and_nan(dtype, v_th):
    # H(u - Vth) with H(0) = 1, A = u - Vth s and the authors' q = (u - Vth) - Vth where s = 1, u elsewhere: a NaN
    # membrane stays silent (models.finite relies on it) and keeps its NaN, -0.0 stays -0.0.
    th = torch.tensor(v_th, dtype=dtype)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)
    around = torch.stack([torch.nextafter(th, th - 1), th, torch.nextafter(th, th + 1)])
    u = torch.cat([edges, around, 3 * torch.randn(64, dtype=dtype, generator=torch.Generator().manual_seed(0))])
    fires = u >= th
    assert torch.equal(neuron.spike(u, v_th, 4.0), fires.to(dtype))
    for got, expect in ((neuron.after_reset(u, v_th), torch.where(fires, u - th, u)),
                        (neuron._authors_q(u, v_th), torch.where(fires, u - th - th, u))):
        torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got.signbit(), expect.signbit())


def test_a_rule_registered_without_its_trace_is_refused_not_run_as_another(monkeypatch):
    # Adding a rule to ONLINE_RULES without its branch in trace_step once fell through to the authors' factor.
    monkeypatch.setattr(neuron, "ONLINE_RULES", (*neuron.ONLINE_RULES, "ottt_decay2"))
    s = torch.ones(3)
    for a, A_prev, e_prev in ((None, None, None), (torch.ones(3), torch.ones(3), torch.ones(3))):
        with pytest.raises(ValueError, match="^no trace for rule 'ottt_decay2'; online rules: .*ottt_decay2"):
            neuron.trace_step("ottt_decay2", a, s, torch.ones(3), A_prev, e_prev, 0.5, 1.0)


def test_the_authors_rule_takes_lambda_on_a_zero_denominator_whatever_the_signed_flag():
    # The signed reading (λ·sign) is an option of NDOT's factor only; the authors' e_ref takes λ.
    # q = A - Vth s is 0 with a spike at u = 2 Vth, so the trace it scales is not 0 there (with
    # s = 0 and q = 0 it is, and no reading of the fill could show).
    # t=1: u = 2, s = 1, A = 1, q = 0, â = 1.   t=2: u = 0.5 - 1 = -0.5, q = -0.5, e_ref = -0.5/0 -> λ, â = 0.5
    currents = np.array([[2.0], [-1.0]])
    for signed in (False, True):
        s, _, a = run_lif(currents, "ndot_ref", signed)
        np.testing.assert_array_equal(s[:, 0], [1, 0])
        np.testing.assert_array_equal(a[:, 0], [1.0, 0.5])
