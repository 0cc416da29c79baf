"""
What report.py and figures.py compute from results.csv before anything is checked or drawn: the
means over seeds of the runs of one setting, and the run names by which the real-text report
looks its runs up (sweep.py names its runs with them).
"""

import json
import math
import os

import numpy as np

from constraints import STRATEGIES
from realtext import loaders

# every real model (θ_0 too) is scored on these held-out sets; the report's refusal columns
REFUSAL_SETS = {"safety_llamas_eval": "harmful", "advbench": "harmful", "xstest_safe": "harmless",
                "rd_harmless_val": "harmless"}


# the refusal margin (lab.refusals.refusal_margin) of every real model: held-out harmful, safe prompts
MARGIN_SETS = ("safety_llamas_eval", "xstest_safe")


def arms(sc):
    """(starting point, its seeds, its run-id prefix) of each arm of sc.inits: θ_0 aligned from scratch,
    or from θ_pre (train.py --stage pretrain), whose runs are named 'pre-...'."""
    return [(init, tuple(sc.scratch_seeds) if init == "scratch" and sc.scratch_seeds else tuple(sc.seeds),
             "" if init == "scratch" else "pre-") for init in sc.inits]


def arm_rows(rows, prefix):
    """The rows of one arm: run ids that start with its prefix ('' is the scratch arm: no 'pre-')."""
    return [r for r in rows if r["run_id"].startswith(prefix) and (prefix or not r["run_id"].startswith("pre-"))]


def case_tasks(sc):
    """The tasks D_f of the Case I and Case II runs of a real sweep."""
    return tuple(sc.case_tasks) or (sc.task,)


def short(name):
    """A dataset name fit for a run id: a registry name, or a file's stem ('a+b' part by part)."""
    return "+".join(n if n in loaders.REGISTRY else os.path.splitext(os.path.basename(n))[0] for n in name.split("+"))


def real_run_id(constraint, task, proxy="", lam=0.0, radius=0.0, seed=None):
    """The run's id; without a seed, the name its seeds share (a group of real_groups)."""
    knob = {"loss": f"-{short(proxy)}-lam{lam:g}", "param": f"-r{radius:g}"}.get(constraint, "")
    return f"{constraint}-{short(task)}{knob}" + ("" if seed is None else f"-s{seed}")


def seed_means(rows):
    """{n, rows, and (mean, sd over seeds) of every numeric column} of rows that differ only by seed."""
    entry = {"n": len(rows), "rows": rows}
    for k in rows[0]:
        vals = [r.get(k) for r in rows]
        if all(isinstance(v, float) for v in vals):
            a = np.array(vals)
            with np.errstate(invalid="ignore"):  # a bound that is ∞ in every seed has no spread
                entry[k] = (float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0)
    return entry


def groups(rows, constraint, **fixed):
    """Rows of one strategy and fixed settings grouped over seeds by its sweep parameter (λ, r, γ): a list
    sorted by the knob of {x: the knob, n, and (mean, std) per metric}."""
    knob = STRATEGIES[constraint].sweep_param or "lam"  # plain fine-tuning: λ = 0
    sel = [r for r in rows if r["constraint"] == constraint and all(abs(r[k] - v) < 1e-12 for k, v in fixed.items())]
    return [dict(seed_means([r for r in sel if r[knob] == x]), x=x) for x in sorted({r[knob] for r in sel})]


def mean(g, k):
    return g[k][0]


def real_groups(rows):
    """Seed means per run name (the run id without its seed), in the order of rows."""
    names = dict.fromkeys(r["run_id"].rsplit("-s", 1)[0] for r in rows)
    return {n: seed_means([r for r in rows if r["run_id"].rsplit("-s", 1)[0] == n]) for n in names}


def theta0_means(sc, prefix="", seeds=None):
    """Seed means of the aligned models' refusal rates (refusals.json of each align task of the arm
    whose run ids start with prefix: '' from scratch, 'pre-' from θ_pre)."""
    return seed_means([json.load(open(os.path.join(sc.out_dir, "theta0", f"{prefix}s{s}", "refusals.json")))
                       for s in (seeds or sc.seeds)])


# -----------------------------------------------------------------------------
# The forecast (forecast.py) against measurement: does the overlap, estimated from prompts before
# any fine-tuning, rank task sets by the safety they cost?


def spearman(x, y):
    """Spearman's rank correlation (ties share their mean rank); nan if either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        return np.array([r[v == u].mean() for u in v])
    if np.isnan(np.asarray(x, dtype=float)).any() or np.isnan(np.asarray(y, dtype=float)).any():
        return float("nan")  # ±∞ rank at the ends; an undefined value has no rank
    a, b = ranks(x), ranks(y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def by_lam(terms, lam):
    """An (A2) term of a forecast by λ, whether its keys are numbers or (read back from JSON) strings."""
    return terms[lam] if lam in terms else terms[str(float(lam))]


def forecast_validation(rows, est, tasks, prefix, lam=1.0):
    """Per task with plain fine-tunes in the arm of `prefix`: its forecast (the (A2) overlap term at λ)
    and the measured safety cost at matched capability gain g*, linear between θ_0 and the end of
    each run, i.e. g* × (ℓ_s − ℓ_s(θ_0)) / (ℓ_f(θ_0) − ℓ_f), with g* the smallest positive mean gain
    of the tasks; Spearman's ρ between the two on seed means and seed by seed. A run that paid
    safety for no held-out gain has cost +∞ per nat gained (listed under 'no_gain'); one that
    neither gained nor paid says nothing and is left out ('left_out')."""
    mine = [r for r in arm_rows(rows, prefix) if r["constraint"] == "none"]
    runs = {t: [r for r in mine if r["run_id"].rsplit("-s", 1)[0] == prefix + real_run_id("none", t)] for t in tasks}
    runs = {t: rs for t, rs in runs.items() if rs}
    mean_of = lambda rs, k: float(np.mean([r[k] for r in rs]))
    per_gain = lambda cost, gain: cost / gain if gain > 0 else (math.inf if cost > 0 else math.nan)
    left_out = [t for t, rs in runs.items() if math.isnan(per_gain(mean_of(rs, "safety_increase"),
                                                                    mean_of(rs, "capability_gain")))]
    runs = {t: rs for t, rs in runs.items() if t not in left_out}
    gains = [mean_of(rs, "capability_gain") for rs in runs.values() if mean_of(rs, "capability_gain") > 0]
    if not runs or not gains:
        return {"tasks": {}, "no_gain": [], "left_out": left_out, "rho": math.nan, "rho_seeds": {}}
    g_star = min(gains)
    out = {}
    for t, rs in runs.items():
        ratio = {int(r["seed"]): per_gain(r["safety_increase"], r["capability_gain"]) for r in rs}
        gain = mean_of(rs, "capability_gain")
        mean_ratio = per_gain(mean_of(rs, "safety_increase"), gain)  # on seed means, as ρ is
        out[t] = {"forecast": by_lam(est["overlap"][t]["a2_overlap_term"], lam), "gain": gain,
                  "cost": mean_of(rs, "safety_increase"), "matched": g_star * mean_ratio, "ratio_seeds": ratio,
                  "n": len(rs)}
    ts = list(out)
    seeds = sorted(set.intersection(*(set(out[t]["ratio_seeds"]) for t in ts)))
    rho_seeds = {s: spearman([out[t]["forecast"] for t in ts], [out[t]["ratio_seeds"][s] for t in ts]) for s in seeds}
    return {"tasks": out, "g_star": g_star, "no_gain": [t for t in ts if out[t]["gain"] <= 0], "left_out": left_out,
            "lam": lam, "rho": spearman([out[t]["forecast"] for t in ts], [out[t]["matched"] for t in ts]),
            "rho_seeds": rho_seeds}
