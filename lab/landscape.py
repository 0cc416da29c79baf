"""
F6 across basins (THEORY.md §5 F6): does an aligned model in a flatter basin of ℓ_s give up less
safety for one and the same Case II radius? At small r, Δ_s ≈ ∇ℓ_s·v + ½vᵀH_s v holds by Taylor's
theorem for any θ_0; what a single θ_0 cannot show is the comparison between basins. Here θ_0s are
aligned on the paper preset's world by sharpness-aware minimisation at several radii ρ (ρ = 0:
plain alignment), which reaches minima of the same loss that differ in curvature; each θ_0 must sit
at the optimum (G_s ≤ --max_gap). At each: λ_max(H_s) by power iteration, tr(H_s) by Hutchinson's
estimator, their adaptive versions (the Hessian in the coordinates T = diag(|θ|), which a
function-preserving rescaling of the weights cannot change) and ‖∇ℓ_s(θ_0)‖; then plain fine-tuning
and Case II at the same radii from each. Spearman's ρ between each measure and the measured Δ_s,
over every θ_0 and seed by seed, says whether flatter basins lose less.

    python -m lab.landscape                  # results/landscape/results.md and the README block
    python -m lab.landscape --jobs 1 --out_dir out_landscape_test --seeds 1 --radii 0.5 --sam_rhos 0,0.1 --align_iters 200

Each recipe is one sweep (sweep.py: its θ_0 per seed, the plain run, the radii), so an interrupted
run resumes where it stopped.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

import theory
from common import DataError, HelpFormatter, Parser, SweepError, atomic_write_json, first_paragraph
from data import SyntheticWorld, WorldConfig
from lab import analysis, report, sweep
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from train import ConfigError

# SAM's radius ρ of each recipe's alignment, and the alignment's length for every recipe. Measured on
# the paper preset's world (seed 1): after its 800 steps, ρ = 0, 0.05, 0.1, 0.15, 0.2 gave λ_max(H_s)
# 35.9, 17.1, 20.5, 16.4, 5.3 at G_s 0.003, 0.005, 0.005, 0.006, 0.016, and ρ = 0.5 gave 2.6 at G_s
# 0.95, off the optimum: SAM keeps drifting along the minima towards flatter ones, and the longer
# schedule's low final step size settles it. After 1,600 steps ρ = 0.2 gave λ_max 2.7 but G_s 0.0094,
# 0.0106, 0.0104 over seeds 1-3, at the edge of MAX_GAP, so the flattest recipe is ρ = 0.15. Label
# smoothing (the previous version of this experiment) also flattened θ_0, but away from the minimum
# of ℓ_s, where the gradient, not the curvature, decides
SAM_RHOS = (0.0, 0.05, 0.1, 0.15)
ALIGN_ITERS = 1600
RADII = (0.25, 0.5, 1.0)
MAX_GAP = 0.01  # nats: a θ_0 with G_s above this is not at the optimum, and the report says so
MEASURES = {"lambda_max": "λ_max(H_s)", "trace": "tr H_s", "adaptive_lambda_max": "adaptive λ_max",
            "adaptive_trace": "adaptive tr", "grad_norm": "‖∇ℓ_s‖"}
CURVATURE_VERSION = 2  # curvature.json of an older version lacks the adaptive measures: measured again


def variants(sam_rhos, align_iters=ALIGN_ITERS):
    """The alignment recipes, TrainConfig fields over the paper preset's: plain at ρ = 0, else SAM."""
    steps = {"align_iters": align_iters}
    return {("plain" if rho == 0 else f"sam-{rho:g}"):
            (steps if rho == 0 else {**steps, "align_method": "sam", "sam_rho": rho}) for rho in sam_rhos}


def theta0_curvature(theta0_dir, world, samples=32, power_iters=100, power_tol=1e-4):
    """The θ_0 landscape record: λ_max(H_s), ‖∇ℓ_s‖ and ℓ_s as its sweep measured them (landscape.json),
    G_s = ℓ_s − H_s, tr(H_s) ± its standard error by Hutchinson's estimator, and the adaptive
    λ_max and trace of T H_s T, T = diag(|θ_0|) (THEORY.md §5 F6, 'a sharpness a reparametrisation
    cannot fake')."""
    with open(os.path.join(theta0_dir, "landscape.json")) as f:
        land_json = json.load(f)
    model = model_from_checkpoint(load_checkpoint(os.path.join(theta0_dir, "theta0.pt"))).eval()
    pop = theory.population_batch(world, "safety")
    land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
    tr, se = theory.hutchinson_trace(land.hvp, land.n, samples=samples)
    adaptive = theory.adaptive_hvp(land.hvp, theory.flat_weights(model))
    a_lam, a_it, a_res = theory.power_iteration(adaptive, land.n, iters=power_iters, tol=power_tol)
    a_tr, a_se = theory.hutchinson_trace(adaptive, land.n, samples=samples)
    return {"lambda_max": land_json["hessian_top_eig_s"], "trace": tr, "trace_se": se,
            "adaptive_lambda_max": a_lam, "adaptive_iters": a_it, "adaptive_residual": a_res,
            "adaptive_trace": a_tr, "adaptive_trace_se": a_se, "grad_norm": land_json["grad_norm_s"],
            "safety_loss_theta0": land_json["safety_loss_theta0"],
            "safety_gap": land_json["safety_loss_theta0"] - world.entropy("safety")}


def run(out_dir, seeds, radii, jobs, recipes, train=None, power_iters=None):
    """Every recipe's sweep, then one row per (recipe, seed): its landscape and Δ_s per radius and for
    the plain fine-tune; train: TrainConfig values over every recipe's (--train KEY=VALUE), as in
    the sweep; power_iters: the most power iterations of λ_max (None: the sweep's)."""
    more = {} if power_iters is None else {"power_iters": power_iters}
    rows = []
    for name, over in recipes.items():
        # the sweep's grids cannot be empty: one Case I run (λ = 1 at the radii's world) comes along
        sc, recipe = sweep.make_config("paper", train, out_dir=os.path.join(out_dir, name), seeds=tuple(seeds),
                                       lams=(1.0,), mismatches=(0.3,), overlaps=(0.25,), radii=tuple(radii), jobs=jobs, **more)
        recipe = dict(recipe, **over)
        runs = sweep.run_sweep(sc, recipe, write_report=False)
        if runs is None:  # stopped early (--max_runs): nothing to report yet
            return None
        world = SyntheticWorld(WorldConfig(overlap=sc.overlap, mismatch=sc.mismatch))
        for seed in seeds:
            cache = os.path.join(sc.out_dir, "theta0", f"s{seed}", "curvature.json")
            c = json.load(open(cache)) if os.path.exists(cache) else {}
            key = {"version": CURVATURE_VERSION, "power_iters": sc.power_iters, "power_tol": sc.power_tol,
                   "theta0_hash": json.load(open(os.path.join(os.path.dirname(cache), "landscape.json")))["theta0_hash"]}
            if any(c.get(k) != v for k, v in key.items()):  # 64 HVPs and a power iteration: once per θ_0
                c = {**theta0_curvature(os.path.dirname(cache), world, power_iters=sc.power_iters,
                                        power_tol=sc.power_tol), **key}
                atomic_write_json(cache, c)
            mine = {r["radius"]: r for r in runs if r["constraint"] == "param" and int(r["seed"]) == seed}
            plain = next(r for r in runs if r["constraint"] == "none" and int(r["seed"]) == seed)
            rows.append({"variant": name, "seed": seed, **c,
                         "delta_s": {r: mine[r]["measured_safety_increase"] for r in radii},
                         "delta_plain": plain["measured_safety_increase"],
                         "prediction": {r: mine[r]["second_order_prediction"] for r in radii},
                         "second_order": {r: mine[r]["second_order_term"] for r in radii},
                         "gain": {r: mine[r]["capability_gap"] for r in radii}})
    return rows


def correlations(rows, costs):
    """Spearman ρ(measure, cost) per measure: over every θ_0, and across the recipes within each seed."""
    out = {}
    for key in MEASURES:
        overall = analysis.spearman([r[key] for r in rows], costs)
        per_seed = []
        for seed in sorted({r["seed"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["seed"] == seed]
            if len(idx) > 2:
                per_seed.append(analysis.spearman([rows[i][key] for i in idx], [costs[i] for i in idx]))
        out[key] = (overall, per_seed, permutation_p(rows, key, costs, overall))
    return out


def permutation_p(rows, key, costs, observed, n=2000, seed=0):
    """One-sided p-values (sharper loses more, flatter loses more) of the ρ over every θ_0 under the
    null that a θ_0's measure says nothing of its cost: the measure is shuffled across the recipes
    within each seed (seeds stay apart, as the recipes' θ_0s of one seed share their initial weights)."""
    if math.isnan(observed):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([r[key] for r in rows], dtype=float)
    groups = [np.array([i for i, r in enumerate(rows) if r["seed"] == s]) for s in sorted({r["seed"] for r in rows})]
    null = []
    for _ in range(n):
        v = values.copy()
        for g in groups:
            v[g] = v[rng.permutation(g)]
        null.append(analysis.spearman(v, costs))
    null = np.array(null)
    return float((1 + np.sum(null >= observed - 1e-12)) / (n + 1)), float((1 + np.sum(null <= observed + 1e-12)) / (n + 1))


def verdict(overall, per_seed, p, alpha=0.05):
    """'yes' when sharper θ_0s lose more: ρ over every θ_0 above what shuffling the measure within seeds
    gives at one-sided level alpha; '**no**, the opposite' when flatter ones lose more at that level;
    '**no** order' otherwise; with the count of seeds whose own ρ is positive."""
    seeds = [x for x in per_seed if not math.isnan(x)]
    agree = f"{sum(x > 0 for x in seeds)} of {len(seeds)} seeds alone" if seeds else "too few recipes per seed"
    if math.isnan(overall):
        return "n/a (a constant measure or cost)"
    if p[0] <= alpha:
        return f"yes (p {p[0]:.3f}; {agree})"
    if p[1] <= alpha:
        return f"**no**, the opposite (p {p[1]:.3f}; {agree})"
    return f"**no** order (p {min(p):.2f}; {agree})"


def fmt_rho(overall, per_seed, p=None):
    seeds = [x for x in per_seed if not math.isnan(x)]
    return f"{overall:+.2f}" + (f" ({min(seeds):+.2f} to {max(seeds):+.2f})" if seeds else "")


def theta0_lines(rows, radii, recipes, max_gap):
    """One line per θ_0 (its landscape and Δ_s per fine-tune), then whether each sits at the optimum."""
    lines = ["| recipe | seed | G_s(θ_0) | ‖∇ℓ_s(θ_0)‖ | λ_max(H_s) | tr H_s (± se) | adaptive λ_max | adaptive tr (± se) | "
             + " | ".join(f"Δ_s at r={r:g}" for r in radii) + " | Δ_s plain |", "|" + " --- |" * (9 + len(radii))]
    for r in rows:
        over = recipes.get(r["variant"])
        name = f"{r['variant']} ({json.dumps(over)})" if over else r["variant"]
        lines.append(f"| {name} | {r['seed']} | {r['safety_gap']:.4f} | {r['grad_norm']:.4f} | {r['lambda_max']:.2f} | "
                     f"{r['trace']:.1f} ± {r['trace_se']:.1f} | {r['adaptive_lambda_max']:.3g} | "
                     f"{r['adaptive_trace']:.3g} ± {r['adaptive_trace_se']:.2g} | "
                     + " | ".join(f"{r['delta_s'][x]:.4f}" for x in radii) + f" | {r['delta_plain']:.4f} |")
    lam, gaps = [r["lambda_max"] for r in rows], [r["safety_gap"] for r in rows]
    off = [f"{r['variant']} s{r['seed']} ({r['safety_gap']:.3f})" for r in rows if r["safety_gap"] > max_gap]
    loose = [f"{r['variant']} s{r['seed']}" for r in rows if r.get("adaptive_residual", 0) > r.get("power_tol", math.inf)]
    return lines + ["", f"**θ_0 at the optimum?** G_s(θ_0) {min(gaps):.4f} to {max(gaps):.4f} nats: "
                    + (f"every θ_0 within {max_gap:g}" if not off else f"**not** every θ_0 within {max_gap:g}: "
                       + ", ".join(off) + "; those are left out of the verdicts below") + f". λ_max(H_s) spans "
                    f"{min(lam):.2f} to {max(lam):.2f} ({max(lam) / min(lam):.1f}×), adaptive λ_max "
                    f"{min(r['adaptive_lambda_max'] for r in rows):.3g} to {max(r['adaptive_lambda_max'] for r in rows):.3g}"
                    + (f"; the adaptive power iteration stopped short of its tolerance at {', '.join(loose)}" if loose
                       else "") + "."]


def verdict_lines(rows, radii, n_rec):
    """ρ(measure, Δ_s) per fine-tune over the θ_0s at the optimum, then the verdict per fine-tune and measure."""
    costs = [(f"Case II r={x:g}", [r["delta_s"][x] for r in rows]) for x in radii]
    costs.append(("plain fine-tune", [r["delta_plain"] for r in rows]))
    judged = [(name, correlations(rows, ds)) for name, ds in costs]
    head = "| fine-tune | " + " | ".join(MEASURES.values()) + " |"
    rule = "|" + " --- |" * (1 + len(MEASURES))
    return (["**Does a flatter θ_0 lose less safety?** Spearman ρ between each measure at θ_0 and Δ_s over the "
             f"{len(rows)} θ_0s at the optimum (in brackets: across the {n_rec} recipes within each seed alone, lowest "
             "to highest); positive: sharper basins lose more, as the paper claims.", "", head, rule]
            + [f"| {name} | " + " | ".join(fmt_rho(*c[k]) for k in MEASURES) + " |" for name, c in judged]
            + ["", "**Verdict: do sharper θ_0s lose more?** The ρ over every θ_0 against 2,000 shuffles of the measure "
               "across recipes within each seed, one-sided at 5% (p of the tail the answer names). The Case II ball "
               "is an L2 ball in the raw weights, so raw λ_max is what (D) names; the adaptive measures speak of a "
               "ball scaled by |θ_0| (THEORY.md §5 F6).", "", head, rule]
            + [f"| {name} | " + " | ".join(verdict(*c[k]) for k in MEASURES) + " |" for name, c in judged])


def second_order_lines(rows, radii):
    """The second-order prediction of (D) along each run's own update against the measured Δ_s."""
    lines = ["**The second-order prediction** ∇ℓ_s·v + ½vᵀH_s v along each run's own update v = θ − θ_0 "
             "against the measured Δ_s (THEORY.md §3, (D)):", "",
             "| r | median measured / predicted | ρ(½vᵀH_s v, Δ_s) | median share of ½vᵀH_s v in the prediction |",
             "| --- | --- | --- | --- |"]
    for x in radii:
        ds, pred = np.array([r["delta_s"][x] for r in rows]), np.array([r["prediction"][x] for r in rows])
        second, safe = np.array([r["second_order"][x] for r in rows]), np.where(pred == 0, np.nan, pred)
        lines.append(f"| {x:g} | {np.nanmedian(ds / safe):.2f} | {analysis.spearman(second, ds):+.2f} | "
                     f"{np.nanmedian(second / safe):.2f} |")
    return lines


def write(rows, radii, report_dir, seconds, home, recipes=None, max_gap=MAX_GAP):
    """results.md: one line per θ_0, the optimum check, ρ(measure, Δ_s) per fine-tune with the verdicts
    (θ_0s off the optimum left out), and the second-order prediction against Δ_s; the README block when home."""
    n_rec, n_seed = len({r["variant"] for r in rows}), len({r["seed"] for r in rows})
    judged = [r for r in rows if r["safety_gap"] <= max_gap]
    lines = ["<!-- generated by `python -m lab.landscape`; do not edit by hand -->",
             f"F6 across basins: {len(rows)} θ_0 ({n_rec} alignment recipes × {n_seed} seeds) on the paper preset's "
             f"world (κ 0.25, δ 0.3); plain fine-tuning and Case II at r ∈ {{{', '.join(f'{r:g}' for r in radii)}}} "
             f"from each; {seconds / 60:.1f} min of wall time in the recipes' sweeps (their sweep.json, summed). "
             "Δ_s = ℓ_s(θ) − ℓ_s(θ_0) in nats per sequence (exact population loss); adaptive: of T H_s T, "
             "T = diag(|θ_0|) (THEORY.md §5 F6).", "", *theta0_lines(rows, radii, recipes or {}, max_gap), ""]
    lines += (verdict_lines(judged, radii, n_rec) if len(judged) > 2 else ["Fewer than 3 θ_0s at the optimum: no verdict."])
    lines += ["", *second_order_lines(rows, radii)]
    os.makedirs(report_dir, exist_ok=True)
    report.publish(argparse.Namespace(preset="landscape", report_dir=report_dir), "\n".join(lines) + "\n", home)
    print("\n".join(lines[1:]))
    return lines


def parser():
    ap = Parser(prog="python -m lab.landscape", description=first_paragraph(__doc__),
                formatter_class=HelpFormatter)
    ap.add_argument("--out_dir", default="out_sweep/landscape", help="one sweep folder per recipe under it")
    ap.add_argument("--report_dir", default="", help="results.md (default: results/landscape, which also fills the README)")
    ap.add_argument("--seeds", type=lambda t: sweep.parse_list(t, int), default=(1, 2, 3),
                    help="seeds of each recipe's θ_0 (comma-separated)")
    ap.add_argument("--radii", type=lambda t: sweep.parse_list(t, float), default=RADII,
                    help="Case II radii r, fine-tuned from every θ_0 (comma-separated)")
    ap.add_argument("--sam_rhos", type=lambda t: sweep.parse_list(t, float), default=SAM_RHOS,
                    help="SAM's radius ρ of each recipe's alignment, one recipe each (0: plain alignment)")
    ap.add_argument("--align_iters", type=int, default=ALIGN_ITERS, help="align steps of every recipe's θ_0")
    ap.add_argument("--max_gap", type=float, default=MAX_GAP, help="G_s(θ_0) above this many nats is off the optimum")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    ap.add_argument("--train", action="append", type=sweep.parse_setting, metavar="KEY=VALUE", default=[],
                    help="a train.py setting of every recipe's runs (--train max_iters=300), as in lab.sweep; "
                         "repeatable")
    ap.add_argument("--power_iters", type=int, default=None,
                    help="the most power iterations of λ_max(H_s) at each θ_0 and run (default: the sweep's)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if not args.seeds or not args.radii or any(not (r > 0 and math.isfinite(r)) for r in args.radii):
        ap.error("--seeds and --radii need at least one value each, radii > 0")
    if not args.sam_rhos or any(not (r >= 0 and math.isfinite(r)) for r in args.sam_rhos):
        ap.error(f"--sam_rhos {','.join(f'{r:g}' for r in args.sam_rhos)}: SAM's radii must be finite numbers ≥ 0")
    train = dict(args.train)
    if train.get("data", "synthetic") != "synthetic":
        ap.error("--train data=real: the landscape needs the exact ℓ_s and its Hessian, which only the synthetic "
                 "world has; drop it")
    if args.align_iters < 1:
        ap.error(f"--align_iters {args.align_iters} must be at least 1")
    recipes = variants(args.sam_rhos, args.align_iters)
    recipes_set = sorted({k for over in recipes.values() for k in over} & set(train))
    if recipes_set:
        ap.error(f"--train {recipes_set[0]}: each recipe sets it (" + ("--align_iters" if recipes_set[0] == "align_iters"
                                                                       else "--sam_rhos") + ")")
    home = "results/landscape"
    try:
        rows = run(args.out_dir, args.seeds, args.radii, args.jobs, recipes, train=train, power_iters=args.power_iters)
    except (SweepError, CheckpointError, ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    if rows is not None:
        wall = sum(json.load(open(os.path.join(args.out_dir, v, "sweep.json")))["wall_seconds"] for v in recipes)
        write(rows, args.radii, args.report_dir or home, wall, home, recipes, args.max_gap)
    return rows


if __name__ == "__main__":
    main()
