"""
The theory of THEORY.md §2–§3, computed beside a trained model.

Case I, the alignment loss constraint min ℓ_f + λ·ℓ_s' (§2), has a closed-form optimum
when the model can represent any conditional: a per-context mixture of the task answer
and the proxy safety answer. On the synthetic world every density is a table, so the
optimum's gaps, the bounds A1, A2, B1, B2 and the fundamental limit C are exact sums.
The functions below take plain arrays (μ of shape (n_ctx,), P of shape (n_ctx, ...),
every context's responses flattened behind the first axis), so they apply to any world
small enough to enumerate, and property tests feed them random ones.

Case II, the alignment parameter constraint ‖θ − θ_0‖ ≤ r (§3), is local: the gradient
and the Hessian of the exact population loss ℓ_s at θ_0 predict what a step v = θ − θ_0
costs in safety. The Hessian is never formed; its top eigenvalue comes from power
iteration on Hessian-vector products (double backward).

    python theory.py --run_dir out       # reads a finished run of train.py,
                                         # writes out/theory.json and prints a table

The bounds are as reconstructed from the paper's setting (THEORY.md), not quotations of
its theorems. Losses and gaps are in nats per sequence.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import DataError, HelpFormatter, Parser, atomic_write_json
from constraints import STRATEGIES
from data import SyntheticWorld, WorldConfig, context_kl, context_tv, expect, expected_nll, gap, ratio, weighted
from evaluate import exact_metrics, model_log_table
from model import CheckpointError, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
# Case I: the alignment loss constraint (THEORY.md §2)


def overlap_weight(mu_sp, mu_f, lam):
    """ω(x) = μ_f(x) / (μ_f(x) + λ μ_s'(x)) of the Lemma (THEORY.md §2): 1 on contexts only
    the task uses, 0 on contexts only the proxy uses, in between on shared contexts. On
    contexts neither uses, nothing constrains the optimum; ω = 0 there keeps the proxy's
    answer, the choice that bound A2 describes."""
    return ratio(mu_f, np.asarray(mu_f) + lam * np.asarray(mu_sp))


def optimum_mixture(mu_sp, mu_f, P_sp, P_f, lam):
    """P*_λ(·|x) = ω(x) P_f(·|x) + (1 − ω(x)) P_s'(·|x), the minimiser of ℓ_f + λ·ℓ_s' over
    all conditionals (Lemma, THEORY.md §2). Same shape as P_f."""
    w = overlap_weight(mu_sp, mu_f, lam).reshape((-1,) + (1,) * (np.ndim(P_f) - 1))
    return w * np.asarray(P_f, dtype=np.float64) + (1.0 - w) * np.asarray(P_sp, dtype=np.float64)


def mismatch_term(mu_s, P_s, P_sp):
    """E_{μ_s} KL(P_s ‖ P_s'): the MISMATCH between original and proxy safety data, first
    term of (A2) and the floor of the safety gap as λ → ∞ (THEORY.md §2, F1)."""
    return gap(mu_s, P_s, P_sp)


def overlap_term(mu_s, mu_sp, mu_f, lam):
    """E_{μ_s} log(1 + μ_f / (λ μ_s')): the CONTEXT OVERLAP cost, second term of (A2)
    (THEORY.md §2); falls as λ grows, zero when the task avoids the safety contexts."""
    return expect(mu_s, np.log1p(ratio(mu_f, lam * np.asarray(mu_sp, dtype=np.float64))))


def bound_A1(mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam):
    """(A1) G_s(P*) ≤ E_{μ_s}[(1−ω) KL(P_s‖P_s') + ω KL(P_s‖P_f)]  (KL convex, THEORY.md §2)."""
    w = overlap_weight(mu_sp, mu_f, lam)
    return expect(mu_s, weighted(1.0 - w, context_kl(P_s, P_sp)) + weighted(w, context_kl(P_s, P_f)))


def bound_A2(mu_s, mu_sp, mu_f, P_s, P_sp, lam):
    """(A2) G_s(P*) ≤ E_{μ_s} KL(P_s‖P_s') + E_{μ_s} log(1 + μ_f/(λ μ_s'))  (P* ≥ (1−ω)P_s',
    THEORY.md §2): mismatch term plus overlap term."""
    return mismatch_term(mu_s, P_s, P_sp) + overlap_term(mu_s, mu_sp, mu_f, lam)


def bound_B1(mu_sp, mu_f, P_sp, P_f, lam):
    """(B1) G_f(P*) ≤ E_{μ_f}[(1−ω) KL(P_f‖P_s')]  (KL convex, THEORY.md §2)."""
    w = overlap_weight(mu_sp, mu_f, lam)
    return expect(mu_f, weighted(1.0 - w, context_kl(P_f, P_sp)))


def bound_B2(mu_sp, mu_f, lam):
    """(B2) G_f(P*) ≤ E_{μ_f} log(1 + λ μ_s'/μ_f)  (P* ≥ ωP_f, THEORY.md §2)."""
    return expect(mu_f, np.log1p(ratio(lam * np.asarray(mu_sp, dtype=np.float64), mu_f)))


def overlap_mass(mu_s, mu_f):
    """M = Σ_x m(x), m(x) = min(μ_s(x), μ_f(x)): how much of the two context distributions
    coincides (THEORY.md §2, bound C); M = 1 − TV(μ_s, μ_f)."""
    return float(np.minimum(mu_s, mu_f).sum())


def limit_C(mu_s, mu_f, P_s, P_f):
    """Right-hand side of (C): √(2/M) · Σ_x m(x)·TV(P_s(·|x), P_f(·|x)) (THEORY.md §2).
    For ANY model P, √G_s(P) + √G_f(P) is at least this much. Zero without overlap."""
    m = np.minimum(mu_s, mu_f)
    M = float(m.sum())
    if M <= 0:
        return 0.0
    return math.sqrt(2.0 / M) * float((m * context_tv(P_s, P_f)).sum())


def limit_C_lhs(G_s, G_f):
    """Left-hand side of (C): √G_s + √G_f of one model (THEORY.md §2)."""
    return math.sqrt(max(G_s, 0.0)) + math.sqrt(max(G_f, 0.0))


def f4_condition(mu_s, mu_f, P_s, P_sp, P_f):
    """max over the shared contexts (μ_s, μ_f > 0) of Σ_y P_s P_f / P_s' (THEORY.md §5 F4): at most
    1 suffices for G_s(P*_λ) to fall as λ grows (G_s is convex in ω with that slope at ω = 0);
    above 1, G_s(P*_λ) may rise with λ although G_s'(P*_λ) never does. 0 without shared contexts."""
    shared = (np.asarray(mu_s) > 0) & (np.asarray(mu_f) > 0)
    if not shared.any():
        return 0.0
    n = len(mu_s)
    s, sp, f = (np.asarray(P, dtype=np.float64).reshape(n, -1)[shared] for P in (P_s, P_sp, P_f))
    return float(ratio(s * f, sp).sum(1).max())


def case_one(mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam):
    """Every Case I quantity of THEORY.md §2 at penalty strength λ, as a dict: the exact
    gaps of the optimum P*_λ (and its proxy gap, to score a trained model's objective),
    the bounds A1, A2, B1, B2 with the mismatch and overlap terms, and the limit C."""
    P_star = optimum_mixture(mu_sp, mu_f, P_sp, P_f, lam)
    m = np.minimum(mu_s, mu_f)
    return {
        "mismatch": mismatch_term(mu_s, P_s, P_sp),
        "overlap_term": overlap_term(mu_s, mu_sp, mu_f, lam),
        "overlap_mass": overlap_mass(mu_s, mu_f),
        "tv_mass": float((m * context_tv(P_s, P_f)).sum()),        # Σ_x m(x)·TV(P_s, P_f)
        "optimum_safety_gap": gap(mu_s, P_s, P_star),
        "optimum_capability_gap": gap(mu_f, P_f, P_star),
        "optimum_proxy_gap": gap(mu_sp, P_sp, P_star),
        "A1_safety_bound": bound_A1(mu_s, mu_sp, mu_f, P_s, P_sp, P_f, lam),
        "A2_safety_bound": bound_A2(mu_s, mu_sp, mu_f, P_s, P_sp, lam),
        "B1_capability_bound": bound_B1(mu_sp, mu_f, P_sp, P_f, lam),
        "B2_capability_bound": bound_B2(mu_sp, mu_f, lam),
        "C_limit": limit_C(mu_s, mu_f, P_s, P_f),
        "f4_condition": f4_condition(mu_s, mu_f, P_s, P_sp, P_f),
    }


def world_case_one(world, lam):
    """case_one on the tables of a SyntheticWorld (data.py)."""
    mu, P = world.mu, world.P
    return case_one(mu["safety"], mu["proxy"], mu["task"], P["safety"], P["proxy"], P["task"], lam)


# -----------------------------------------------------------------------------
# Case II: the alignment parameter constraint (THEORY.md §3)
#
# ℓ_s(θ) is the exact population loss: every context x and opener o with mass under D_s
# is one sequence [x, SEP, o], and the loss sums soft targets instead of samples,
#   ℓ_D(θ) = Σ_{x,o} μ(x)P(o|x) [ −Σ_o' P(o'|x) log p_θ(o'|x) − Σ_c P(c|x,o) log p_θ(c|x,o) ],
# which is E_{x~μ} E_{(o,c)~P(·|x)} [−log P_θ(o,c|x)] because Σ_o P(o|x) = 1. One
# forward pass per (x, o), not per (x, o, c): 4× fewer sequences for the same number.


def population_batch(world, name):
    """The exact population of dataset `name` of a SyntheticWorld as one weighted batch:
    inputs [x, SEP, o] (N, L+2), weights μ(x)P(o|x) (N,), and the soft targets P(·|x)
    over openers (N, n_open) and P(·|x,o) over content tokens (N, n_content)."""
    mu, P = world.mu[name], world.P[name]
    p_open = P.sum(2)                                   # (n_ctx, n_open): P(o|x)
    weight = mu[:, None] * p_open
    ctx, opn = np.nonzero(weight > 0)                   # only what the data ever says
    ctx_t, opn_t = torch.from_numpy(ctx), torch.from_numpy(opn)
    inputs = world.sequences(ctx_t, opn_t, torch.zeros_like(ctx_t))[:, :-1]
    return {"inputs": inputs,
            "weight": torch.from_numpy(weight[ctx, opn]),
            "open_target": torch.from_numpy(p_open[ctx]),
            "content_target": torch.from_numpy(P[ctx, opn] / p_open[ctx, opn][:, None]),
            "open_ids": world.open_ids, "content_ids": world.content_ids, "L": world.wc.ctx_len}


def population_loss(model, pop):
    """ℓ_D(θ) exactly (THEORY.md §1), in nats per sequence, differentiable in θ. The log
    probabilities are taken in float64 as in evaluate.model_log_table."""
    logits, _ = model(pop["inputs"])
    logp = F.log_softmax(logits.double(), dim=-1)
    L = pop["L"]
    lp_open = logp[:, L, :][:, pop["open_ids"]]         # log p_θ(o'|x)    (N, n_open)
    lp_content = logp[:, L + 1, :][:, pop["content_ids"]]  # log p_θ(c|x,o) (N, n_content)
    nll = -(pop["open_target"] * lp_open).sum(1) - (pop["content_target"] * lp_content).sum(1)
    return (pop["weight"] * nll).sum()


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flatten(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unflatten(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


class LossLandscape:
    """ℓ(θ) around fixed weights θ of `model`: the gradient ∇ℓ(θ) and Hessian-vector
    products H v, as flat float64 vectors over all trainable parameters (THEORY.md §3).

    The gradient is taken once with create_graph=True; every H v is then one more
    backward pass through that graph (double backward). SDPA's fused CPU kernel has no
    double backward, so attention runs on the plain math kernel here."""

    def __init__(self, model, loss_fn):
        self.params = _params(model)
        with sdpa_kernel(SDPBackend.MATH):
            self.loss = loss_fn(model)
            self._grads = torch.autograd.grad(self.loss, self.params, create_graph=True)
        self.grad = _flatten([g.detach() for g in self._grads]).double()
        self.n = self.grad.numel()

    def hvp(self, v):
        """H v for a flat vector v (n,)."""
        vs = [t.to(p.dtype) for t, p in zip(_unflatten(v, self.params), self.params)]
        with sdpa_kernel(SDPBackend.MATH):
            hv = torch.autograd.grad(self._grads, self.params, grad_outputs=vs, retain_graph=True)
        return _flatten(hv).double()


def power_iteration(hvp, n, iters=100, tol=1e-4, seed=0):
    """The largest eigenvalue λ_max of a symmetric operator v ↦ H v on R^n (THEORY.md §3,
    bound D), by power iteration. Returns (λ_max, iterations, relative residual
    ‖Hv − λv‖/|λ| of the final unit vector v).

    Power iteration finds the eigenvalue of largest MAGNITUDE. If that one is negative,
    a second run on H − λ_1·I, whose spectrum is shifted to ≥ 0, finds λ_max − λ_1.
    It stops once the residual is below tol: some eigenvalue then lies within tol·|λ|
    of the estimate, and the Rayleigh quotient's error is of the order of tol²."""

    def dominant(op):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=g, dtype=torch.float64)
        v /= v.norm()
        lam, res = 0.0, float("inf")
        for i in range(1, iters + 1):
            hv = op(v)
            lam = float(v @ hv)                         # Rayleigh quotient of a unit v
            res = float((hv - lam * v).norm()) / max(abs(lam), 1e-300)
            if res <= tol or hv.norm() == 0:
                break
            v = hv / hv.norm()
        return lam, i, res

    lam1, it1, res1 = dominant(hvp)
    if lam1 >= 0:
        return lam1, it1, res1
    shifted, it2, res2 = dominant(lambda v: hvp(v) - lam1 * v)
    lam = shifted + lam1
    return lam, it1 + it2, res2 * abs(shifted) / max(abs(lam), 1e-300)


def hutchinson_trace(hvp, n, samples=32, seed=0):
    """tr(H) ≈ the mean of vᵀHv over Rademacher vectors v (E[vvᵀ] = I), with its standard error:
    the average curvature at θ_0 (THEORY.md §5 F6), where λ_max is the sharpest direction only.
    Exact for a diagonal H, whatever the draws."""
    g = torch.Generator().manual_seed(seed)
    vals = np.array([float(v @ hvp(v)) for v in
                     (torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1 for _ in range(samples))])
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(samples)) if samples > 1 else math.nan


def adaptive_hvp(hvp, theta):
    """v ↦ T H T v with T = diag(|θ|): the Hessian in the coordinates of adaptive sharpness
    (THEORY.md §5 F6, 'A sharpness a reparametrisation cannot fake'; Kwon et al. 2021). A rescaling
    θ' = Dθ (D positive diagonal) that keeps the function turns H into D⁻¹HD⁻¹ and T into DT, so
    T H T, its λ_max and its trace are the same at θ and θ'; raw λ_max(H) is not."""
    t = theta.abs().double()
    return lambda v: t * hvp(t * v)


def second_order_prediction(grad, hv, v):
    """∇ℓ_s·v + ½ vᵀH_s v, the second-order change of ℓ_s along v = θ − θ_0 (THEORY.md §3,
    bound D); hv = H_s v. Returns (prediction, first-order term, second-order term)."""
    first, second = float(grad @ v), 0.5 * float(v @ hv)
    return first + second, first, second


def bound_D(grad_norm, lam_max, r):
    """(D) the worst case ‖∇ℓ_s(θ_0)‖ r + ½ λ_max(H_s) r² of Δ_s(r) = ℓ_s(θ_r) − ℓ_s(θ_0)
    over the ball of radius r, up to O(r³) (THEORY.md §3)."""
    return grad_norm * r + 0.5 * max(lam_max, 0.0) * r * r


def flat_weights(model):
    """θ as one flat float64 vector, in the order of LossLandscape's parameters."""
    return _flatten([p.detach() for p in _params(model)]).double()


def theta0_landscape(theta0_model, world, iters=100, tol=1e-4):
    """The alignment loss landscape at θ_0 (THEORY.md §3): ℓ_s(θ_0), ‖∇ℓ_s(θ_0)‖ and
    λ_max(H_s) by power iteration. It depends on θ_0 alone, so many fine-tunes share it."""
    pop = population_batch(world, "safety")
    land = LossLandscape(theta0_model, lambda m: population_loss(m, pop))
    lam, it, res = power_iteration(land.hvp, land.n, iters=iters, tol=tol)
    return {"safety_loss_theta0": float(land.loss.detach()), "grad_norm_s": float(land.grad.norm()),
            "hessian_top_eig_s": lam, "hessian_iters": it, "hessian_residual": res}


def case_two(theta0_model, model, world, landscape=None, iters=100, tol=1e-4):
    """Every Case II quantity of THEORY.md §3 for the update v = θ − θ_0 of a fine-tune:
    the landscape at θ_0 (computed unless given), the second-order prediction
    ∇ℓ_s·v + ½ vᵀH_s v along v, and the measured Δ_s = ℓ_s(θ) − ℓ_s(θ_0)."""
    pop = population_batch(world, "safety")
    land = LossLandscape(theta0_model, lambda m: population_loss(m, pop))
    if landscape is None:
        landscape = theta0_landscape(theta0_model, world, iters, tol)
    v = flat_weights(model) - flat_weights(theta0_model)
    pred, first, second = second_order_prediction(land.grad, land.hvp(v), v)
    with torch.no_grad():
        loss = float(population_loss(model, pop))
    return {**landscape, "update_norm": float(v.norm()), "first_order_term": first, "second_order_term": second,
            "second_order_prediction": pred, "measured_safety_increase": loss - float(land.loss.detach())}


# -----------------------------------------------------------------------------
# The report of one finished run of train.py


class RunError(ValueError):
    """A run folder theory.py cannot read; the message names the problem and the fix."""


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}): run train.py again into a fresh --out_dir") from None


def load_run(run_dir):
    """The config, metrics, θ_0 checkpoint and final checkpoint of a finished synthetic
    run of train.py, each checked against the others."""
    if not os.path.isdir(run_dir):
        raise RunError(f"--run_dir {run_dir} is not a folder: pass the --out_dir of a train.py run")
    unfinished = f"is it a finished fine-tune? run `python train.py --out_dir {run_dir}` to the end first"
    cfg = _read_json(os.path.join(run_dir, "config.json"), unfinished).get("config", {})
    metrics = _read_json(os.path.join(run_dir, "metrics.json"), unfinished)
    data = cfg.get("data", "synthetic")
    if data != "synthetic":
        raise RunError(f"{run_dir} is a run on --data {data}; theory.py computes exact bounds on the "
                       f"synthetic world only: pass a run of `train.py --data synthetic`")
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        raise RunError(f"{ckpt_path} is missing: {unfinished}")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") != "finetune-resume" or ckpt.get("step") != cfg.get("max_iters"):
        raise RunError(f"{ckpt_path} is at step {ckpt.get('step')} of {cfg.get('max_iters')} ({ckpt.get('kind')}): "
                       f"{unfinished}")
    fields = ("overlap", "mismatch", "n_symbols", "ctx_len", "n_harmful", "answer_overlap")
    wc = WorldConfig(**{k: cfg.get(k, getattr(WorldConfig, k)) for k in fields})
    saved = {k: ckpt["world_config"].get(k, getattr(WorldConfig, k)) for k in fields}
    if saved != vars(wc):
        diff = ", ".join(f"{k}: config.json {getattr(wc, k)} vs ckpt.pt {saved[k]}" for k in saved
                         if saved[k] != getattr(wc, k))
        raise RunError(f"{run_dir} mixes two worlds ({diff}): its config.json and ckpt.pt come from different "
                       f"runs; train again into a fresh --out_dir")
    # θ_0: the --theta0 the run named (as given, or relative to the run folder), else its own
    named = cfg.get("theta0") or ""
    # a relative path is relative to the folder train.py ran in: the one that holds run_dir as its out_dir
    here, out = os.path.abspath(run_dir), os.path.normpath(cfg.get("out_dir", "") or ".")
    ran_in = here[:-len(out)] if not os.path.isabs(out) and here.endswith(os.sep + out) else ""
    candidates = ([named, os.path.join(ran_in, named), os.path.join(run_dir, named)] if named else
                  [os.path.join(run_dir, "theta0.pt")])
    theta0_path = next((p for p in candidates if os.path.exists(p)), candidates[0])
    if not os.path.exists(theta0_path):
        raise RunError(f"θ_0 of {run_dir} ({theta0_path}) is missing: theory.py needs the aligned weights the run "
                       f"started from; put them back or fine-tune again")
    theta0 = load_checkpoint(theta0_path)
    if theta0.get("kind") != "theta0":
        raise RunError(f"{theta0_path} is a {theta0.get('kind')} checkpoint, not an aligned θ_0 (theta0.pt of "
                       f"`train.py --stage align`): point config.json's theta0 at the run's θ_0")
    if theta0.get("theta0_hash") != ckpt.get("theta0_hash"):
        raise RunError(f"{theta0_path} is not the θ_0 that {run_dir} was fine-tuned from (hash "
                       f"{theta0.get('theta0_hash')} ≠ {ckpt.get('theta0_hash')}): it was replaced after the run; "
                       f"restore it or fine-tune again")
    shape = ("n_symbols", "ctx_len", "n_harmful")
    if any(theta0["world_config"].get(k) != getattr(wc, k) for k in shape):
        raise RunError(f"{theta0_path} was aligned on another world ({', '.join(shape)} differ): fine-tune again")
    return {"config": cfg, "metrics": metrics, "world": SyntheticWorld(wc), "ckpt": ckpt, "theta0": theta0,
            "theta0_path": theta0_path}


def report(run_dir, reference_dir=None, landscape=None, power_iters=100, power_tol=1e-4, say=lambda text: None):
    """theory.json of one run: the Case I quantities at the run's (κ, δ, λ), the limit C
    against the fine-tuned model, and, for a Case II strategy's run, the Case II quantities.

    A Case I (constraint loss) run is also compared with the exact optimum P*_λ: its
    excess gaps G − G(P*) and its excess objective (G_f + λG_s') − (G_f + λG_s')(P*),
    which is ≥ 0 up to float error for any model.

    reference_dir: an unconstrained fine-tune (--constraint none) of the same θ_0 and
    world, for the distance d = ‖θ_f* − θ_0‖ of bound (E). landscape: theta0_landscape of
    the run's θ_0 if already known (fine-tunes of one θ_0 share it), else computed here. say: where
    progress goes (the CLI: stderr)."""
    say(f"{run_dir}: reading the run and its θ_0")
    run = load_run(run_dir)
    cfg, world = run["config"], run["world"]
    model = model_from_checkpoint(run["ckpt"]).eval()
    theta0_model = model_from_checkpoint(run["theta0"]).eval()
    # the gaps from the model's log-table, as evaluate.py measures them (no exp underflow)
    logq = model_log_table(model, world)
    measured = exact_metrics(logq, world)
    G_s, G_f = measured["safety_gap"], measured["capability_gap"]
    G_sp = expected_nll(world.mu["proxy"], world.P["proxy"], logq) - world.entropy("proxy")
    lam = cfg["lam"]
    out = {"run_dir": run_dir, "constraint": cfg["constraint"], "overlap": cfg["overlap"],
           "mismatch_delta": cfg["mismatch"], "lam": lam, "radius": cfg["radius"], "seed": cfg["seed"],
           "safety_gap": G_s, "capability_gap": G_f, "proxy_gap": G_sp,
           "distance": run["metrics"]["finetuned"]["distance"]}
    say("the exact optimum P*_λ of Case I at the run's λ, its bounds A1–B2 and the limit C of the world")
    out.update(world_case_one(world, lam))
    out["C_lhs"] = limit_C_lhs(G_s, G_f)
    out["C_holds"] = out["C_lhs"] >= out["C_limit"] - 1e-9
    strategy = STRATEGIES[cfg["constraint"]]
    out.update({k: cfg[k] for k in strategy.hparams if k not in out})  # e.g. γ of a soft Case II run
    if strategy.case == "I":
        out.update({"case1_safety_excess": G_s - out["optimum_safety_gap"],
                    "case1_capability_excess": G_f - out["optimum_capability_gap"],
                    "case1_objective_excess": (G_f + lam * G_sp) - (out["optimum_capability_gap"]
                                                                   + lam * out["optimum_proxy_gap"])})
    # the measured change of ℓ_s is cheap; the Hessian only where the radius matters
    pop = population_batch(world, "safety")
    with torch.no_grad():
        out["measured_safety_increase"] = float(population_loss(model, pop) - population_loss(theta0_model, pop))
    if strategy.case == "II":
        say(f"Case II: ∇ℓ_s and λ_max(H_s) at θ_0 (power iteration, at most {power_iters} Hessian-vector products)"
            if landscape is None else "Case II: the second-order prediction along θ − θ_0")
        c2 = case_two(theta0_model, model, world, landscape, power_iters, power_tol)
        r = cfg["radius"] if "radius" in strategy.hparams else c2["update_norm"]  # the ball's, or the step's
        out.update(c2)
        out["D_radius"] = r
        out["D_bound"] = bound_D(c2["grad_norm_s"], c2["hessian_top_eig_s"], r)
    if reference_dir is not None:
        say(f"(E): the distance of the unconstrained run {reference_dir}")
        ref = load_run(reference_dir)
        if ref["config"]["constraint"] != "none" or ref["ckpt"]["theta0_hash"] != run["ckpt"]["theta0_hash"]:
            raise RunError(f"--reference_run {reference_dir} must be a --constraint none fine-tune of the same θ_0")
        d = ref["metrics"]["finetuned"]["distance"]
        r = out.get("D_radius", out["distance"])
        excess = run["metrics"]["finetuned"]["capability_loss"] - ref["metrics"]["finetuned"]["capability_loss"]
        # (E) brackets the excess between (μ/2)(d−r)₊² and (L/2)(d−r)₊²: the curvature that
        # would make it an equality lies in [μ, L] wherever ℓ_f is μ-convex and L-smooth
        out.update({"d_unconstrained": d, "d_minus_r": max(d - r, 0.0), "capability_loss_over_unconstrained": excess,
                    "E_implied_curvature": 2 * excess / (d - r) ** 2 if d > r else None})
    return out


def json_safe(obj):
    """JSON has no ∞ or NaN: write them as the strings 'inf', '-inf', 'nan' (Python's
    float() reads them back), so nothing is clipped or dropped."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    return obj


# -----------------------------------------------------------------------------
# CLI

# what the printout shows of theory.json: the limit C and the distance for every run, then the
# quantities of the run's own case (Case I: the optimum and bounds at its λ; Case II: the landscape)
TABLE_KEYS = {"all": ["safety_gap", "capability_gap", "distance", "C_lhs", "C_limit", "measured_safety_increase"],
              "I": ["mismatch", "overlap_term", "overlap_mass", "optimum_safety_gap", "optimum_capability_gap",
                    "A1_safety_bound", "A2_safety_bound", "B1_capability_bound", "B2_capability_bound",
                    "case1_safety_excess", "case1_capability_excess", "case1_objective_excess"],
              "II": ["grad_norm_s", "hessian_top_eig_s", "second_order_prediction", "D_bound", "d_unconstrained",
                     "E_implied_curvature"]}


def print_table(out):
    strategy = STRATEGIES[out["constraint"]]
    print(f"{out['run_dir']}: {strategy.describe(out)}; world κ {out['overlap']:g}, δ {out['mismatch_delta']:g} "
          f"(losses and gaps in nats per sequence; THEORY.md §2–§3)")
    for k in TABLE_KEYS["all"] + TABLE_KEYS.get(strategy.case, []):
        if k in out:
            v = out[k]
            print(f"  {k:<34}{v:>14.6g}" if isinstance(v, (int, float)) else f"  {k:<34}{v!s:>14}")
    print("C_lhs = √G_s + √G_f, which no model brings below C_limit (THEORY.md §2, C); every number is in theory.json")


def parser():
    ap = Parser(description="The bounds of THEORY.md §2–§3 beside a finished train.py run on the synthetic world: "
                            "writes RUN_DIR/theory.json and prints its table (nats per sequence).",
                formatter_class=HelpFormatter)
    ap.add_argument("--run_dir", required=True, help="the --out_dir of a finished train.py run")
    ap.add_argument("--reference_run", default=None,
                    help="an unconstrained (--constraint none) fine-tune of the same θ_0, for the distance d of (E)")
    ap.add_argument("--power_iters", type=int, default=100, help="most power iterations for λ_max(H_s) (Case II)")
    ap.add_argument("--power_tol", type=float, default=1e-4, help="stop at this relative residual ‖Hv−λv‖/|λ|")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        out = report(args.run_dir, args.reference_run, power_iters=args.power_iters, power_tol=args.power_tol,
                     say=lambda text: print(text, file=sys.stderr, flush=True))
    except (RunError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    atomic_write_json(os.path.join(args.run_dir, "theory.json"), json_safe(out))
    print_table(out)
    return out


if __name__ == "__main__":
    main()
