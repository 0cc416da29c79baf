"""
The report of the paper's own experiment on real text (arm P; presets paper-real-cpu,
paper-real-gpu): D_s = GPT-4 answers to general instructions, a same-teacher proxy against
other teachers' answers, a general-instruction task against a code task, each θ_0 aligned
from scratch or from θ_pre (train.py --stage pretrain). The findings of THEORY.md §5 are
judged as the paper states them, per arm, on seed means, and again seed by seed:

    F1  at λ = proxy_lam, the same-teacher proxy keeps ℓ_s lowest, per task
    F2  the safety cost ℓ_s − ℓ_s(θ_0) at matched capability gain ℓ_f(θ_0) − ℓ_f, interpolated
        linearly between the points of each task's Case I curve (θ_0, λ = 0 i.e. plain
        fine-tuning, and every λ), taken in order of their gain, is higher for the task of higher
        estimated overlap
    F3  at equal ℓ_s, Case I ends with the lower ℓ_f (report.case1_beats_case2), per task
    F4  raising λ lowers the proxy's training loss and raises ℓ_f (a theorem at the optimum);
        on ℓ_s only under THEORY.md §5's condition, which real text does not let us verify

Losses are held-out estimates in nats per sequence (THEORY.md §1).
"""

import json
import os

import numpy as np

from lab import analysis, figures, report_checks
from lab.presets import PRESETS
from lab.analysis import case_tasks, mean, real_groups, real_run_id
from lab.report import case1_beats_case2, finish_report, fmt, forecast_table, opening


def arm_names(sc):
    """(arm, its run-id prefix) of each starting point of the sweep."""
    return [("scratch" if init == "scratch" else "θ_pre", prefix) for init, _, prefix in analysis.arms(sc)]


def name(prefix, constraint, task, **kw):
    return prefix + real_run_id(constraint, task, **kw)


def case1_curve(sc, g, prefix, task):
    """[(λ, capability gain, safety cost, group)] of plain fine-tuning (λ = 0) and Case I with the
    same-teacher proxy, sorted by λ."""
    pts = [(0.0, g[name(prefix, "none", task)])]
    pts += [(lam, g[name(prefix, "loss", task, proxy=sc.proxies[0], lam=lam)]) for lam in sorted(sc.lams)]
    return [(lam, mean(e, "capability_gain"), mean(e, "safety_increase"), e) for lam, e in pts]


def cost_at_gain(curve, gain):
    """The safety cost at a capability gain, linear between the curve's points (θ_0 is (0, 0))."""
    pts = sorted([(0.0, 0.0)] + [(c[1], c[2]) for c in curve])
    return float(np.interp(gain, [p[0] for p in pts], [p[1] for p in pts]))


def check_arm(sc, rows, est, prefix):
    """[(finding, claim, verdict, numbers)] of one arm on the seed means of rows."""
    g = real_groups(rows)
    ls = lambda n: mean(g[n], "safety_loss")
    lf = lambda n: mean(g[n], "capability_loss")
    tasks = sorted(case_tasks(sc), key=lambda t: -est["overlap"][t]["M"])  # high overlap first
    lam1 = sc.proxy_lam or sc.lams[0]
    out = []
    for t in tasks:  # F1 per task: every proxy at λ = lam1
        c1 = {p: name(prefix, "loss", t, proxy=p, lam=lam1) for p in sc.proxies}
        same = c1[sc.proxies[0]]
        out.append(("F1", f"{t}, λ={lam1:g}: the same-teacher proxy {sc.proxies[0]} keeps ℓ_s below every other proxy",
                    all(ls(same) < ls(n) for p, n in c1.items() if n != same) if len(c1) > 1 else None,
                    "<br>".join(f"{p}: ℓ_s {fmt(g[n], 'safety_loss', 1)} (mismatch estimate "
                                f"{est['mismatch'][p]['mismatch']:.1f})" for p, n in c1.items())))
    curves = {t: case1_curve(sc, g, prefix, t) for t in tasks}
    top = min(max(c[1] for c in curves[t]) for t in tasks)  # the largest gain every curve reaches
    levels = [top * q for q in (1 / 3, 2 / 3, 1.0)] if top > 0 else []
    costs = {t: [cost_at_gain(curves[t], x) for x in levels] for t in tasks}
    out.append(("F2", f"at matched capability gain, the task of higher overlap ({tasks[0]}) pays the larger safety "
                f"cost ℓ_s − ℓ_s(θ_0) than {tasks[-1]}",
                all(a > b for a, b in zip(costs[tasks[0]], costs[tasks[-1]])) if levels and len(tasks) > 1 else None,
                "<br>".join(f"gain {x:.1f}: " + ", ".join(f"{t} {costs[t][i]:+.1f}" for t in tasks)
                            for i, x in enumerate(levels)) + "<br>" + ", ".join(
                    f"{t}: M {est['overlap'][t]['M']:.3f}" for t in tasks)))
    for t in tasks:  # F3 per task: Case II's curve from θ_0 through the radii to plain fine-tuning
        plain = name(prefix, "none", t)
        c2 = sorted([(mean(g[plain], "aligned_safety_loss"), mean(g[plain], "aligned_capability_loss")),
                     (ls(plain), lf(plain))] + [(ls(n), lf(n)) for n in (name(prefix, "param", t, radius=r)
                                                                        for r in sc.radii)])
        res = []
        for lam in sorted(sc.lams):
            n = name(prefix, "loss", t, proxy=sc.proxies[0], lam=lam)
            ok, how = case1_beats_case2(ls(n), lf(n), c2)
            res.append((ok, f"λ={lam:g}: ℓ_s {ls(n):.1f}, ℓ_f {lf(n):.1f}; {how}"))
        decided = [ok for ok, _ in res if ok is not None]
        out.append(("F3", f"{t}: at equal ℓ_s, Case I ends with a lower ℓ_f than Case II",
                    all(decided) if decided else None, "<br>".join(txt for _, txt in res)))
    for t in tasks:  # F4 per task along λ, plain fine-tuning (λ = 0) included
        lams = [c[0] for c in curves[t]]
        pt, fl, sl = ([mean(c[3], k) for c in curves[t]] for k in ("proxy_train_loss", "capability_loss", "safety_loss"))
        out.append(("F4", f"{t}: raising λ lowers the proxy's training loss and raises ℓ_f",
                    all(a >= b for a, b in zip(pt, pt[1:])) and all(a <= b for a, b in zip(fl, fl[1:])),
                    "<br>".join(f"λ={lam:g}: proxy {p:.1f}, ℓ_f {f:.1f}" for lam, p, f in zip(lams, pt, fl))))
        out.append(("F4 (ℓ_s)", f"{t}: raising λ lowers ℓ_s (needs THEORY.md §5's condition, unverifiable here)",
                    all(a >= b for a, b in zip(sl, sl[1:])),
                    "<br>".join(f"λ={lam:g}: ℓ_s {v:.1f}" for lam, v in zip(lams, sl))))
    return out


def findings(sc, rows, est):
    """Every arm's checks on seed means, with the number of seeds in which each holds on its own."""
    res = []
    for arm, prefix in arm_names(sc):
        mine = analysis.arm_rows(rows, prefix)
        seeds = sorted({int(r["seed"]) for r in mine})
        per_seed = [check_arm(sc, [r for r in mine if int(r["seed"]) == s], est, prefix) for s in seeds]
        for i, (f, claim, ok, nums) in enumerate(check_arm(sc, mine, est, prefix)):
            agree = sum(ps[i][2] is True for ps in per_seed)
            res.append((f"{f}, {arm}", claim, ok, f"{nums}<br>holds in {agree} of {len(seeds)} seeds alone"))
    return res


def start_table(sc, rows):
    """θ_pre against its corpus's unigram entropy; θ_0 of each arm (acceptance of the pretraining stage)."""
    lines = []
    pre = os.path.join(sc.out_dir, "pretrain", "pretrain.json")
    if os.path.exists(pre):
        p = json.load(open(pre))
        lines += [f"**θ_pre** ({p['train_tokens']:,} training tokens of {len(p['documents'])} sources, "
                  f"{p['dropped_instructions']:,} instructions dropped because a later set holds their prompt; "
                  f"{p['unk_share']:.1%} of its tokens outside the runs' vocabulary, UNK): held-out general text "
                  f"**{p['general_loss']:.3f} nats/token** against the corpus's unigram entropy "
                  f"{p['unigram_entropy']:.3f} (a model that ignores context); trained in "
                  f"{p['cpu_seconds'] / 60:.1f} CPU-min.", ""]
    lines += ["θ_0 of each arm after the same alignment recipe:", "", "| θ_0 from | seeds | held-out ℓ_s of θ_0 | " + " | ".join(f"ℓ_f(θ_0) on {t}" for t in case_tasks(sc))
              + " |", "|" + " --- |" * (3 + len(case_tasks(sc)))]
    for arm, prefix in arm_names(sc):
        es = {t: analysis.seed_means([r for r in rows if r["run_id"] in {
            name(prefix, "none", t, seed=s) for s in set(sc.seeds) | set(sc.scratch_seeds)}]) for t in case_tasks(sc)}
        first = es[case_tasks(sc)[0]]
        lines.append(f"| {arm} | {first['n']} | {fmt(first, 'aligned_safety_loss', 1)} | "
                     + " | ".join(fmt(es[t], "aligned_capability_loss", 1) for t in case_tasks(sc)) + " |")
    return lines


def f4_table(sc, g):
    """Against λ: the proxy's training and held-out losses, held-out ℓ_s and ℓ_f, proxy epochs."""
    lines = ["| arm | task | λ | proxy train loss | proxy held-out loss | ℓ_s (held-out D_s) | ℓ_f | proxy epochs |",
             "|" + " --- |" * 8]
    for arm, prefix in arm_names(sc):
        for t in case_tasks(sc):
            for lam, _, _, e in case1_curve(sc, g, prefix, t):
                held = fmt(e, "proxy_heldout_loss", 1) if e["rows"][0].get("proxy_heldout_loss") is not None else "—"
                lines.append(f"| {arm} | {t} | {lam:g} | {fmt(e, 'proxy_train_loss', 1)} | {held} | "
                             f"{fmt(e, 'safety_loss', 1)} | {fmt(e, 'capability_loss', 1)} | "
                             f"{mean(e, 'proxy_epochs'):.1f} |")
    return lines


def write_report(sc, recipe, rows, state, home=None):
    """results.md, the trade-off plot and (for a preset's own report) the README block of arm P."""
    os.makedirs(sc.report_dir, exist_ok=True)
    est = json.load(open(os.path.join(sc.out_dir, "estimates", "estimates.json")))
    res = findings(sc, rows, est)
    g = real_groups(rows)
    curves = {(arm, t): case1_curve(sc, g, p, t) for arm, p in arm_names(sc) for t in case_tasks(sc)}
    plots = [figures.fig_paper_real(sc, g, arm_names(sc), curves)]
    n0 = sum(len(sc.scratch_seeds or sc.seeds) if a == "scratch" else len(sc.seeds) for a, _ in arm_names(sc))
    md = opening(sc, recipe, rows, state, " on real text, the paper's roles (arm P)",
                 f"; CPU time {sum(r['cpu_seconds'] for r in rows) / 60:.1f} min in fine-tunes. D_s: "
                 f"{recipe['safety_data']}; proxies {', '.join(sc.proxies)} (same teacher first); held-out losses in "
                 f"nats per sequence, mean ± sd over seeds.", "**Findings (THEORY.md §5), per arm, on seed means**",
                 res, n_theta0=n0)
    arms = [(label, prefix, seeds) for (label, prefix), (_, seeds, _) in zip(arm_names(sc), analysis.arms(sc))]
    md += report_checks.assumption_sections(sc, recipe, rows, est, arms, PRESETS.get(sc.preset, {}).get("cells"))
    md += ["", "**Starting points**", "", *start_table(sc, rows), "",
           "**F4 in detail**: Case I with the same-teacher proxy against λ (λ = 0: plain fine-tuning). The proxy's "
           "held-out part is the held-out part of its file, here D_s's own (one file split three ways), so for the "
           "same-teacher proxy that column is ℓ_s; proxy epochs: passes over its training part.", "",
           *f4_table(sc, g), "", "**Forecast against measurement**: the overlap of each task with D_s forecast from "
           f"prompts alone (`python -m lab.forecast --safety {recipe['safety_data']} --task NAME ...`), beside the "
           "safety cost its plain fine-tuning paid at matched capability gain (linear between θ_0 and the run's end); "
           "rank 1 is the largest. A task θ_pre was pretrained on is fine-tuned from scratch only.", "",
           *forecast_table(sc, rows, est, arm_names(sc)), "", "**Every run** (mean ± sd over seeds)", "",
           "| run | seeds | ℓ_s | ℓ_f | ℓ_s − ℓ_s(θ_0) | ℓ_f(θ_0) − ℓ_f | ‖θ−θ_0‖ |", "|" + " --- |" * 7]
    md += [f"| {n} | {e['n']} | {fmt(e, 'safety_loss', 1)} | {fmt(e, 'capability_loss', 1)} | "
           f"{fmt(e, 'safety_increase', 1)} | {fmt(e, 'capability_gain', 1)} | {fmt(e, 'distance', 2)} |"
           for n, e in g.items()]
    finish_report(sc, [*md, ""], res, plots, home)
