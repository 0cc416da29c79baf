"""theory.py: the bounds of THEORY.md §2 on many random small worlds, the Case II machinery
(population loss, Hessian-vector products, power iteration) against exact references on a
model small enough to form the whole Hessian, and the CLI on real train.py runs."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import theory
import train
from data import SyntheticWorld, WorldConfig, conditional_entropy, expected_nll
from evaluate import exact_metrics, model_log_table
from lab.worker import case1_verdict
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-10  # float64 round-off on sums of a few dozen terms


# -----------------------------------------------------------------------------
# Random small worlds: μ_s, μ_s', μ_f over a few contexts, P_s, P_s', P_f over a few
# responses, with exact zeros so that disjoint supports and unused contexts occur.


def random_dist(rng, shape, p_zero):
    """Rows of a random distribution over the last axis, each entry zero with p_zero."""
    w = rng.gamma(0.5, size=shape) * (rng.random(shape) >= p_zero)
    w[..., 0] += (w.sum(-1) == 0)  # no empty row
    return w / w.sum(-1, keepdims=True)


def random_world(rng, sparse):
    """Every density positive, or (sparse) with exact zeros: unused contexts, responses
    one dataset never gives, disjoint supports, infinite KLs."""
    n_ctx, n_y = rng.integers(1, 7), rng.integers(2, 6)
    mu_s, mu_sp, mu_f = (random_dist(rng, (n_ctx,), 0.3 * sparse) for _ in range(3))
    P_s, P_sp, P_f = (random_dist(rng, (n_ctx, n_y), 0.4 * sparse) for _ in range(3))
    lam = float(10 ** rng.uniform(-3, 3))
    return mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam


WORLDS = [random_world(np.random.default_rng(i), sparse=i % 2) for i in range(400)]


def test_the_exact_optimum_satisfies_A1_A2_B1_B2_on_random_worlds():
    finite = 0
    for mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam in WORLDS:
        c = theory.case_one(mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam)
        assert c["optimum_safety_gap"] <= c["A1_safety_bound"] + EPS
        assert c["optimum_safety_gap"] <= c["A2_safety_bound"] + EPS
        assert c["optimum_capability_gap"] <= c["B1_capability_bound"] + EPS
        assert c["optimum_capability_gap"] <= c["B2_capability_bound"] + EPS
        assert c["A2_safety_bound"] == pytest.approx(c["mismatch"] + c["overlap_term"])
        finite += math.isfinite(c["optimum_safety_gap"]) and math.isfinite(c["A1_safety_bound"])
    assert finite > 200  # the bounds were tested where they bite, not only as ∞ ≤ ∞


def test_the_optimum_minimises_the_case_one_objective_on_random_worlds():
    # the Lemma: no conditional does better on ℓ_f + λℓ_s' = G_f + λG_s' + const than P*_λ
    rng = np.random.default_rng(1)
    for mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam in WORLDS[:150]:
        star = theory.optimum_mixture(mu_sp, mu_f, P_sp, P_f, lam)
        best = theory.gap(mu_f, P_f, star) + lam * theory.gap(mu_sp, P_sp, star)
        for _ in range(10):
            t = rng.random()
            q = random_dist(rng, P_f.shape, 0.0) if t < 0.5 else (1 - t) * star + t * random_dist(rng, P_f.shape, 0.0)
            assert best <= theory.gap(mu_f, P_f, q) + lam * theory.gap(mu_sp, P_sp, q) + EPS


def test_limit_C_holds_for_random_models_and_the_oracles_have_zero_gap():
    rng = np.random.default_rng(2)
    for mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam in WORLDS:
        C = theory.limit_C(mu_s, mu_f, P_s, P_f)
        assert C >= 0
        models = [random_dist(rng, P_s.shape, p) for p in (0.0, 0.3)]
        models += [theory.optimum_mixture(mu_sp, mu_f, P_sp, P_f, lam), P_s, P_f, 0.5 * (P_s + P_f)]
        for q in models:
            G_s, G_f = theory.gap(mu_s, P_s, q), theory.gap(mu_f, P_f, q)
            assert G_s >= -EPS and G_f >= -EPS
            assert theory.limit_C_lhs(G_s, G_f) >= C - EPS
        # the oracle of each dataset has zero gap on it
        for mu, P in ((mu_s, P_s), (mu_sp, P_sp), (mu_f, P_f)):
            assert theory.gap(mu, P, P) == pytest.approx(0.0, abs=EPS)
        assert theory.overlap_mass(mu_s, mu_f) == pytest.approx(1 - 0.5 * np.abs(mu_s - mu_f).sum())


def test_case_one_gaps_move_monotonically_with_lambda_on_random_worlds():
    # F4 exactly: along the optimum path, G_s never rises and G_f never falls as λ grows
    lams = np.logspace(-3, 3, 13)
    for mu_s, mu_sp, mu_f, P_s, P_sp, P_f, _ in WORLDS[:100]:
        gsp = [theory.gap(mu_sp, P_sp, theory.optimum_mixture(mu_sp, mu_f, P_sp, P_f, l)) for l in lams]
        gf = [theory.gap(mu_f, P_f, theory.optimum_mixture(mu_sp, mu_f, P_sp, P_f, l)) for l in lams]
        assert all(b <= a + EPS for a, b in zip(gsp, gsp[1:]))   # the proxy's gap, which λ weighs
        assert all(b >= a - EPS for a, b in zip(gf, gf[1:]))


@pytest.mark.parametrize("kappa, delta", [(0.25, 0.3), (0.0, 0.6), (1.0, 0.0), (0.5, 1.0)])
def test_case_one_on_the_synthetic_world_has_its_closed_forms(kappa, delta):
    # μ_s = μ_s' = U(S) and μ_f = κ U(S) + (1−κ) U(T), and on S the task answers with tokens
    # safety never uses: overlap term log(1+κ/λ), M = κ, C = √(2κ), and P* attains A2 and B2
    world = SyntheticWorld(WorldConfig(overlap=kappa, mismatch=delta))
    for lam in (0.1, 1.0, 30.0):
        c = theory.world_case_one(world, lam)
        assert c["overlap_term"] == pytest.approx(math.log1p(kappa / lam))
        assert c["overlap_mass"] == pytest.approx(kappa)
        assert c["C_limit"] == pytest.approx(math.sqrt(2 * kappa))
        mu, P, Q = world.mu["safety"], world.P["safety"], world.P["proxy"]  # E KL = cross-entropy − entropy
        assert c["mismatch"] == pytest.approx(expected_nll(mu, P, np.log(Q)) - conditional_entropy(mu, P))
        assert c["optimum_safety_gap"] == pytest.approx(c["A2_safety_bound"], rel=1e-9, abs=1e-12)
        assert c["optimum_capability_gap"] == pytest.approx(c["B2_capability_bound"], rel=1e-9, abs=1e-12)
        if kappa > 0:
            assert c["A1_safety_bound"] == math.inf and c["B1_capability_bound"] == math.inf


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.6])
def test_shared_answer_support_makes_A1_B1_finite_and_no_bound_tight(rho):
    # ρ > 0: on S, P_s and P_f each give mass ρ to the other's answers, so P_s ≪ P_f and P_f ≪ P_s'
    world = SyntheticWorld(WorldConfig(overlap=0.25, mismatch=0.3, answer_overlap=rho))
    for P in world.P.values():
        np.testing.assert_allclose(P.reshape(len(world.contexts), -1).sum(1), 1.0)
    below = 0
    for lam in (0.1, 0.3, 1.0, 3.0):
        c = theory.world_case_one(world, lam)
        assert math.isfinite(c["A1_safety_bound"]) and math.isfinite(c["B1_capability_bound"])
        assert c["optimum_safety_gap"] < min(c["A1_safety_bound"], c["A2_safety_bound"]) - 1e-6   # not attained
        assert c["optimum_capability_gap"] < min(c["B1_capability_bound"], c["B2_capability_bound"]) - 1e-6
        below += c["A1_safety_bound"] < c["A2_safety_bound"]
    assert below >= 1
    # ρ = 0 is the original world, table for table
    base, zero = SyntheticWorld(WorldConfig()), SyntheticWorld(WorldConfig(answer_overlap=0.0))
    assert all(np.array_equal(base.P[k], zero.P[k]) for k in base.P)


@pytest.mark.parametrize("rho", [-0.1, 1.5, float("nan")])
def test_an_answer_overlap_outside_0_1_is_one_clear_message(rho):
    from common import DataError
    with pytest.raises(DataError, match="--answer_overlap"):
        SyntheticWorld(WorldConfig(answer_overlap=rho))
    with pytest.raises(train.ConfigError, match="--answer_overlap"):
        train.check_config(train.TrainConfig(answer_overlap=rho))


# -----------------------------------------------------------------------------
# Case II on a GPT small enough to form its exact Hessian


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer GPT with a few hundred parameters, in float64, on a 9-context world."""
    world = SyntheticWorld(WorldConfig(n_symbols=3, ctx_len=2, n_harmful=1, overlap=0.5, mismatch=0.3))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=world.block_size, vocab_size=world.vocab_size, n_layer=1, n_head=1,
                          n_embd=4)).double()
    with torch.no_grad():  # away from the init, so that the landscape has some shape
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pop = theory.population_batch(world, "safety")
    return world, model, pop


def exact_hessian(land):
    """H column by column, H e_i for every unit vector e_i."""
    eye = torch.eye(land.n, dtype=torch.float64)
    return torch.stack([land.hvp(eye[i]) for i in range(land.n)], 1)


def test_population_loss_is_the_exact_safety_loss(tiny):
    world, model, pop = tiny
    exact = exact_metrics(model_log_table(model, world), world)["safety_loss"]
    with torch.no_grad():
        assert float(theory.population_loss(model, pop)) == pytest.approx(exact, rel=1e-12)


def test_hvp_agrees_with_finite_differences_of_the_gradient(tiny):
    world, model, pop = tiny
    land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(land.n, generator=g, dtype=torch.float64)
        eps = 1e-5
        grads = []
        for sign in (1, -1):
            shifted = GPT(model.config).double()
            shifted.load_state_dict(model.state_dict())
            with torch.no_grad():
                for p, dv in zip(theory._params(shifted), theory._unflatten(sign * eps * v, theory._params(shifted))):
                    p.add_(dv)
            grads.append(theory.LossLandscape(shifted, lambda m: theory.population_loss(m, pop)).grad)
        fd = (grads[0] - grads[1]) / (2 * eps)
        hv = land.hvp(v)
        assert (hv - fd).norm() <= 1e-6 * hv.norm()


def test_power_iteration_agrees_with_eigvalsh_on_the_exact_hessian(tiny):
    world, model, pop = tiny
    land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
    H = exact_hessian(land)
    assert torch.allclose(H, H.T, atol=1e-9 * H.abs().max())   # double backward gives a symmetric H
    spectrum = torch.linalg.eigvalsh(H)
    top = float(spectrum[-1])
    assert top > 0 and -spectrum[0] > top  # a negative eigenvalue dominates: the shifted second run is needed
    lam, iters, res = theory.power_iteration(land.hvp, land.n, iters=3000, tol=1e-7)
    assert lam == pytest.approx(top, rel=1e-3)
    assert iters < 3000 and res < 1e-6   # the residual is relative to λ, measured on the shifted operator


@pytest.mark.parametrize("seed", range(6))
def test_power_iteration_finds_the_largest_eigenvalue_even_when_a_negative_one_dominates(seed):
    g = torch.Generator().manual_seed(seed)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(-1, 1, n, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    spectrum[0] = -5.0 if seed % 2 else 5.0   # a dominant eigenvalue of either sign
    A = Q @ torch.diag(spectrum) @ Q.T
    lam, _, _ = theory.power_iteration(lambda v: A @ v, n, iters=5000, tol=1e-9)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=1e-3)


def test_second_order_prediction_error_shrinks_as_the_cube_of_the_step(tiny):
    # Δ(εv) − (ε∇ℓ·v + ½ε²vᵀHv) = O(ε³): halving ε divides the error by about 8
    world, model, pop = tiny
    land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
    v = torch.randn(land.n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v /= v.norm()
    hv = land.hvp(v)
    errors = []
    for eps in (0.02, 0.01, 0.005):
        moved = GPT(model.config).double()
        moved.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p, dv in zip(theory._params(moved), theory._unflatten(eps * v, theory._params(moved))):
                p.add_(dv)
            delta = float(theory.population_loss(moved, pop) - land.loss)
        pred, _, _ = theory.second_order_prediction(land.grad, eps * hv, eps * v)  # H(εv) = εHv
        errors.append(abs(delta - pred))
    assert 5 < errors[0] / errors[1] < 11 and 5 < errors[1] / errors[2] < 11
    assert theory.bound_D(1.0, 2.0, 0.5) == pytest.approx(0.5 + 0.25)


# -----------------------------------------------------------------------------
# The CLI on real runs of train.py (a 1-layer model, a few steps: seconds)

SMALL = dict(n_symbols=6, n_harmful=2, n_layer=1, n_head=2, n_embd=16, align_iters=40, max_iters=8,
             eval_interval=8, warmup_iters=2, batch_tokens=640, micro_batch=128, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("theory_runs")
    theta0 = str(base / "theta0" / "theta0.pt")
    train.main(train.TrainConfig(**SMALL, out_dir=str(base / "theta0"), stage="align"), argv=[])
    out = {}
    for name, kw in {"param": dict(constraint="param", radius=0.05),
                     "loss": dict(constraint="loss", lam=3.0, overlap=0.5, mismatch=0.6),
                     "loss_k0_d1_lam0": dict(constraint="loss", lam=0.0, overlap=0.0, mismatch=1.0),
                     "none": dict(constraint="none", overlap=1.0, mismatch=0.0),
                     "penalty": dict(constraint="penalty", gamma=3.0)}.items():
        d = str(base / name)
        train.main(train.TrainConfig(**SMALL, **kw, out_dir=d, stage="finetune", theta0=theta0), argv=[])
        out[name] = d
    return out


def run_theory(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "theory.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


KEYS = ["mismatch", "overlap_mass", "A2_safety_bound", "B2_capability_bound", "C_limit", "C_lhs",
        "optimum_safety_gap", "optimum_capability_gap"]
CASE_TWO_KEYS = ["grad_norm_s", "hessian_top_eig_s", "second_order_prediction", "measured_safety_increase"]


def test_cli_writes_theory_json_with_the_keys_and_prints_a_table(runs):
    proc = run_theory("--run_dir", runs["param"], "--reference_run", runs["none"])
    assert proc.returncode == 0, proc.stderr
    out = json.load(open(os.path.join(runs["param"], "theory.json")))
    for k in KEYS + CASE_TWO_KEYS:
        assert k in out
    # the printout is of the strategy that ran: its radius, the limit C and the Case II quantities;
    # no λ, and none of Case I's bounds, which describe another strategy
    head = proc.stdout.splitlines()[0]
    assert "param, r = 0.05" in head and "λ" not in head and "nats per sequence" in head
    for k in ["C_limit", "C_lhs"] + CASE_TWO_KEYS:
        assert k in proc.stdout
    assert "A2_safety_bound" not in proc.stdout and "optimum_safety_gap" not in proc.stdout
    assert "Case II: ∇ℓ_s and λ_max(H_s)" in proc.stderr  # progress while it computes
    metrics = json.load(open(os.path.join(runs["param"], "metrics.json")))
    assert out["safety_gap"] == pytest.approx(metrics["finetuned"]["safety_gap"], abs=1e-9)
    assert out["C_lhs"] >= out["C_limit"] and out["C_holds"]
    # the measured increase is the change of the exact loss metrics.json reports, in float64
    rise = metrics["finetuned"]["safety_loss"] - metrics["aligned"]["safety_loss"]
    assert out["measured_safety_increase"] == pytest.approx(rise, abs=1e-5)
    assert out["update_norm"] <= 0.05 + 1e-5 and out["D_radius"] == 0.05
    assert out["measured_safety_increase"] <= out["D_bound"]
    assert out["hessian_residual"] <= 1e-4
    assert out["d_unconstrained"] == pytest.approx(json.load(open(os.path.join(runs["none"], "metrics.json")))
                                                   ["finetuned"]["distance"])


@pytest.mark.parametrize("name", ["loss", "loss_k0_d1_lam0", "none", "penalty"])
def test_report_on_any_run_has_the_keys_and_the_bounds_hold(runs, name):
    out = theory.report(runs[name])
    for k in KEYS:
        assert k in out
    assert out["C_lhs"] >= out["C_limit"] - 1e-12
    assert out["optimum_safety_gap"] <= out["A2_safety_bound"] + 1e-9
    assert out["optimum_capability_gap"] <= out["B2_capability_bound"] + 1e-9
    if out["constraint"] == "loss":
        # no model beats the exact optimum on its own objective
        assert out["case1_objective_excess"] >= -1e-9
        verdict = case1_verdict(out, tol_abs=0.05, tol_rel=0.1)  # the sweep's: does it reach the optimum?
        assert verdict["case1_within_tolerance"] == (abs(out["case1_safety_excess"]) <= verdict["case1_safety_tolerance"]
                                                     and abs(out["case1_capability_excess"]) <= verdict["case1_capability_tolerance"])
    assert (name == "penalty") == ("hessian_top_eig_s" in out)
    json.loads(json.dumps(theory.json_safe(out), allow_nan=False))  # strict JSON: ∞ written as 'inf'


def test_a_case_one_printout_shows_its_lambda_and_bounds(runs, capsys):
    theory.print_table(theory.report(runs["loss"]))
    text = capsys.readouterr().out
    assert "loss, λ = 3" in text.splitlines()[0] and "A2_safety_bound" in text and "case1_objective_excess" in text
    assert "hessian_top_eig_s" not in text and "r =" not in text


def break_copy(runs, tmp_path, edit):
    d = tmp_path / "broken"
    shutil.copytree(runs["loss"], d)
    edit(d)
    return str(d)


def edit_config(**changes):
    def edit(d):
        cfg = json.load(open(d / "config.json"))
        cfg["config"].update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit, words", [
    (lambda d: (d / "metrics.json").unlink(), "finished"),
    (lambda d: (d / "ckpt.pt").unlink(), "finished"),
    (edit_config(max_iters=100), "step 8 of 100"),
    (edit_config(data="real"), "synthetic"),
    (edit_config(overlap=0.9), "mixes two worlds"),
    (edit_config(theta0="/nonexistent/theta0.pt"), "missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
])
def test_bad_run_dirs_fail_with_one_clear_message(runs, tmp_path, edit, words):
    d = break_copy(runs, tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        theory.main(["--run_dir", d])
    assert words in str(e.value.code) and str(e.value.code).startswith("error:")
    assert not os.path.exists(os.path.join(d, "theory.json"))


def test_bad_run_dir_from_the_command_line_has_no_traceback(runs, tmp_path):
    proc = run_theory("--run_dir", str(tmp_path))
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_theta0_replaced_after_the_run_is_refused(runs, tmp_path):
    cfg = json.load(open(os.path.join(runs["loss"], "config.json")))["config"]
    theta0 = torch.load(cfg["theta0"], weights_only=True)
    other = tmp_path / "other_theta0.pt"
    torch.save(dict(theta0, theta0_hash="0123456789abcdef"), other)   # as if aligned again
    d = break_copy(runs, tmp_path, edit_config(theta0=str(other)))
    with pytest.raises(SystemExit) as e:
        theory.main(["--run_dir", d])
    assert "not the θ_0" in str(e.value.code)
    # a fine-tune's checkpoint is no θ_0, even though it records the same θ_0 hash
    d2 = tmp_path / "ckpt_as_theta0"
    shutil.copytree(runs["loss"], d2)
    edit_config(theta0=os.path.join(runs["none"], "ckpt.pt"))(d2)
    with pytest.raises(SystemExit) as e:
        theory.main(["--run_dir", str(d2)])
    assert "not an aligned θ_0" in str(e.value.code)


def test_hutchinson_trace_is_exact_on_a_diagonal_and_unbiased_on_a_dense_matrix():
    d = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    assert theory.hutchinson_trace(lambda v: d * v, 4, samples=5)[0] == pytest.approx(float(d.sum()))
    a = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = a + a.T
    est, se = theory.hutchinson_trace(lambda v: h @ v, 30, samples=400, seed=1)
    assert abs(est - float(h.trace())) < 4 * se and se > 0
