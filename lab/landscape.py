"""
F6 across basins (THEORY.md §5 F6): does an aligned model in a flatter basin of ℓ_s give up less
safety for one and the same Case II radius? At small r, Δ_s ≈ ∇ℓ_s·v + ½vᵀH_s v holds by Taylor's
theorem for any θ_0; what a single θ_0 cannot show is the comparison between basins. Here θ_0s are
aligned by recipes chosen to differ in sharpness (VARIANTS), on the paper preset's world, and each
gets its curvature at θ_0 (λ_max(H_s) by power iteration, tr(H_s) by Hutchinson's estimator) and
‖∇ℓ_s(θ_0)‖; then Case II fine-tunes at the same radii from each. Across every θ_0 (recipe × seed),
Spearman's ρ between each landscape measure and the measured Δ_s at each r says whether flatter
basins lose less.

    python -m lab.landscape                  # results/landscape/results.md and the README block
    python -m lab.landscape --jobs 1 --out_dir out_landscape_test --seeds 1 --radii 0.5

Each recipe is one sweep (sweep.py: its θ_0 per seed, the unconstrained run, the radii), so an
interrupted run resumes where it stopped.
"""

import argparse
import json
import math
import os
import sys

import theory
from common import DataError, HelpFormatter, Parser, SweepError, atomic_write_json, first_paragraph
from data import SyntheticWorld, WorldConfig
from lab import analysis, report, sweep
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from train import ConfigError

# alignment recipes for θ_0 (TrainConfig fields over the paper preset's), chosen for their
# sharpness. Step size, batch size, weight decay and the number of steps barely move it: aligned
# with align_lr 1e-3, batch_tokens 160, weight_decay 0.1, 250 or 3,200 steps (seed 1), λ_max(H_s)
# was 33.1–37.5 against the preset's 35.9, because every recipe reaches the same conditional P_s
# and the curvature there is set by the data. Label smoothing stops short of P_s, in a wider
# basin (λ_max 24.1, 19.0, 11.8 at ε = 0.1, 0.3, 0.6), at the price of a θ_0 that is less safe
# (ℓ_s above the entropy) and not stationary (‖∇ℓ_s‖ 0.7–3.6 against 0.18)
VARIANTS = {
    "base": {},
    "smooth-0.1": {"align_label_smoothing": 0.1},
    "smooth-0.3": {"align_label_smoothing": 0.3},
    "smooth-0.6": {"align_label_smoothing": 0.6},
}
RADII = (0.25, 0.5, 1.0)


def theta0_curvature(theta0_dir, world, samples=32):
    """λ_max(H_s), ‖∇ℓ_s‖ and ℓ_s at a θ_0, as its sweep measured them (landscape.json), and
    tr(H_s) ± its standard error by Hutchinson's estimator (THEORY.md §3, §5 F6)."""
    with open(os.path.join(theta0_dir, "landscape.json")) as f:
        land_json = json.load(f)
    model = model_from_checkpoint(load_checkpoint(os.path.join(theta0_dir, "theta0.pt"))).eval()
    pop = theory.population_batch(world, "safety")
    land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
    tr, se = theory.hutchinson_trace(land.hvp, land.n, samples=samples)
    return {"lambda_max": land_json["hessian_top_eig_s"], "trace": tr, "trace_se": se,
            "grad_norm": land_json["grad_norm_s"], "safety_loss_theta0": land_json["safety_loss_theta0"]}


def run(out_dir, seeds, radii, jobs, variants=VARIANTS, train=None, power_iters=None):
    """Every recipe's sweep, then one row per (recipe, seed): its landscape and Δ_s per radius; train:
    TrainConfig values over every recipe's (--train KEY=VALUE), as in the sweep; power_iters: the
    most power iterations of λ_max(H_s) (None: the sweep's)."""
    more = {} if power_iters is None else {"power_iters": power_iters}
    rows = []
    for name, over in variants.items():
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
            if not os.path.exists(cache):  # Hutchinson's 32 HVPs: once per θ_0
                atomic_write_json(cache, theta0_curvature(os.path.dirname(cache), world))
            with open(cache) as f:
                c = json.load(f)
            mine = {r["radius"]: r for r in runs if r["constraint"] == "param" and int(r["seed"]) == seed}
            rows.append({"variant": name, "seed": seed, **c,
                         "delta_s": {r: mine[r]["measured_safety_increase"] for r in radii},
                         "prediction": {r: mine[r]["second_order_prediction"] for r in radii},
                         "gain": {r: mine[r]["capability_gap"] for r in radii}})
    return rows


def write(rows, radii, report_dir, seconds, home):
    """results.md: one line per θ_0, then ρ(curvature, Δ_s) per r; the README block when home."""
    lines = ["<!-- generated by `python -m lab.landscape`; do not edit by hand -->",
             f"F6 across basins: {len(rows)} θ_0 ({len({r['variant'] for r in rows})} alignment recipes × "
             f"{len({r['seed'] for r in rows})} seeds) on the paper preset's world (κ 0.25, δ 0.3), Case II at r ∈ "
             f"{{{', '.join(f'{r:g}' for r in radii)}}} from each; {seconds / 60:.1f} min of wall time in the recipes' "
             "sweeps (their sweep.json, summed). Δ_s = ℓ_s(θ) − ℓ_s(θ_0) in nats per sequence (exact population loss).", "",
             "| recipe | seed | λ_max(H_s) | tr(H_s) (Hutchinson, ± se) | ‖∇ℓ_s(θ_0)‖ | ℓ_s(θ_0) | "
             + " | ".join(f"Δ_s at r={r:g}" for r in radii) + " | " + " | ".join(f"G_f at r={r:g}" for r in radii)
             + " |", "|" + " --- |" * (6 + 2 * len(radii))]
    for r in rows:
        recipe = json.dumps(VARIANTS.get(r["variant"], {})) if VARIANTS.get(r["variant"]) else "paper preset"
        lines.append(f"| {r['variant']} ({recipe}) | {r['seed']} | {r['lambda_max']:.3f} | {r['trace']:.1f} ± "
                     f"{r['trace_se']:.1f} | {r['grad_norm']:.4f} | {r['safety_loss_theta0']:.4f} | "
                     + " | ".join(f"{r['delta_s'][x]:.4f}" for x in radii) + " | "
                     + " | ".join(f"{r['gain'][x]:.3f}" for x in radii) + " |")
    lam = [r["lambda_max"] for r in rows]
    lines += ["", "Spearman ρ across the θ_0s between a landscape measure at θ_0 and Δ_s at each radius "
              "(positive: sharper basins lose more safety):", "",
              "| r | ρ(λ_max, Δ_s) | ρ(tr H_s, Δ_s) | ρ(‖∇ℓ_s‖, Δ_s) | λ_max spans |", "| --- | --- | --- | --- | --- |"]
    for x in radii:
        ds = [r["delta_s"][x] for r in rows]
        lines.append(f"| {x:g} | {analysis.spearman(lam, ds):+.2f} | "
                     f"{analysis.spearman([r['trace'] for r in rows], ds):+.2f} | "
                     f"{analysis.spearman([r['grad_norm'] for r in rows], ds):+.2f} | "
                     f"{min(lam):.3f} to {max(lam):.3f} ({max(lam) / min(lam):.1f}×) |")
    os.makedirs(report_dir, exist_ok=True)
    report.publish(argparse.Namespace(preset="landscape", report_dir=report_dir), "\n".join(lines) + "\n", home)
    print("\n".join(lines[1:]))
    return lines


def parser():
    ap = Parser(prog="python -m lab.landscape", description=first_paragraph(__doc__),
                formatter_class=HelpFormatter)
    ap.add_argument("--out_dir", default="out_sweep/landscape", help="one sweep folder per recipe under it")
    ap.add_argument("--report_dir", default="", help="results.md (default: results/landscape, which also fills the README)")
    ap.add_argument("--seeds", type=lambda t: sweep.parse_list(t, int), default=(1, 2),
                    help="seeds of each recipe's θ_0 (comma-separated)")
    ap.add_argument("--radii", type=lambda t: sweep.parse_list(t, float), default=RADII,
                    help="Case II radii r, fine-tuned from every θ_0 (comma-separated)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    ap.add_argument("--train", action="append", type=sweep.parse_setting, metavar="KEY=VALUE", default=[],
                    help="a train.py setting of every recipe's runs (--train align_iters=500), as in lab.sweep; "
                         "repeatable")
    ap.add_argument("--power_iters", type=int, default=None,
                    help="the most power iterations of λ_max(H_s) at each θ_0 and run (default: the sweep's)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if not args.seeds or not args.radii or any(not (r > 0 and math.isfinite(r)) for r in args.radii):
        ap.error("--seeds and --radii need at least one value each, radii > 0")
    train = dict(args.train)
    recipes_set = sorted({k for over in VARIANTS.values() for k in over} & set(train))
    if recipes_set:
        ap.error(f"--train {recipes_set[0]}: each recipe sets it (VARIANTS in lab/landscape.py)")
    home = "results/landscape"
    try:
        rows = run(args.out_dir, args.seeds, args.radii, args.jobs, train=train, power_iters=args.power_iters)
    except (SweepError, CheckpointError, ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    if rows is not None:
        wall = sum(json.load(open(os.path.join(args.out_dir, v, "sweep.json")))["wall_seconds"] for v in VARIANTS)
        write(rows, args.radii, args.report_dir or home, wall, home)
    return rows


if __name__ == "__main__":
    main()
