"""
The report of a finished sweep: means over seeds, the checks of findings F1–F6 (THEORY.md §5),
results.md and its tables, the README block of a preset's own report, one PNG per figure.

sweep.py calls write_report (presets smoke, paper) or write_report_real (real-cpu, real-gpu) once
every run is in results.csv; running a finished sweep's command again writes only the report.
"""

import json
import math
import os
import platform
import shutil

import numpy as np
import torch

import loaders
import theory
from common import atomic_write_text
from data import SyntheticWorld, WorldConfig

# -----------------------------------------------------------------------------
# Analysis: means over seeds and the checks of findings F1–F6; the names shared with sweep.py
# (which imports them), by which the report looks real runs up

# every real model (θ_0 too) is scored on these held-out sets; the report's refusal columns
REFUSAL_SETS = {"safety_llamas_eval": "harmful", "advbench": "harmful", "xstest_safe": "harmless",
                "rd_harmless_val": "harmless"}


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
    """Rows of one constraint and fixed settings grouped over seeds by the swept knob (λ or r): a list
    sorted by the knob of {x: the knob, n, and (mean, std) per metric}."""
    knob = "radius" if constraint == "param" else "lam"
    sel = [r for r in rows if r["constraint"] == constraint and all(abs(r[k] - v) < 1e-12 for k, v in fixed.items())]
    return [dict(seed_means([r for r in sel if r[knob] == x]), x=x) for x in sorted({r[knob] for r in sel})]


def mean(g, k):
    return g[k][0]


def real_groups(rows):
    """Seed means per run name (the run id without its seed), in the order of rows."""
    names = dict.fromkeys(r["run_id"].rsplit("-s", 1)[0] for r in rows)
    return {n: seed_means([r for r in rows if r["run_id"].rsplit("-s", 1)[0] == n]) for n in names}


def theta0_means(sc):
    """Seed means of the aligned models' refusal rates (refusals.json of each align task)."""
    return seed_means([json.load(open(os.path.join(sc.out_dir, "theta0", f"s{s}", "refusals.json"))) for s in sc.seeds])


def pareto_dominated(p, frontier):
    """Is the point p = (G_f, G_s) on or above the piecewise-linear curve through the points `frontier`
    (sorted by G_f)? Right of the curve's last point the curve goes on flat (G_s only falls as λ grows,
    so flat is the conservative extension). Left of its first point the curve was not measured: None,
    not comparable (both curves tend to G_f → 0 as λ → 0, and where one stops is a choice of the λ grid)."""
    xs, ys = [q[0] for q in frontier], [q[1] for q in frontier]
    if p[0] < xs[0]:
        return None
    return p[1] >= float(np.interp(p[0], xs, ys))


def check_findings(sc, rows):
    """Every finding of THEORY.md §5 on the synthetic world, each as (name, claim, verdict, numbers)
    decided on the seed means, in the order of results.md's table."""
    return [check(sc, rows) for check in (check_f4, check_f1, check_f2, check_f3, check_f5, check_f6)]


def check_f4(sc, rows):
    """THEORY.md §5 F4: in Case I, G_s falls and G_f rises with λ (every curve with overlap > 0)."""
    # At the optimum only the proxy gap G_s' must fall with λ in general; the original gap G_s
    # falls too on the synthetic world because it meets F4's condition (THEORY.md §5 F4): the
    # task's answers and the safety answers have disjoint supports on shared contexts
    curves = [(sc.overlap, d) for d in sc.mismatches] + [(k, sc.mismatch) for k in sc.overlaps]
    f4 = []
    for k, d in dict.fromkeys(curves):
        g = groups(rows, "loss", overlap=k, mismatch_delta=d)
        if k > 0 and len(g) > 1:
            gs, gf = [mean(e, "safety_gap") for e in g], [mean(e, "capability_gap") for e in g]
            ok = all(a > b for a, b in zip(gs, gs[1:])) and all(a < b for a, b in zip(gf, gf[1:]))
            f4.append((ok, f"κ={k:g}, δ={d:g}: G_s " + " > ".join(f"{v:.3f}" for v in gs)
                       + "; G_f " + " < ".join(f"{v:.3f}" for v in gf)))
    return ("F4", "Case I: raising λ lowers G_s and raises G_f, monotone in the seed means",
            all(ok for ok, _ in f4) and bool(f4), "<br>".join(s for _, s in f4))


def check_f1(sc, rows):
    """THEORY.md §5 F1: higher δ, higher G_s at every λ; at the largest, G_s near (A2)'s mismatch term."""
    by_d = {d: groups(rows, "loss", overlap=sc.overlap, mismatch_delta=d) for d in sorted(sc.mismatches)}
    lams = sorted(sc.lams)
    ordered = all(all(mean(by_d[a][i], "safety_gap") < mean(by_d[b][i], "safety_gap")
                      for a, b in zip(list(by_d), list(by_d)[1:])) for i in range(len(lams)))
    near, txt = True, []
    for d, g in by_d.items():
        top = g[-1]
        floor, gs = mean(top, "mismatch"), mean(top, "safety_gap")
        allowed = mean(top, "overlap_term") + sc.tol_abs + sc.tol_rel * mean(top, "optimum_safety_gap")
        near &= abs(gs - floor) <= allowed
        txt.append(f"δ={d:g}: G_s(λ={top['x']:g}) = {gs:.3f}, mismatch term {floor:.3f} (+ overlap term "
                   f"{mean(top, 'overlap_term'):.4f})")
    return ("F1", f"higher δ gives a higher G_s at every λ; at λ={lams[-1]:g} G_s is within the overlap term "
            f"+ tolerance of the mismatch term", ordered and near, "<br>".join(txt))


def check_f2(sc, rows):
    """THEORY.md §5 F2: lower κ, Pareto-better (G_f, G_s) curve; κ = 0: nothing beyond the mismatch floor."""
    by_k = {k: groups(rows, "loss", overlap=k, mismatch_delta=sc.mismatch) for k in sorted(sc.overlaps)}
    ks, txt = list(by_k), []
    for lo, hi in zip(ks, ks[1:]):
        curve = sorted((mean(e, "capability_gap"), mean(e, "safety_gap")) for e in by_k[lo])
        verdicts = [pareto_dominated((mean(e, "capability_gap"), mean(e, "safety_gap")), curve) for e in by_k[hi]]
        cmp = [v for v in verdicts if v is not None]
        left = len(verdicts) - len(cmp)
        txt.append((len(cmp) >= 2 and all(cmp),
                    f"κ={hi:g} vs κ={lo:g}: {sum(cmp)}/{len(cmp)} comparable points on or above"
                    + (f" ({left} left of the κ={lo:g} curve's G_f range: not comparable)" if left else "")))
    if 0.0 in by_k:
        worst_f = max(mean(e, "capability_gap") for e in by_k[0.0])
        worst_s = max(abs(mean(e, "safety_gap") - mean(e, "mismatch")) for e in by_k[0.0])
        txt.append((worst_f <= sc.tol_abs and worst_s <= sc.tol_abs, f"κ=0: G_f at most {worst_f:.4f}, G_s at most "
                    f"{worst_s:.4f} from the mismatch term (tolerance {sc.tol_abs:g})"))
    return ("F2", "lower κ gives a Pareto-better curve (every point of a higher-κ curve not left of the next lower-κ "
            "curve's measured G_f range, at least two, on or above it); κ = 0: G_f ≈ 0 and G_s ≈ the mismatch floor at "
            "every λ", bool(txt) and all(ok for ok, _ in txt), "<br>".join(t for _, t in txt))


def check_f3(sc, rows):
    """THEORY.md §5 F3: at equal G_s, Case II (param) ends with the larger G_f than Case I (loss)."""
    c1 = groups(rows, "loss", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    c2 = groups(rows, "param", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    pts2 = sorted((mean(e, "safety_gap"), mean(e, "capability_gap")) for e in c2)
    ratios = []
    for e in c1:
        gs, gf = mean(e, "safety_gap"), mean(e, "capability_gap")
        if pts2 and pts2[0][0] <= gs <= pts2[-1][0]:
            gf2 = float(np.interp(gs, [p[0] for p in pts2], [p[1] for p in pts2]))
            ratios.append((e["x"], gs, gf, gf2))
    return ("F3", "at equal G_s, Case II ends with the larger G_f (Case II curve interpolated between radii)",
            bool(ratios) and all(gf2 > gf for _, _, gf, gf2 in ratios),
            "<br>".join(f"G_s {gs:.3f}: Case I (λ={x:g}) G_f {gf:.3f}, Case II G_f {gf2:.3f}"
                        for x, gs, gf, gf2 in ratios) or "no Case I point inside the Case II G_s range")


def check_f5(sc, rows):
    """THEORY.md §5 F5: no run below the limit C of THEORY.md §2 (C), run by run."""
    margins = [r["C_lhs"] - r["C_limit"] for r in rows]
    worst = min(rows, key=lambda r: r["C_lhs"] - r["C_limit"])
    return ("F5", "no run has √G_s + √G_f below the limit C", all(m >= 0 for m in margins),
            f"{sum(m >= 0 for m in margins)}/{len(rows)} runs above C; smallest margin {min(margins):.4f} "
            f"({worst['run_id']}: {worst['C_lhs']:.4f} vs C {worst['C_limit']:.4f})")


def check_f6(sc, rows):
    """THEORY.md §5 F6: at small r, Δ_s within a factor of THEORY.md §3's prediction ∇ℓ_s·v + ½vᵀH_s v."""
    c2 = groups(rows, "param", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    small = [e for e in c2 if e["x"] <= sc.f6_small_radius]
    txt, ok = [], bool(small)
    for e in c2:
        ratio = mean(e, "measured_safety_increase") / mean(e, "second_order_prediction")
        if e["x"] <= sc.f6_small_radius:
            ok &= 1 / sc.f6_factor <= ratio <= sc.f6_factor
        txt.append(f"r={e['x']:g}: Δ_s {mean(e, 'measured_safety_increase'):.3g}, "
                   f"prediction {mean(e, 'second_order_prediction'):.3g}, ratio {ratio:.3g}")
    return ("F6", f"at r ≤ {sc.f6_small_radius:g} the measured Δ_s is within a factor {sc.f6_factor:g} of "
            "∇ℓ_s·v + ½vᵀH_s v", ok, "<br>".join(txt))


def check_findings_real(sc, rows, est):
    """THEORY.md §5 F1–F4 on real text, where the held-out losses ℓ_s, ℓ_f stand in for the gaps
    (no densities), and the aligned model's refusals; est: the estimates of THEORY.md §4."""
    res, g = [], real_groups(rows)
    name = lambda c, task=sc.task, **kw: real_run_id(c, task, **kw)
    ls = lambda n: mean(g[n], "safety_loss")
    lf = lambda n: mean(g[n], "capability_loss")
    # θ_0: refuses most held-out harmful prompts, answers most harmless ones
    t0 = theta0_means(sc)
    rates = {k: mean(t0, f"refusal_{k}") for k in REFUSAL_SETS}
    ok = all((rates[k] > 0.5) == (kind == "harmful") for k, kind in REFUSAL_SETS.items())
    res.append(("θ_0", "the aligned model refuses most harmful prompts and answers most harmless ones", ok,
                "<br>".join(f"{k} ({REFUSAL_SETS[k]}): refuses {rates[k]:.3f}" for k in REFUSAL_SETS)))
    # F1: the same-teacher proxy keeps ℓ_s lowest (Case I at lams[0]); None: not checkable
    lam0 = sc.lams[0]
    c1 = {p: name("loss", proxy=p, lam=lam0) for p in sc.proxies}
    same = c1[sc.proxies[0]]
    res.append(("F1", f"Case I (λ={lam0:g}): the same-teacher proxy {sc.proxies[0]} ends with a lower ℓ_s than every "
                f"other-teacher proxy", all(ls(same) < ls(n) for n in c1.values() if n != same) if len(c1) > 1 else None,
                "<br>".join(f"{p}: ℓ_s {fmt(g[n], 'safety_loss', 1)}, mismatch estimate "
                            f"{est['mismatch'][p]['mismatch']:.1f}" for p, n in c1.items())))
    # F2: higher overlap, larger ℓ_s increase under plain fine-tuning
    by_m = sorted(dict.fromkeys(sc.tasks), key=lambda t: -est["overlap"][t]["M"])
    inc = [mean(g[name("none", task=t)], "safety_increase") for t in by_m]
    res.append(("F2", "plain fine-tuning on a task of higher estimated overlap M raises ℓ_s more",
                all(a > b for a, b in zip(inc, inc[1:])) if len(inc) > 1 else None,
                "<br>".join(f"{t}: M {est['overlap'][t]['M']:.3f}, ℓ_s {fmt(g[name('none', task=t)], 'safety_increase', 1)}"
                            for t in by_m)))
    # F3: at equal ℓ_s, Case II ends with the larger ℓ_f (Case II interpolated between
    # radii), for every λ of the same-teacher proxy
    c2 = sorted((ls(name("param", radius=r)), lf(name("param", radius=r))) for r in sc.radii)
    verdicts, txt = [], []
    for lam in sorted(sc.lams):
        n = name("loss", proxy=sc.proxies[0], lam=lam)
        s1, f1 = ls(n), lf(n)
        if c2[0][0] <= s1 <= c2[-1][0]:
            f2 = float(np.interp(s1, [p[0] for p in c2], [p[1] for p in c2]))
            ok, how = f1 < f2, f"Case II at the same ℓ_s (interpolated): ℓ_f {f2:.1f}"
        else:
            # outside the radii's ℓ_s range there is no Case II point at equal ℓ_s: decided
            # only when one run beats the nearest end of the Case II curve on both losses
            end = c2[0] if s1 < c2[0][0] else c2[-1]
            ok = True if (s1 <= end[0] and f1 < end[1]) else False if (s1 >= end[0] and f1 > end[1]) else None
            how = (f"{'safer' if s1 < end[0] else 'less safe'} than every Case II run; the nearest (ℓ_s "
                   f"{end[0]:.1f}) has ℓ_f {end[1]:.1f}" + (": not comparable" if ok is None else ""))
        verdicts.append(ok)
        txt.append(f"Case I λ={lam:g}: ℓ_s {s1:.1f}, ℓ_f {f1:.1f}; {how}")
    decided = [v for v in verdicts if v is not None]
    res.append(("F3", f"at equal ℓ_s, Case II (r ∈ {{{', '.join(f'{r:g}' for r in sc.radii)}}}) ends with a higher ℓ_f "
                f"than Case I ({sc.proxies[0]})", all(decided) if decided else None, "<br>".join(txt)))
    # F4: raising λ lowers ℓ_s and raises ℓ_f (on real text F4's condition for ℓ_s cannot be verified)
    ns = [name("loss", proxy=sc.proxies[0], lam=lam) for lam in sorted(sc.lams)]
    res.append(("F4", "Case I: raising λ lowers ℓ_s and raises ℓ_f",
                all(ls(a) > ls(b) and lf(a) < lf(b) for a, b in zip(ns, ns[1:])) if len(ns) > 1 else None,
                "<br>".join(f"λ={lam:g}: ℓ_s {ls(n):.1f}, ℓ_f {lf(n):.1f}" for lam, n in zip(sorted(sc.lams), ns))
                + ("" if len(ns) > 1 else " (one λ in this sweep: not checked)")))
    return res


# -----------------------------------------------------------------------------
# results.md: its tables and text, and the README block of a preset's own report

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
VERDICT = {True: "yes", False: "**no**", None: "not checked"}


def fmt(e, k, digits=3, kind="f"):
    """mean ± standard deviation over seeds of metric k of a group."""
    if k not in e:
        return ""
    m, s = e[k]
    if not math.isfinite(m):
        return "∞"
    return f"{m:.{digits}{kind}} ± {s:.{digits}{kind}}" if e["n"] > 1 else f"{m:.{digits}{kind}}"


def val(e, k, digits=3):
    """The mean alone."""
    return fmt(dict(e, n=1), k, digits)


def opening(sc, recipe, rows, state, what, more, title, findings):
    """results.md's first lines: do not edit; the sweep, recipe, time, machine, `more`; the findings table."""
    return [f"<!-- generated by `python sweep.py --preset {sc.preset}`; do not edit by hand -->",
            f"Sweep `{sc.preset}`{what}: {len(rows)} fine-tunes over seeds {', '.join(map(str, sc.seeds))} "
            f"({len(sc.seeds)} θ_0), train recipe `{json.dumps(recipe)}`; wall time {state['wall_seconds'] / 60:.1f} "
            f"min over {state['invocations']} invocation(s) with {sc.jobs} jobs × {sc.threads} thread(s) on "
            f"{os.cpu_count()} CPU cores ({platform.machine()}, torch {torch.__version__}){more}",
            "", title, "", "| finding | claim | reproduced | numbers |", "| --- | --- | --- | --- |",
            *(f"| {n} | {claim} | {VERDICT[ok]} | {nums} |" for n, claim, ok, nums in findings)]


def case1_table(sc, rows):
    """Case I runs against the exact optimum P*_λ and the bounds A2, B2 (THEORY.md §2)."""
    lines = ["| κ | δ | λ | seeds | G_s measured | G_s(P*) | A2 bound | mismatch floor | G_f measured | G_f(P*) | "
             "B2 bound | runs within tolerance |", "|" + " --- |" * 12]
    worlds = dict.fromkeys([(sc.overlap, d) for d in sorted(sc.mismatches)]
                           + [(k, sc.mismatch) for k in sorted(sc.overlaps)])
    for k, d in worlds:
        for e in groups(rows, "loss", overlap=k, mismatch_delta=d):
            within = sum(bool(r["case1_within_tolerance"]) for r in e["rows"])
            lines.append(f"| {k:g} | {d:g} | {e['x']:g} | {e['n']} | {fmt(e, 'safety_gap')} | "
                         f"{val(e, 'optimum_safety_gap')} | {val(e, 'A2_safety_bound')} | {val(e, 'mismatch')} | "
                         f"{fmt(e, 'capability_gap')} | {val(e, 'optimum_capability_gap')} | "
                         f"{val(e, 'B2_capability_bound')} | {within}/{e['n']} |")
    return "\n".join(lines)


def case2_table(sc, rows):
    """Case II runs against the second-order prediction, bound D (THEORY.md §3) and C (§2)."""
    lines = ["| r | seeds | G_s measured | G_f measured | Δ_s measured | ∇ℓ_s·v + ½vᵀH_s v | ratio | bound D | "
             "√G_s+√G_f | C |", "|" + " --- |" * 10]
    for e in groups(rows, "none", overlap=sc.overlap, mismatch_delta=sc.mismatch):
        lines.append(f"| ∞ (none) | {e['n']} | {fmt(e, 'safety_gap')} | {fmt(e, 'capability_gap')} | "
                     f"{fmt(e, 'measured_safety_increase')} | | | | {val(e, 'C_lhs')} | {val(e, 'C_limit')} |")
    for e in groups(rows, "param", overlap=sc.overlap, mismatch_delta=sc.mismatch):
        ratio = mean(e, "measured_safety_increase") / mean(e, "second_order_prediction")
        lines.append(f"| {e['x']:g} | {e['n']} | {fmt(e, 'safety_gap')} | {fmt(e, 'capability_gap')} | "
                     f"{fmt(e, 'measured_safety_increase', 2, 'g')} | {fmt(e, 'second_order_prediction', 2, 'g')} | "
                     f"{ratio:.3g} | {val(e, 'D_bound')} | {val(e, 'C_lhs')} | {val(e, 'C_limit')} |")
    return "\n".join(lines)


def publish(sc, md, home=None, readme=README):
    """Write results.md; for a preset's own report (report_dir is home, the preset's results/<preset>), also
    its tables into README.md between <!-- sweep:PRESET:begin/end -->: the README's numbers are generated."""
    atomic_write_text(os.path.join(sc.report_dir, "results.md"), md)
    begin, end = f"<!-- sweep:{sc.preset}:begin -->", f"<!-- sweep:{sc.preset}:end -->"
    published = home is not None and os.path.abspath(home) == os.path.abspath(sc.report_dir)
    if published and os.path.exists(readme):
        text = open(readme, encoding="utf-8").read()
        if begin in text and end in text:
            body = md.split("\n", 1)[1]  # without the do-not-edit comment of results.md
            text = text[:text.index(begin) + len(begin)] + "\n" + body.strip() + "\n" + text[text.index(end):]
            atomic_write_text(readme, text)


def finish_report(sc, md, findings, plots, home=None):
    """Name the plots, publish results.md (and the README block), copy results.csv beside it, print the findings."""
    md = md + ["Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in plots), ""]
    publish(sc, "\n".join(md), home)
    if os.path.abspath(sc.report_dir) != os.path.abspath(sc.out_dir):
        shutil.copyfile(os.path.join(sc.out_dir, "results.csv"), os.path.join(sc.report_dir, "results.csv"))
    print("\n".join(md[4:5 + len(findings) + 2]))
    print(f"report: {os.path.join(sc.report_dir, 'results.md')} and {len(plots)} plots")


def write_report(sc, recipe, rows, state, home=None):
    """results.md and the five plots of a synthetic sweep (presets smoke, paper); home: see publish."""
    os.makedirs(sc.report_dir, exist_ok=True)
    lam_dense, exact = exact_curves(sc, {k: recipe[k] for k in ("n_symbols", "ctx_len", "n_harmful") if k in recipe})
    plots = [fig_gap_vs_lambda(sc, rows, lam_dense, exact), fig_overlap_tradeoff(sc, rows, lam_dense, exact),
             fig_case1_vs_case2(sc, rows), fig_limit_c(sc, rows), fig_radius_second_order(sc, rows)]
    findings = check_findings(sc, rows)
    c1 = [r for r in rows if r["constraint"] == "loss"]
    within = sum(bool(r["case1_within_tolerance"]) for r in c1)
    def extremes(k):  # the smallest and largest excess G − G(P*) over the Case I runs, with their runs
        lo, hi = min(c1, key=lambda r: r[k]), max(c1, key=lambda r: r[k])
        return f"{lo[k]:+.3f} ({lo['run_id']}) to {hi[k]:+.3f} ({hi['run_id']})"
    land = [r["hessian_top_eig_s"] for r in rows if r.get("hessian_top_eig_s") is not None]
    # CPU time of every task, when every task recorded it: on a shared machine the wall
    # time says as much about the neighbours as about the sweep
    aligns = [os.path.join(sc.out_dir, "theta0", f"s{s}", "landscape.json") for s in sc.seeds]
    cpu = [r.get("cpu_seconds") for r in rows] + [json.load(open(p)).get("cpu_seconds") for p in aligns]
    cpu_text = (f"; CPU time {sum(cpu) / 60:.1f} min in all ({sum(cpu) / 60 / sc.jobs:.1f} min per job)"
                if all(isinstance(c, float) for c in cpu) else "")
    md = opening(sc, recipe, rows, state, "", f"{cpu_text}. Gaps in nats per sequence, mean ± standard deviation "
                 "over seeds.", "**Findings (THEORY.md §5), checked by `sweep.py` on the seed means**", findings)
    md += ["", f"**Case I against the exact optimum P*_λ** (THEORY.md §2). A run reaches the optimum when both gaps "
           f"are within {sc.tol_abs:g} nats + {sc.tol_rel:.0%} of the optimum's: {within}/{len(c1)} runs do. "
           f"G_s − G_s(P*) ranges from {extremes('case1_safety_excess')}, G_f − G_f(P*) from "
           f"{extremes('case1_capability_excess')}; every run's excess is in results.csv and its theory.json. A1 and "
           f"B1 are ∞ here: on shared contexts the task and safety answers have disjoint supports, so A2 and B2 are "
           f"the informative bounds (and the optimum attains them).", "", case1_table(sc, rows), "",
           f"**Case II against the second-order prediction** (THEORY.md §3) at κ = {sc.overlap:g}, δ = {sc.mismatch:g}; "
           f"λ_max(H_s) at θ_0 = {np.mean(land) if land else float('nan'):.3g} (mean over seeds).", "",
           case2_table(sc, rows), ""]
    finish_report(sc, md, findings, plots, home)


def write_report_real(sc, recipe, rows, state, home=None):
    """results.md and the three plots of a real-text sweep (presets real-cpu, real-gpu); home: see publish."""
    os.makedirs(sc.report_dir, exist_ok=True)
    est = json.load(open(os.path.join(sc.out_dir, "estimates", "estimates.json")))
    findings = check_findings_real(sc, rows, est)
    g = real_groups(rows)
    plots = [fig_real_tradeoff(sc, rows, g), fig_real_overlap(sc, g, est), fig_real_refusals(sc, g)]
    t0 = theta0_means(sc)
    cpu = [r["cpu_seconds"] for r in rows] + [r["cpu_seconds"] for r in t0["rows"]]
    sets = list(REFUSAL_SETS)
    md = opening(sc, recipe, rows, state, " on real text", f"; CPU time {sum(cpu) / 60:.1f} min in all. "
                 f"Losses are held-out estimates in nats per sequence (response tokens), mean ± sd over seeds; "
                 f"ℓ_f is on each run's own task. Refusal rates: greedy, {sc.refusal_tokens} new tokens, the first "
                 f"{sc.refusal_limit} prompts of each set, GCG's keyword test (README 'Real data').",
                 "**Findings (THEORY.md §5) on the held-out losses, checked by `sweep.py` on the seed means**", findings)
    md += ["", f"**Estimates** (THEORY.md §4; `estimators.real_overlap`, `estimators.real_mismatch` at 64 examples per "
           f"reference, computed in {est['seconds']:.0f} s)", "", "| set | role | estimate |", "| --- | --- | --- |"]
    md += [f"| {t} | task D_f | overlap M {o['M']:.3f}, lexical {o['lexical']:.3f} |" for t, o in est["overlap"].items()]
    md += [f"| {p} | proxy D_s' | mismatch {m['mismatch']:.1f} ± {m['sd']:.1f} |" for p, m in est["mismatch"].items()]
    md += ["", "**Every run** (mean ± sd over seeds; refusal rates of the harmful sets, then the harmless ones)", "",
           "| run | seeds | ℓ_s | ℓ_f | ℓ_s − ℓ_s(θ_0) | ‖θ−θ_0‖ | " + " | ".join(f"refuses {k}" for k in sets) + " |",
           "|" + " --- |" * (6 + len(sets))]
    base = g[real_run_id("none", sc.task)]  # one row per seed
    md.append(f"| θ_0 | {t0['n']} | {fmt(base, 'aligned_safety_loss', 1)} | {fmt(base, 'aligned_capability_loss', 1)} "
              f"({short(sc.task)}) | | 0 | " + " | ".join(fmt(t0, f'refusal_{k}') for k in sets) + " |")
    for n, e in g.items():
        md.append(f"| {n} | {e['n']} | {fmt(e, 'safety_loss', 1)} | {fmt(e, 'capability_loss', 1)} | "
                  f"{fmt(e, 'safety_increase', 1)} | {fmt(e, 'distance', 2)} | "
                  + " | ".join(fmt(e, f'refusal_{k}') for k in sets) + " |")
    finish_report(sc, [*md, ""], findings, plots, home)


# -----------------------------------------------------------------------------
# Figures: one function per figure, each returns its PNG's path


def figure(*grid, **kw):
    """plt.subplots and the colour cycle, on the file-only Agg backend (imported only to draw a report)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*grid, **kw)
    return fig, axes, plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(fig, sc, name, *legends):
    """fig as report_dir/name, with a legend on each axes of legends; returns the path."""
    import matplotlib.pyplot as plt
    for ax in legends:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path := os.path.join(sc.report_dir, name), dpi=90)
    plt.close(fig)
    return path


def errorbar(ax, g, xk, yk, **kw):
    """Seed means of metric yk against metric xk (None: the knob λ or r) of groups g, ±1 sd."""
    x = [e["x"] if xk is None else mean(e, xk) for e in g]
    xerr = None if xk is None else [e[xk][1] for e in g]
    ax.errorbar(x, [mean(e, yk) for e in g], yerr=[e[yk][1] for e in g], xerr=xerr, capsize=3, **kw)


def exact_curves(sc, world_shape):
    """A dense λ grid around sc.lams, and exact(κ, δ, key): the exact Case I quantity key (THEORY.md §2:
    the optimum's gaps, bounds A2, B2) along it, once per world of shape world_shape (n_symbols, ...)."""
    lam_dense = np.logspace(np.log10(min(sc.lams)) - 0.3, np.log10(max(sc.lams)) + 0.3, 40)
    curves = {}

    def exact(k, d, key):
        if (k, d) not in curves:
            world = SyntheticWorld(WorldConfig(overlap=k, mismatch=d, **world_shape))
            curves[k, d] = [theory.world_case_one(world, lam) for lam in lam_dense]
        return np.array([c[key] for c in curves[k, d]])
    return lam_dense, exact


def fig_gap_vs_lambda(sc, rows, lam_dense, exact):
    """G_s and G_f against λ, one curve per δ, with A2/B2 and the mismatch floor (F1, F4)."""
    fig, (a1, a2), colors = figure(1, 2, figsize=(10, 4))
    for i, d in enumerate(sorted(sc.mismatches)):
        g, c = groups(rows, "loss", overlap=sc.overlap, mismatch_delta=d), colors[i % len(colors)]
        errorbar(a1, g, None, "safety_gap", color=c, marker="o", ls="none", label=f"measured, δ={d:g}")
        a1.plot(lam_dense, exact(sc.overlap, d, "A2_safety_bound"), color=c, lw=1,
                label="A2 bound (= G_s(P*) here)" if i == 0 else None)
        if mean(g[0], "mismatch") > 0:  # δ = 0 has no floor to draw on a log axis
            a1.axhline(mean(g[0], "mismatch"), color=c, ls=":", lw=1,
                       label="mismatch floor E KL(P_s‖P_s')" if i == len(sc.mismatches) - 1 else None)
        errorbar(a2, g, None, "capability_gap", color=c, marker="o", ls="none", label=f"measured, δ={d:g}")
        a2.plot(lam_dense, exact(sc.overlap, d, "B2_capability_bound"), color=c, lw=1,
                label="B2 bound (= G_f(P*) here)" if i == 0 else None)
    a1.set(xscale="log", yscale="log", xlabel="λ", ylabel="safety gap G_s (nats)",
           title=f"F1/F4: safety gap vs λ (κ={sc.overlap:g})")
    a2.set(xscale="log", yscale="log", xlabel="λ", ylabel="capability gap G_f (nats)", title="F4: capability gap vs λ")
    a1.legend(fontsize=6)
    return save_figure(fig, sc, "fig1_gap_vs_lambda.png", a2)


def fig_overlap_tradeoff(sc, rows, lam_dense, exact):
    """(G_f, G_s) trade-off curves, measured and exact, one per κ (F2)."""
    fig, ax, colors = figure(figsize=(6, 4.5))
    for i, k in enumerate(sorted(sc.overlaps)):
        g, c = groups(rows, "loss", overlap=k, mismatch_delta=sc.mismatch), colors[i % len(colors)]
        errorbar(ax, g, "capability_gap", "safety_gap", color=c, marker="o", ls="-", lw=0.8, label=f"measured, κ={k:g}")
        xs, ys = exact(k, sc.mismatch, "optimum_capability_gap"), exact(k, sc.mismatch, "optimum_safety_gap")
        # κ = 0: the optimum is one point (G_f 0, the floor) whatever λ
        ax.plot(xs, ys, color=c, ls="--", lw=1, marker="D" if np.ptp(xs) == 0 else None,
                label=f"exact optimum P*_λ, κ={k:g}")
    ax.axhline(mean(g[0], "mismatch"), color="gray", ls=":", lw=1, label="mismatch floor")
    ax.set(xlabel="capability gap G_f (nats)", ylabel="safety gap G_s (nats)",
           title=f"F2: lower overlap κ, better trade-off (δ={sc.mismatch:g}, λ ∈ {{{', '.join(f'{v:g}' for v in sc.lams)}}})")
    ax.title.set_fontsize(8)
    return save_figure(fig, sc, "fig2_overlap_tradeoff.png", ax)


def fig_case1_vs_case2(sc, rows):
    """Case I and Case II frontiers on one plot, with θ_0 and the unconstrained run (F3)."""
    fig, ax, _ = figure(figsize=(6, 4.5))
    c1 = groups(rows, "loss", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    c2 = groups(rows, "param", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    errorbar(ax, c1, "capability_gap", "safety_gap", marker="o", label="Case I (loss), λ grid")
    errorbar(ax, c2, "capability_gap", "safety_gap", marker="s", label="Case II (param), r grid")
    for knob, g in (("λ", c1), ("r", c2)):
        for e in g:
            ax.annotate(f"{knob}={e['x']:g}", (mean(e, "capability_gap"), mean(e, "safety_gap")), fontsize=6)
    for e in groups(rows, "none", overlap=sc.overlap, mismatch_delta=sc.mismatch):
        ax.errorbar(mean(e, "capability_gap"), mean(e, "safety_gap"), marker="x", color="k", ls="none",
                    label="no constraint")
        ax.errorbar(mean(e, "aligned_capability_gap"), mean(e, "aligned_safety_gap"), marker="*", color="k",
                    ls="none", label="θ_0 (aligned)")
    ax.set(xscale="log", yscale="log", xlabel="capability gap G_f (nats)", ylabel="safety gap G_s (nats)",
           title=f"F3: Case I vs Case II (κ={sc.overlap:g}, δ={sc.mismatch:g})")
    return save_figure(fig, sc, "fig3_case1_vs_case2.png", ax)


def fig_limit_c(sc, rows):
    """√G_s + √G_f of every run against the limit C of THEORY.md §2 (C) (F5)."""
    fig, ax, colors = figure(figsize=(6, 4.5))
    rng = np.random.default_rng(0)
    for i, con in enumerate(("loss", "param", "none")):
        sel = [r for r in rows if r["constraint"] == con]
        if sel:
            x = np.array([r["C_limit"] for r in sel]) + rng.uniform(-0.015, 0.015, len(sel))  # jitter: κ repeats
            ax.scatter(x, [r["C_lhs"] for r in sel], s=12, color=colors[i], label=f"{con} runs")
    lim = max(r["C_limit"] for r in rows) * 1.1 + 0.05
    ax.fill_between([0, lim], [0, lim], color="red", alpha=0.1, label="below the limit: impossible")
    ax.plot([0, lim], [0, lim], color="k", lw=1, label="√G_s + √G_f = C")
    ax.set(xlim=(-0.05, lim), ylim=(0, None), xlabel="C = √(2/M)·Σ m·TV (THEORY.md (C))",
           ylabel="√G_s + √G_f of the run", title="F5: every run against the fundamental limit C")
    return save_figure(fig, sc, "fig4_limit_C.png", ax)


def fig_radius_second_order(sc, rows):
    """Measured Δ_s against r, with the second-order prediction and bound D (THEORY.md §3), and their ratio (F6)."""
    c2 = groups(rows, "param", overlap=sc.overlap, mismatch_delta=sc.mismatch)
    fig, (a1, a2), _ = figure(1, 2, figsize=(10, 4))
    errorbar(a1, c2, None, "measured_safety_increase", marker="o", label="measured Δ_s = ℓ_s(θ_r) − ℓ_s(θ_0)")
    errorbar(a1, c2, None, "second_order_prediction", marker="s", label="∇ℓ_s·v + ½vᵀH_s v along v = θ_r − θ_0")
    a1.plot([e["x"] for e in c2], [mean(e, "D_bound") for e in c2], color="gray", ls="--",
            label="bound D: ‖∇ℓ_s‖r + ½λ_max r²")
    # symlog: at the smallest r the first-order term can make both slightly negative
    a1.set(xscale="log", xlabel="radius r", ylabel="safety loss increase (nats)",
           title="F6: safety cost of Case II against the landscape")
    a1.set_yscale("symlog", linthresh=1e-5)
    a1.legend(fontsize=7)
    # the ratio of the seed means, as F6 checks it (a per-seed ratio explodes where one
    # seed's prediction is near zero), and each seed's ratio where it is positive
    a2.plot([e["x"] for e in c2], [mean(e, "measured_safety_increase") / mean(e, "second_order_prediction")
                                   for e in c2], marker="o", label="ratio of the seed means")
    for e in c2:
        per_seed = [r["measured_safety_increase"] / r["second_order_prediction"] for r in e["rows"]]
        a2.scatter([e["x"]] * len(per_seed), [v if v > 0 else np.nan for v in per_seed], s=8, color="gray")
    a2.axhline(1, color="k", lw=1)
    a2.axhspan(1 / sc.f6_factor, sc.f6_factor, color="green", alpha=0.1, label=f"within factor {sc.f6_factor:g}")
    a2.axvline(sc.f6_small_radius, color="gray", ls=":", lw=1, label="small-r limit of the check")
    a2.set(xscale="log", yscale="log", xlabel="radius r", ylabel="measured / predicted",
           title="F6: ratio of measured to second-order prediction")
    return save_figure(fig, sc, "fig5_radius_second_order.png", a2)


def fig_real_tradeoff(sc, rows, g):
    """(ℓ_f, ℓ_s) of θ_0, the plain, Case I and Case II runs on sc.task (F1, F3, F4)."""
    fig, ax, colors = figure(figsize=(6.5, 4.5))
    a = seed_means([r for r in rows if r["task"] == sc.task])
    ax.errorbar([mean(a, "aligned_capability_loss")], [mean(a, "aligned_safety_loss")], fmt="k*", ms=12, label="θ_0")
    errorbar(ax, [g[real_run_id("none", sc.task)]], "capability_loss", "safety_loss", label="no constraint", fmt="kx", ms=9)
    for i, p in enumerate(sc.proxies):
        es = sorted((e for e in g.values() if e["rows"][0]["constraint"] == "loss" and e["rows"][0]["proxy"] == p),
                    key=lambda e: e["rows"][0]["lam"])
        errorbar(ax, es, "capability_loss", "safety_loss", label=f"Case I, proxy {p}" + (" (same teacher)" if i == 0 else ""),
                 fmt="o-" if len(es) > 1 else "o", color=colors[i % len(colors)])
        for e in es:
            ax.annotate(f"λ={e['rows'][0]['lam']:g}", (mean(e, "capability_loss"), mean(e, "safety_loss")), fontsize=7)
    es = [g[real_run_id("param", sc.task, radius=r)] for r in sorted(sc.radii)]
    errorbar(ax, es, "capability_loss", "safety_loss", label="Case II", fmt="s--", color="gray")
    for r, e in zip(sorted(sc.radii), es):
        ax.annotate(f"r={r:g}", (mean(e, "capability_loss"), mean(e, "safety_loss")), fontsize=7)
    ax.set(xlabel=f"task loss ℓ_f on held-out {sc.task} (nats/seq)", ylabel="safety loss ℓ_s on held-out D_s (nats/seq)",
           title="F1, F3, F4 on real text: lower-left is better")
    return save_figure(fig, sc, "fig1_real_tradeoff.png", ax)


def fig_real_overlap(sc, g, est):
    """The ℓ_s increase of plain fine-tuning against each task's estimated overlap M (F2)."""
    fig, ax, colors = figure(figsize=(5.5, 4))
    for i, t in enumerate(dict.fromkeys(sc.tasks)):
        e = g[real_run_id("none", t)]
        ax.errorbar([est["overlap"][t]["M"]], [mean(e, "safety_increase")], yerr=[e["safety_increase"][1]], fmt="o",
                    capsize=3, color=colors[i % len(colors)], label=t)
    ax.set(xlabel="estimated context overlap M with D_s", ylabel="ℓ_s(θ) − ℓ_s(θ_0) (nats/seq)",
           title="F2 on real text: plain fine-tuning per task")
    return save_figure(fig, sc, "fig2_real_overlap.png", ax)


def fig_real_refusals(sc, g):
    """Refusal rates of every model (θ_0 first) on each of REFUSAL_SETS."""
    models = {"θ_0": theta0_means(sc), **g}
    fig, ax, colors = figure(figsize=(max(7, 0.7 * len(models)), 4.5))
    w = 0.8 / len(REFUSAL_SETS)
    for j, (k, kind) in enumerate(REFUSAL_SETS.items()):
        ax.bar(np.arange(len(models)) + j * w, [mean(e, f"refusal_{k}") for e in models.values()], w,
               yerr=[e[f"refusal_{k}"][1] for e in models.values()], capsize=2, label=f"{k} ({kind})",
               color=colors[j % len(colors)])
    ax.set_xticks(np.arange(len(models)) + 0.4 - w / 2, list(models), rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="refusal rate", ylim=(0, 1), title="Refusals (greedy; keyword test)")
    return save_figure(fig, sc, "fig3_real_refusals.png", ax)
