"""
The real-text reports' checks of the theory's assumptions, and the forecasts against measurement
(presets real-cpu and paper-real-cpu; THEORY.md §1 "θ_0 at the optimum", §4, §5). Before any
finding is judged, each report prints:

    θ_0        where alignment stopped on D_s's validation part, held-out ℓ_s, the size of ∇ℓ_s at θ_0
               (⟨g_A, g_B⟩ of the held-out part's two halves), and the control: a plain fine-tune on
               fresh examples of D_s's teacher, which at an optimum cannot lower ℓ_s beyond its noise
    coverage   the share of each set's answer tokens the loss scores at the recipe's block size
    mismatch   each proxy's distance from D_s: bigram references on equal tokens, and θ_pre aligned on it
    2×2        the paper's cells (overlap × answer agreement): the cost each pays at matched gain
    forecasts  context-only (from prompts) and answer-aware (from gradients at θ_0) against the cost
               measured: Spearman's ρ and sign accuracy, on seed means and seed by seed
"""

import json
import math
import os

import numpy as np

from lab import analysis
from lab.analysis import real_run_id, spearman


def theta0_rows(sc, prefix, seeds):
    """refusals.json of each θ_0 of an arm (its record: losses, stop step, gradient size)."""
    out = {}
    for s in seeds:
        path = os.path.join(sc.out_dir, "theta0", f"{prefix}s{s}", "refusals.json")
        if os.path.exists(path):
            out[s] = json.load(open(path))
    return out


def plain(rows, prefix, task):
    """{seed: row} of the plain fine-tunes of a task in an arm."""
    name = prefix + real_run_id("none", task)
    return {int(r["seed"]): r for r in analysis.arm_rows(rows, prefix) if r["run_id"].rsplit("-s", 1)[0] == name}


def control_verdict(deltas):
    """The control's verdict: θ_0 is data-limited where fresh same-teacher examples lower ℓ_s by
    more than the seed spread of that change (one seed: by more than nothing, said as such)."""
    if not deltas:
        return "no control run"
    m = float(np.mean(deltas))
    if len(deltas) == 1:
        return f"one seed, no spread to compare: the control changes ℓ_s by {m:+.1f} nats"
    sd = float(np.std(deltas, ddof=1))
    if m < -sd:
        return (f"**data-limited**: fresh same-teacher examples lower ℓ_s by {-m:.1f} ± {sd:.1f} nats, more than "
                f"their seed spread; any task's apparent safety gain below that is the same effect")
    return f"at its optimum within noise: the control changes ℓ_s by {m:+.1f} ± {sd:.1f} nats"


def theta0_table(sc, rows, arms, control):
    """One row per θ_0: where it stopped, ℓ_s, ∇ℓ_s's size; the control's Δℓ_s; then a verdict per arm."""
    lines = ["| θ_0 from | seed | stop step (of steps run) | validation ℓ_s | held-out ℓ_s | ‖∇ℓ_s‖ | ⟨g_A, g_B⟩ "
             "(halves) | halves' cosine | control Δℓ_s |", "|" + " --- |" * 9]
    notes = []
    for label, prefix, seeds in arms:
        ctl = plain(rows, prefix, control) if control else {}
        for s, r in theta0_rows(sc, prefix, seeds).items():
            stop = f"{r['stop_step']:.0f} ({r['last_step']:.0f})" if "stop_step" in r else "fixed schedule"
            val = f"{r['validation_loss']:.1f}" if "validation_loss" in r else "—"
            d = f"{ctl[s]['safety_increase']:+.1f}" if s in ctl else "—"
            lines.append(f"| {label} | {s} | {stop} | {val} | {r['safety_loss']:.1f} | {r.get('grad_norm', math.nan):.3g}"
                         f" | {r.get('grad_dot_halves', math.nan):.3g} | {r.get('grad_split_cos', math.nan):+.2f} | {d} |")
        notes.append(f"- {label}: " + (f"control `{control}`: " + control_verdict([r["safety_increase"] for r in ctl.values()])
                                       if control else "no control task in this sweep (its first proxy among its tasks)"))
    return lines + [""] + notes


def coverage_table(est):
    """The scored share of each set's answer tokens (estimates.json 'coverage')."""
    lines = ["| set | examples | mean answer tokens | answer tokens scored | answers scored whole |", "|" + " --- |" * 5]
    for n, c in est.get("coverage", {}).items():
        lines.append(f"| {n} | {c['examples']} | {c['mean_answer_tokens']:.0f} | {c['answer_tokens_scored']:.0%} | "
                     f"{c['answers_whole']:.0%} |")
    return lines


def model_mismatch(sc, t0):
    """{proxy: ℓ on held-out D_s of θ_pre aligned on the proxy, minus θ_0's (seed 1)}: the model-based
    mismatch of THEORY.md §4 (None where its run is missing)."""
    out = {}
    for p in sc.proxies:
        path = os.path.join(sc.out_dir, "mismatch", analysis.short(p), "refusals.json")
        if os.path.exists(path) and t0 is not None:
            out[p] = json.load(open(path))["loss_on_original"] - t0["safety_loss"]
    return out


def mismatch_table(sc, est, t0):
    """The mismatch of each proxy, by bigram references and by models, and whether the same teacher is nearest."""
    models = model_mismatch(sc, t0)
    lines = ["| proxy D_s' | bigram mismatch [95%] (nats/seq) | on tokens (examples D_s / proxy) | model-based: ℓ_s of "
             "θ_pre aligned on it − ℓ_s(θ_0) |", "| --- | --- | --- | --- |"]
    for p, m in est["mismatch"].items():
        iv = m.get("interval")
        lines.append(f"| {p} | {m['mismatch']:.1f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else f" ± {m['sd']:.1f}")
                     + f" | {m.get('tokens', '—')} ({m.get('n_original', 0):.0f} / {m.get('n_proxy', 0):.0f}) | "
                     + (f"{models[p]:+.1f}" if p in models else "—") + " |")
    same, others = sc.proxies[0], sc.proxies[1:]
    b = est["mismatch"]
    order = all(b[same]["mismatch"] < b[o]["mismatch"] for o in others)
    apart = all(b[same].get("interval", [0, math.inf])[1] < b[o].get("interval", [-math.inf])[0] for o in others)
    line = (f"- bigram: the same teacher ({same}) is {'nearest' if order else '**not** nearest'}"
            + (", every interval apart" if order and apart else ", intervals overlapping" if order else ""))
    if len(models) == len(sc.proxies):
        line += (f"; model-based: {'nearest' if all(models[same] < models[o] for o in others) else '**not** nearest'}")
    return lines + ["", line]


def cost_table(sc, rows, est, prefix, seeds):
    """Per task of the plain fine-tunes: both forecasts beside the measured cost (the answer-aware one
    from each θ_0's answer_forecast.json, mean over seeds)."""
    v = analysis.forecast_validation(rows, est, sc.tasks, prefix)
    grads = {}
    for s in seeds:
        path = os.path.join(sc.out_dir, "theta0", f"{prefix}s{s}", "answer_forecast.json")
        if os.path.exists(path):
            for t, g in json.load(open(path))["tasks"].items():
                grads.setdefault(t, {})[s] = g
    return v, grads


def forecast_scores(v, grads):
    """Spearman's ρ of each forecast against the cost at matched gain, and sign accuracy against the
    sign of the measured Δℓ_s (the context-only forecast always predicts a cost), on seed means and
    per seed."""
    ts = [t for t in v["tasks"] if t in grads]
    if len(ts) < 3:
        return None
    aa = {t: float(np.mean([g["delta_ls_first_order"] for g in grads[t].values()])) for t in ts}
    ctx = {t: v["tasks"][t]["forecast"] for t in ts}
    matched = {t: v["tasks"][t]["matched"] for t in ts}
    cost = {t: v["tasks"][t]["cost"] for t in ts}
    out = {"n": len(ts), "rho_context": spearman([ctx[t] for t in ts], [matched[t] for t in ts]),
           "rho_answer": spearman([aa[t] for t in ts], [matched[t] for t in ts]),
           "sign_context": float(np.mean([cost[t] > 0 for t in ts])),
           "sign_answer": float(np.mean([(aa[t] > 0) == (cost[t] > 0) for t in ts])), "seeds": {}}
    for s in sorted(set.intersection(*(set(grads[t]) for t in ts), *(set(v["tasks"][t]["ratio_seeds"]) for t in ts))):
        per = [v["tasks"][t]["ratio_seeds"][s] for t in ts]
        out["seeds"][s] = {"rho_context": spearman([ctx[t] for t in ts], per),
                           "rho_answer": spearman([grads[t][s]["delta_ls_first_order"] for t in ts], per)}
    return out


def forecasts_table(sc, rows, est, arms):
    """The tasks with both forecasts and the measured cost, per arm; then each arm's scores."""
    lines = ["| arm | task | M (prompts) | context forecast (A2, λ=1) | grad cos at θ_0 [95%] | answer-aware Δℓ_s "
             "(first order) | measured Δℓ_s | ℓ_f gain | cost at matched gain |", "|" + " --- |" * 9]
    notes = []
    for label, prefix, seeds in arms:
        v, grads = cost_table(sc, rows, est, prefix, seeds)
        for t, e in v["tasks"].items():
            g = list(grads.get(t, {}).values())
            cos = (f"{np.mean([x['grad_cos'] for x in g]):+.2f} [{min(x['grad_cos_interval'][0] for x in g):+.2f}, "
                   f"{max(x['grad_cos_interval'][1] for x in g):+.2f}]") if g else "—"
            aa = f"{np.mean([x['delta_ls_first_order'] for x in g]):+.1f}" if g else "—"
            m = e["matched"]
            lines.append(f"| {label} | {t} | {est['overlap'][t]['M']:.3f} | {e['forecast']:.3f} | {cos} | {aa} | "
                         f"{e['cost']:+.1f} | {e['gain']:.1f} | " + (f"{m:+.1f}" if math.isfinite(m) else "+∞") + " |")
        sc_ = forecast_scores(v, grads)
        if sc_ is None:
            notes.append(f"- {label}: fewer than 3 tasks with both forecasts: not scored")
            continue
        per = sc_["seeds"].values()
        rng = lambda k: (f"{min(p[k] for p in per):+.2f} to {max(p[k] for p in per):+.2f}" if per else "—")
        notes.append(f"- {label}, {sc_['n']} tasks: Spearman ρ against the cost at matched gain: context-only "
                     f"**{sc_['rho_context']:+.2f}** (seeds alone {rng('rho_context')}), answer-aware "
                     f"**{sc_['rho_answer']:+.2f}** (seeds alone {rng('rho_answer')}); sign of Δℓ_s right: context-only "
                     f"{sc_['sign_context']:.0%} (it always forecasts a cost), answer-aware {sc_['sign_answer']:.0%}")
    return lines + [""] + notes


# a task shares most of its context mass with D_s (high overlap) when M = 1 − TV(μ_s, μ_f) ≥ this
HIGH_OVERLAP = 0.5


def measured_overlap(built, M, interval):
    """A task's overlap as measured: high where M's whole 95% interval is ≥ HIGH_OVERLAP, low where it
    is below, else the cell it was built for (its interval straddles the line)."""
    lo, hi = interval or (M, M)
    return "high" if lo >= HIGH_OVERLAP else "low" if hi < HIGH_OVERLAP else built


def cell_verdict(costs):
    """Mean cost at matched gain per cell, and whether high overlap with conflicting answers costs the most."""
    if len(costs) < 4:
        return f"{len(costs)} of 4 cells measured: not judged"
    means = {c: float(np.mean(x)) for c, x in costs.items()}
    top = max(means, key=means.get)
    return (", ".join(f"{o} overlap + {a} {means[(o, a)]:+.1f}" for o, a in sorted(means))
            + f". High overlap with conflicting answers costs the most: **{'yes' if top == ('high', 'conflict') else 'no'}**"
            + ("" if top == ("high", "conflict") else f" (the most: {top[0]} overlap + {top[1]})"))


def cells_table(sc, rows, est, arms, cells):
    """The paper's 2×2 (overlap × answer agreement): each cell's tasks, their M and grad cosine, and the
    cost at matched gain; the verdict on the paper's sentence (does high overlap with conflicting
    answers cost the most?) twice: by the cells the tasks were built for, and by each task's measured
    overlap (measured_overlap), which the reader should trust where the two differ."""
    lines = ["| arm | built as | measured overlap: M [95%] | answers | task | grad cos | cost at matched gain |",
             "|" + " --- |" * 7]
    notes, moved = [], set()
    for label, prefix, seeds in arms:
        v, grads = cost_table(sc, rows, est, prefix, seeds)
        built_cost, measured_cost = {}, {}
        for (ov, ans), tasks in cells.items():
            for t in tasks:
                if t not in v["tasks"]:
                    continue
                m, g, o = v["tasks"][t]["matched"], list(grads.get(t, {}).values()), est["overlap"][t]
                iv = o.get("M_interval")
                measured = measured_overlap(ov, o["M"], iv)
                if measured != ov:
                    moved.add(f"{t} (built as {ov} overlap, M {o['M']:.3f})")
                built_cost.setdefault((ov, ans), []).append(m)
                measured_cost.setdefault((measured, ans), []).append(m)
                lines.append(f"| {label} | {ov} | {measured}: {o['M']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
                             + f" | {ans} | {t} | " + (f"{np.mean([x['grad_cos'] for x in g]):+.2f}" if g else "—")
                             + " | " + (f"{m:+.1f}" if math.isfinite(m) else "+∞") + " |")
        notes.append(f"- {label}, by the cells the tasks were built for: mean cost at matched gain {cell_verdict(built_cost)}")
        if measured_cost.keys() != built_cost.keys() or any(sorted(measured_cost[c]) != sorted(built_cost[c])
                                                           for c in built_cost):
            notes.append(f"- {label}, by measured overlap: {cell_verdict(measured_cost)}")
    if moved:
        notes.append(f"- placed by their measured overlap (M's interval wholly on one side of {HIGH_OVERLAP:g}), not the "
                     "cell they were built for: " + ", ".join(sorted(moved)))
    return lines + [""] + notes


def assumption_sections(sc, recipe, rows, est, arms, cells):
    """The report's sections before its findings are read: θ_0, coverage, mismatch, the 2×2, forecasts.
    arms: [(label, run-id prefix, seeds)]."""
    control = sc.proxies[0] if sc.proxies[0] in sc.tasks else ""
    pre = [a for a in arms if a[1] == "pre-"]
    t0 = theta0_rows(sc, pre[0][1], (1,)).get(1) if pre else None
    md = ["", "**θ_0 at its optimum?** (THEORY.md §1 'θ_0 at the optimum'; the scratch arm is a control, never "
          "evidence for F1–F4: it learns language as much as it forgets)", "", *theta0_table(sc, rows, arms, control),
          "", f"**Answers scored** at block size {recipe.get('block_size')} (`textdata.answer_coverage`)", "",
          *coverage_table(est), "", "**Mismatch** of each proxy from D_s (THEORY.md §4), scored on D_s's held-out part "
          "on the span the model sees", "", *mismatch_table(sc, est, t0)]
    if cells:
        md += ["", "**The paper's 2×2**: context overlap with D_s × whether the answers agree with D_s's kind "
               "(`lab/presets.py` CELLS; the refusal cells are built by `realtext/loaders.py`)", "",
               *cells_table(sc, rows, est, arms, cells)]
    md += ["", "**Both forecasts against measurement** (plain fine-tunes; cost at matched gain as in the table above)",
           "", *forecasts_table(sc, rows, est, arms)]
    return md
