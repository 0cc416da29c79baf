"""
The report of a finished sweep: means over seeds, the checks of findings F1–F6 (THEORY.md §5),
results.md and its tables, the README block of a preset's own report, one PNG per figure.

sweep.py calls write_report (presets smoke, paper), write_report_strategies (strategies) or
write_report_real (real-cpu, real-gpu) once every run is in results.csv; running a finished sweep's command again writes only the report.
"""

import json
import math
import os
import platform
import shutil

import numpy as np
import torch

from common import DataError, atomic_write_text
from constraints import STRATEGIES
from lab import analysis, figures, report_checks
from lab.analysis import MARGIN_SETS, REFUSAL_SETS, groups, mean, real_groups, real_run_id
from lab.presets import PRESETS
from lab.refusals import prompt_coverage
from model import load_checkpoint
from realtext.textdata import codec_of, dataset_part

# -----------------------------------------------------------------------------
# The checks of findings F1–F6 on the seed means (analysis.py)

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
    return [*check_f4(sc, rows), *(check(sc, rows) for check in (check_f1, check_f2, check_f3, check_f5, check_f6))]


def check_f4(sc, rows):
    """THEORY.md §5 F4 on every Case I curve with overlap > 0: raising λ lowers the proxy gap G_s' and
    raises G_f (a theorem at the optimum); and it lowers G_s, which THEORY.md §5 implies only where its
    condition holds on the world (theory.f4_condition ≤ 1), so G_s is judged there only."""
    curves = [(sc.overlap, d) for d in sc.mismatches] + [(k, sc.mismatch) for k in sc.overlaps]
    proxy, orig = [], []
    for k, d in dict.fromkeys(curves):
        g = groups(rows, "loss", overlap=k, mismatch_delta=d)
        if k == 0 or len(g) < 2:
            continue
        gsp, gs, gf = ([mean(e, key) for e in g] for key in ("proxy_gap", "safety_gap", "capability_gap"))
        where = f"κ={k:g}, δ={d:g}: "
        proxy.append((all(a > b for a, b in zip(gsp, gsp[1:])) and all(a < b for a, b in zip(gf, gf[1:])),
                      where + "G_s' " + " > ".join(f"{v:.3f}" for v in gsp) + "; G_f " + " < ".join(f"{v:.3f}" for v in gf)))
        cond = mean(g[0], "f4_condition") if "f4_condition" in g[0] else None
        falls = all(a > b for a, b in zip(gs, gs[1:]))
        text = where + "G_s " + ", ".join(f"{v:.3f}" for v in gs)
        if cond is None:
            orig.append((None, text + " (condition not recorded: `sweep.py --refresh`)"))
        else:
            holds = cond <= 1 + 1e-9  # = 1 exactly where P_s' = P_s: Σ over supp P_s of P_f, up to rounding
            orig.append((falls if holds else None, text + f"; condition max Σ_y P_s P_f/P_s' = {cond:.3f}"
                         + ("" if holds else " > 1: not implied, not judged")))
    decided = [ok for ok, _ in orig if ok is not None]
    return [("F4", "Case I: raising λ lowers the proxy gap G_s' and raises G_f, monotone in the seed means",
             all(ok for ok, _ in proxy) and bool(proxy), "<br>".join(t for _, t in proxy)),
            ("F4 (G_s)", "Case I: raising λ lowers G_s too, judged where THEORY.md §5's condition holds on the world "
             "(Σ_y P_s P_f/P_s' ≤ 1 on every shared context)", all(decided) if decided else None,
             "<br>".join(t for _, t in orig))]


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
    return ("F5", "check of the implementation, true of every model by mathematics (not a finding): no run has "
            "√G_s + √G_f below the limit C", all(m >= 0 for m in margins),
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
            "∇ℓ_s·v + ½vᵀH_s v (Taylor's theorem at small r: a check of the gradient and HVP code; the claim about "
            "basins is landscape.py's)", ok, "<br>".join(txt))


def case1_beats_case2(s1, f1, c2):
    """F3 for one Case I run (ℓ_s s1, ℓ_f f1) against the Case II curve c2, [(ℓ_s, ℓ_f)] sorted by
    ℓ_s: does Case I end with the lower ℓ_f at equal ℓ_s? (verdict or None, the numbers as text)."""
    if c2[0][0] <= s1 <= c2[-1][0]:
        f2 = float(np.interp(s1, [p[0] for p in c2], [p[1] for p in c2]))
        return f1 < f2, f"Case II at the same ℓ_s (interpolated): ℓ_f {f2:.1f}"
    # outside the radii's ℓ_s range there is no Case II point at equal ℓ_s: decided
    # only when one run beats the nearest end of the Case II curve on both losses
    end = c2[0] if s1 < c2[0][0] else c2[-1]
    ok = True if (s1 <= end[0] and f1 < end[1]) else False if (s1 >= end[0] and f1 > end[1]) else None
    return ok, (f"{'safer' if s1 < end[0] else 'less safe'} than every Case II run; the nearest (ℓ_s "
                f"{end[0]:.1f}) has ℓ_f {end[1]:.1f}" + (": not comparable" if ok is None else ""))


def theta0_behaves(rates, unread, sets=REFUSAL_SETS):
    """Does θ_0 refuse most harmful prompts and answer most harmless ones readably? rates, unread: per
    refusal set, its refusal rate and its share of unreadable responses (neither refusal nor answer)."""
    return all(rates[k] > 0.5 if kind == "harmful" else 1 - rates[k] - unread[k] > 0.5 for k, kind in sets.items())


def check_findings_real(sc, rows, est, prefix="", seeds=None):
    """THEORY.md §5 F1–F4 on real text, where the held-out losses ℓ_s, ℓ_f stand in for the gaps
    (no densities), and the aligned model's refusals; est: the estimates of THEORY.md §4. prefix, seeds:
    the arm (analysis.arms) whose runs are checked."""
    res, g = [], real_groups(rows)
    name = lambda c, task=sc.task, **kw: prefix + real_run_id(c, task, **kw)
    ls = lambda n: mean(g[n], "safety_loss")
    lf = lambda n: mean(g[n], "capability_loss")
    # θ_0: refuses most held-out harmful prompts, answers most harmless ones readably: an unreadable response
    # (empty or mostly UNK, lab/refusals.py) is no answer, so it counts for neither
    t0 = analysis.theta0_means(sc, prefix, seeds)
    rates = {k: mean(t0, f"refusal_{k}") for k in REFUSAL_SETS}
    unread = {k: mean(t0, f"refusal_{k}_unreadable") if f"refusal_{k}_unreadable" in t0 else 0.0 for k in REFUSAL_SETS}
    ok = theta0_behaves(rates, unread)
    res.append(("θ_0", "the aligned model refuses most harmful prompts and answers most harmless ones readably", ok,
                "<br>".join(f"{k} ({REFUSAL_SETS[k]}): refuses {rates[k]:.3f}, unreadable {unread[k]:.3f}"
                            for k in REFUSAL_SETS)))
    # F1: the same-teacher proxy keeps ℓ_s lowest (Case I at lams[0]); None: not checkable
    lam0 = sc.proxy_lam or sc.lams[0]
    c1 = {p: name("loss", proxy=p, lam=lam0) for p in sc.proxies}
    same = c1[sc.proxies[0]]
    res.append(("F1", f"Case I (λ={lam0:g}): the same-teacher proxy {sc.proxies[0]} ends with a lower ℓ_s than every "
                f"other-teacher proxy", all(ls(same) < ls(n) for n in c1.values() if n != same) if len(c1) > 1 else None,
                "<br>".join(f"{p}: ℓ_s {fmt(g[n], 'safety_loss', 1)}, mismatch estimate "
                            f"{est['mismatch'][p]['mismatch']:.1f}" for p, n in c1.items())))
    # F2: higher overlap, larger ℓ_s increase under plain fine-tuning
    planned = [t for t in dict.fromkeys(sc.tasks) if name("none", task=t) in g]  # θ_pre's own corpus sets are not
    by_m = sorted(planned, key=lambda t: -est["overlap"][t]["M"])
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
        ok, how = case1_beats_case2(s1, f1, c2)
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

VERDICT = {True: "yes", False: "**no**", None: "not checked"}


def fmt(e, k, digits=3, kind="f"):
    """mean ± standard deviation over seeds of metric k of a group."""
    if k not in e:
        return ""
    m, s = e[k]
    if not math.isfinite(m):
        return "∞"
    return f"{m:.{digits}{kind}} ± {s:.{digits}{kind}}" if e["n"] > 1 else f"{m:.{digits}{kind}}"


def refusal_cell(e, k):
    """A refusal rate, mean ± sd over seeds, with its mean unreadable share (absent in rows measured before
    unreadable responses were counted apart: shown as '?')."""
    u = e.get(f"refusal_{k}_unreadable")
    return f"{fmt(e, f'refusal_{k}')} ({u[0]:.2f})" if u else f"{fmt(e, f'refusal_{k}')} (?)"


def refusal_coverage(sc, arms, sets, t0s):
    """One line: the share of each refusal set's prompt tokens that each arm's compact vocabulary holds
    (the rest every model of the arm reads as UNK): as its θ_0s recorded it, else measured now from the
    arm's first θ_0 and the data folder it names, else '?'."""
    parts = []
    for init, seeds, prefix in arms:
        cov = {k: t0s[prefix][f"refusal_{k}_coverage"][0] for k in sets if f"refusal_{k}_coverage" in t0s[prefix]}
        path = os.path.join(sc.out_dir, "theta0", f"{prefix}s{seeds[0]}", "theta0.pt")
        if len(cov) < len(sets) and os.path.exists(path):
            ckpt = load_checkpoint(path)
            try:
                cov = {k: prompt_coverage(codec_of(ckpt), dataset_part(k, ckpt["world_config"].get("data_dir", ""))
                                          .prompts[:sc.refusal_limit]) for k in sets}
            except DataError:
                pass
        parts.append(f"θ_0{' from ' + init if len(arms) > 1 else ''}: "
                     + ", ".join(f"{k} " + (f"{cov[k]:.1%}" if k in cov else "?") for k in sets))
    return ["Vocabulary coverage of the refusal sets' prompt tokens (the rest is UNK): " + "; ".join(parts)]


def val(e, k, digits=3):
    """The mean alone."""
    return fmt(dict(e, n=1), k, digits)


def opening(sc, recipe, rows, state, what, more, title, findings, n_theta0=None):
    """results.md's first lines: do not edit; the sweep, recipe, time, machine, `more`; the findings table."""
    return [f"<!-- generated by `python -m lab.sweep --preset {sc.preset}`; do not edit by hand -->",
            f"Sweep `{sc.preset}`{what}: {len(rows)} fine-tunes over seeds {', '.join(map(str, sc.seeds))} "
            f"({n_theta0 or len(sc.seeds)} θ_0), train recipe `{json.dumps(recipe)}`; wall time {state['wall_seconds'] / 60:.1f} "
            f"min over {state['invocations']} invocation(s) with {sc.jobs} jobs × {sc.threads} thread(s) on "
            f"{os.cpu_count()} CPU cores ({platform.machine()}, torch {torch.__version__}){more}",
            "", title, "", "| finding | claim | reproduced | numbers |", "| --- | --- | --- | --- |",
            *(f"| {n} | {claim} | {VERDICT[ok]} | {nums} |" for n, claim, ok, nums in findings)]


def case1_table(sc, rows):
    """Case I runs against the exact optimum P*_λ and the bounds A2, B2 (THEORY.md §2)."""
    lines = ["| κ | δ | λ | seeds | G_s measured | G_s(P*) | A1 bound | A2 bound | mismatch floor | G_f measured | "
             "G_f(P*) | B1 bound | B2 bound | runs within tolerance |", "|" + " --- |" * 14]
    worlds = dict.fromkeys([(sc.overlap, d) for d in sorted(sc.mismatches)]
                           + [(k, sc.mismatch) for k in sorted(sc.overlaps)])
    for k, d in worlds:
        for e in groups(rows, "loss", overlap=k, mismatch_delta=d):
            within = sum(bool(r["case1_within_tolerance"]) for r in e["rows"])
            lines.append(f"| {k:g} | {d:g} | {e['x']:g} | {e['n']} | {fmt(e, 'safety_gap')} | "
                         f"{val(e, 'optimum_safety_gap')} | {val(e, 'A1_safety_bound')} | {val(e, 'A2_safety_bound')} | "
                         f"{val(e, 'mismatch')} | {fmt(e, 'capability_gap')} | {val(e, 'optimum_capability_gap')} | "
                         f"{val(e, 'B1_capability_bound')} | {val(e, 'B2_capability_bound')} | {within}/{e['n']} |")
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


def bounds_text(c1):
    """What the bounds of THEORY.md §2 say at the exact optimum of each Case I setting (κ, δ, λ)."""
    settings = list({(r["overlap"], r["mismatch_delta"], r["lam"]): r for r in c1}.values())
    holds = sum(r["optimum_safety_gap"] <= min(r["A1_safety_bound"], r["A2_safety_bound"]) + 1e-9
                and r["optimum_capability_gap"] <= min(r["B1_capability_bound"], r["B2_capability_bound"]) + 1e-9
                for r in settings)
    finite = sum(math.isfinite(r["A1_safety_bound"]) and math.isfinite(r["B1_capability_bound"]) for r in settings)
    a1 = sum(r["A1_safety_bound"] < r["A2_safety_bound"] for r in settings)
    tight = sum(abs(r["A2_safety_bound"] - r["optimum_safety_gap"]) < 1e-9 for r in settings)
    text = (f"At the exact optimum every bound holds in {holds} of {len(settings)} settings (κ, δ, λ); A1 and B1 "
            f"are finite in {finite}, A1 < A2 in {a1}, and A2 is attained (G_s(P*) = A2) in {tight}.")
    if not finite:
        text += (" A1 and B1 are ∞ here: on shared contexts the task and safety answers have disjoint supports, so "
                 "A2 and B2 are the informative bounds (`--answer_overlap` makes them share support).")
    return text


def strategies_table(sc, rows):
    """Every strategy at (κ, δ) along its sweep parameter: the gaps, ‖θ − θ_0‖ and the safety
    loss it cost, Δ_s (THEORY.md §2–§3)."""
    lines = ["| strategy | sweep value | seeds | G_s | G_f | ‖θ−θ_0‖ | Δ_s measured |", "|" + " --- |" * 7]
    for name, s in STRATEGIES.items():
        for e in groups(rows, name, overlap=sc.overlap, mismatch_delta=sc.mismatch):
            knob = f"{s.sweep_param} = {e['x']:g}" if s.sweep_param else ""
            lines.append(f"| {name} | {knob} | {e['n']} | {fmt(e, 'safety_gap')} | {fmt(e, 'capability_gap')} | "
                         f"{fmt(e, 'distance', 2)} | {fmt(e, 'measured_safety_increase', 2, 'g')} |")
    return "\n".join(lines)


def at_equal_safety(g, G_s):
    """G_f of a strategy's curve (groups g: seed means along its sweep) at safety gap G_s, by linear
    interpolation between the runs on either side in G_s; None outside the G_s range its runs measured."""
    pts = sorted((mean(e, "safety_gap"), mean(e, "capability_gap")) for e in g)
    if len(pts) < 2 or not pts[0][0] <= G_s <= pts[-1][0]:
        return None
    return float(np.interp(G_s, [p[0] for p in pts], [p[1] for p in pts]))


SAFETY_LEVELS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # G_s at which strategies are compared (nats)


def equal_safety_table(sc, rows, levels=SAFETY_LEVELS):
    """G_f of every swept strategy at each safety gap of levels (THEORY.md §5 F3: the capability a
    strategy keeps for the same safety); '—' where a strategy's runs do not reach that G_s."""
    curves = {n: groups(rows, n, overlap=sc.overlap, mismatch_delta=sc.mismatch) for n in STRATEGIES}
    curves = {n: g for n, g in curves.items() if len(g) >= 2}
    lines = ["| G_s | " + " | ".join(f"G_f of {n}" for n in curves) + " |", "|" + " --- |" * (len(curves) + 1)]
    for G_s in levels:
        cells = [at_equal_safety(g, G_s) for g in curves.values()]
        lines.append(f"| {G_s:g} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def publish(sc, md, home=None):
    """Write results.md; for a preset's own report (report_dir is home, the preset's results/<preset>),
    also its tables into that folder's README.md, between <!-- sweep:PRESET:begin/end -->, so that
    the numbers beside the preset's narrative are generated. The top-level README is never written."""
    atomic_write_text(os.path.join(sc.report_dir, "results.md"), md)
    begin, end = f"<!-- sweep:{sc.preset}:begin -->", f"<!-- sweep:{sc.preset}:end -->"
    readme = os.path.join(sc.report_dir, "README.md")
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
    lam_dense, exact = figures.exact_curves(sc, {k: recipe[k] for k in ("n_symbols", "ctx_len", "n_harmful") if k in recipe})
    plots = [figures.fig_gap_vs_lambda(sc, rows, lam_dense, exact), figures.fig_overlap_tradeoff(sc, rows, lam_dense, exact),
             figures.fig_case1_vs_case2(sc, rows), figures.fig_limit_c(sc, rows), figures.fig_radius_second_order(sc, rows)]
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
           f"{extremes('case1_capability_excess')}; every run's excess is in results.csv and its theory.json. "
           f"{bounds_text(c1)} Check of the implementation, true of every model because P*_λ minimises the "
           f"Case I objective (not a finding): the objective excess (G_f + λG_s') − (G_f + λG_s')(P*_λ) is at least "
           f"{min(r['case1_objective_excess'] for r in c1):+.4f} over the {len(c1)} runs (≥ 0 expected).", "",
           case1_table(sc, rows), "",
           f"**Case II against the second-order prediction** (THEORY.md §3) at κ = {sc.overlap:g}, δ = {sc.mismatch:g}; "
           f"λ_max(H_s) at θ_0 = {np.mean(land) if land else float('nan'):.3g} (mean over seeds).", "",
           case2_table(sc, rows), ""]
    if any(r["constraint"] not in ("none", "loss", "param") for r in rows):
        md += [f"**Every strategy** at κ = {sc.overlap:g}, δ = {sc.mismatch:g} (constraints.STRATEGIES)", "",
               strategies_table(sc, rows), ""]
    finish_report(sc, md, findings, plots, home)


def write_report_strategies(sc, recipe, rows, state, home=None):
    """results.md and one plot of the strategies preset: every strategy of the registry at one world
    (κ, δ), compared at equal safety; F5 is a check of the implementation."""
    os.makedirs(sc.report_dir, exist_ok=True)
    plots = [figures.fig_strategies(sc, rows)]
    findings = [check_f5(sc, rows)]
    md = opening(sc, recipe, rows, state, "", ". Gaps in nats per sequence, mean ± standard deviation over seeds.",
                 "**Check of the implementation (THEORY.md §5 F5: true of every model)**", findings)
    md += ["", f"**Capability at equal safety** (κ = {sc.overlap:g}, δ = {sc.mismatch:g}): G_f of each strategy's curve "
           "at fixed safety gaps, interpolated linearly in G_s between its two runs on either side (seed means "
           "along its sweep); '—' where its runs do not reach that G_s.", "",
           equal_safety_table(sc, rows), "", "**Every run**, mean ± sd over seeds", "", strategies_table(sc, rows), ""]
    finish_report(sc, md, findings, plots, home)


def forecast_table(sc, rows, est, arms, lam=1.0):
    """The forecast (lab.forecast, from prompts alone) beside the measured safety cost at matched
    capability gain (analysis.forecast_validation), per arm [(label, run-id prefix)], with Spearman's ρ."""
    lines = ["| arm | task | TV calibrated [95%] | TV raw | M | forecast: (A2) term λ=1 | predicted rank | ℓ_f gain | "
             "ℓ_s − ℓ_s(θ_0) | cost at matched gain g* | measured rank |", "|" + " --- |" * 11]
    notes = []
    for label, prefix in arms:
        v = analysis.forecast_validation(rows, est, sc.tasks, prefix, lam)
        ts = v["tasks"]
        pred = sorted(ts, key=lambda t: -ts[t]["forecast"])
        meas = sorted(ts, key=lambda t: -ts[t]["matched"])
        for t in pred:
            o, e = est["overlap"][t], ts[t]
            lines.append(f"| {label} | {t} | {o['tv']:.3f} [{o['tv_interval'][0]:.3f}, {o['tv_interval'][1]:.3f}] | "
                         f"{o['tv_uncalibrated']:.3f} | {o['M']:.3f} | {e['forecast']:.3f} | {pred.index(t) + 1} | "
                         f"{e['gain']:.1f} | {e['cost']:+.1f} | "
                         + (f"{e['matched']:+.1f}" if math.isfinite(e["matched"]) else "+∞ (no gain)")
                         + f" | {meas.index(t) + 1} |")
        rs = [r for r in v["rho_seeds"].values() if math.isfinite(r)]
        notes.append(f"{label}: {len(ts)} tasks, g* = {v.get('g_star', float('nan')):.1f} nats; Spearman ρ(forecast, "
                     f"matched cost) = **{v['rho']:+.2f}** on seed means, "
                     + (f"{min(rs):+.2f} to {max(rs):+.2f} over {len(rs)} seeds alone" if rs else "no seed alone")
                     + (f"; paid safety for no held-out gain (cost +∞ per nat): {', '.join(v['no_gain'])}"
                        if v["no_gain"] else "")
                     + (f"; neither gained nor paid, left out: {', '.join(v['left_out'])}" if v["left_out"] else ""))
    return lines + [""] + [f"- {n}" for n in notes]


def write_report_real(sc, recipe, rows, state, home=None):
    """results.md and the three plots of a real-text sweep (presets real-cpu, real-gpu); home: see publish."""
    os.makedirs(sc.report_dir, exist_ok=True)
    est = json.load(open(os.path.join(sc.out_dir, "estimates", "estimates.json")))
    arms = analysis.arms(sc)
    label = {"scratch": "", "pretrain": " (θ_0 from θ_pre)"}
    findings = [(f + (label[init] if len(arms) > 1 else ""), claim, ok, nums) for init, seeds, prefix in arms
                for f, claim, ok, nums in check_findings_real(sc, rows, est, prefix, seeds)]
    g = real_groups(rows)
    first, g1 = analysis.arm_rows(rows, arms[0][2]), real_groups(analysis.arm_rows(rows, arms[0][2]))  # plots 1–2
    plots = [figures.fig_real_tradeoff(sc, first, g1, arms[0][2]), figures.fig_real_overlap(sc, g1, est, arms[0][2]),
             figures.fig_real_refusals(sc, g, arms)]
    t0s = {prefix: analysis.theta0_means(sc, prefix, seeds) for _, seeds, prefix in arms}
    cpu = [r["cpu_seconds"] for r in rows] + [r["cpu_seconds"] for t0 in t0s.values() for r in t0["rows"]]
    sets = list(REFUSAL_SETS)
    md = opening(sc, recipe, rows, state, " on real text", f"; CPU time {sum(cpu) / 60:.1f} min in all. "
                 f"Losses are held-out estimates in nats per sequence (response tokens), mean ± sd over seeds; "
                 f"ℓ_f is on each run's own task. Refusal rates: greedy, {sc.refusal_tokens} new tokens, the first "
                 f"{sc.refusal_limit} prompts of each set, GCG's keyword test (README 'Real data').",
                 "**Findings (THEORY.md §5) on the held-out losses, checked by `sweep.py` on the seed means**", findings,
                 n_theta0=sum(len(seeds) for _, seeds, _ in arms))
    md += report_checks.assumption_sections(sc, recipe, rows, est, [(init, prefix, seeds) for init, seeds, prefix in arms],
                                            PRESETS.get(sc.preset, {}).get("cells"))
    md += ["", f"**Forecast against measurement**: the overlap of each task with D_s forecast from prompts alone "
           f"(`python -m lab.forecast --safety {recipe['safety_data']} --task NAME ...`, computed with the proxies' "
           f"mismatch in {est['seconds']:.0f} s), beside the safety cost its plain fine-tuning paid at matched capability "
           f"gain (linear between θ_0 and the run's end); rank 1 is the largest.", "",
           *forecast_table(sc, rows, est, [(init if len(arms) > 1 else "θ_0", prefix) for init, _, prefix in arms]),
           ]
    margins = [k for k in MARGIN_SETS if any(f"margin_{k}" in r for r in rows)]
    md += ["", "**Every run** (mean ± sd over seeds; refusal rates of the harmful sets, then the harmless ones, each "
           "with the share of its responses that are unreadable, empty or mostly UNK: neither refusals nor "
           f"compliance (`lab.refusals.refusal_rate`); the refusal margin log P(refusal opening | x) − log "
           "P(compliant opening | x) in nats, `lab.refusals.refusal_margin`)", "", *refusal_coverage(sc, arms, sets, t0s),
           "", "| run | seeds | ℓ_s | ℓ_f | ℓ_s − ℓ_s(θ_0) | ‖θ−θ_0‖ | "
           + " | ".join(f"refuses {k} (unreadable)" for k in sets)
           + "".join(f" | margin {k}" for k in margins) + " |", "|" + " --- |" * (6 + len(sets) + len(margins))]
    for init, _, prefix in arms:
        base, t0 = g[prefix + real_run_id("none", sc.task)], t0s[prefix]  # one row per seed
        md.append(f"| θ_0{label[init]} | {t0['n']} | {fmt(base, 'aligned_safety_loss', 1)} | "
                  f"{fmt(base, 'aligned_capability_loss', 1)} ({analysis.short(sc.task)}) | | 0 | "
                  + " | ".join(refusal_cell(t0, k) for k in sets) + "".join(f" | {fmt(t0, f'margin_{k}', 2)}"
                                                                              for k in margins) + " |")
    for n, e in g.items():
        md.append(f"| {n} | {e['n']} | {fmt(e, 'safety_loss', 1)} | {fmt(e, 'capability_loss', 1)} | "
                  f"{fmt(e, 'safety_increase', 1)} | {fmt(e, 'distance', 2)} | "
                  + " | ".join(refusal_cell(e, k) for k in sets) + "".join(f" | {fmt(e, f'margin_{k}', 2)}"
                                                                              for k in margins) + " |")
    finish_report(sc, [*md, ""], findings, plots, home)
