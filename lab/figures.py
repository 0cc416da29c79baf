"""
The figures of a sweep's report, one function per figure; each draws from the seed means of
analysis.py and returns its PNG's path. The smoke and paper presets draw five (the exact
optimum's curves of THEORY.md §2 beside the measured runs), strategies one, the real-text
presets three.
"""

import os

import numpy as np

import theory
from constraints import STRATEGIES
from data import SyntheticWorld, WorldConfig
from lab import analysis
from lab.analysis import REFUSAL_SETS, groups, mean, real_run_id, seed_means


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


def mark_plain_and_theta0(ax, sc, rows):
    """The unconstrained fine-tune and θ_0 itself at (κ, δ), as black marks on a (G_f, G_s) plot."""
    for e in groups(rows, "none", overlap=sc.overlap, mismatch_delta=sc.mismatch):
        ax.errorbar(mean(e, "capability_gap"), mean(e, "safety_gap"), marker="x", color="k", ls="none",
                    label="no constraint")
        ax.errorbar(mean(e, "aligned_capability_gap"), mean(e, "aligned_safety_gap"), marker="*", color="k",
                    ls="none", label="θ_0 (aligned)")


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
    mark_plain_and_theta0(ax, sc, rows)
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


def fig_real_tradeoff(sc, rows, g, prefix=""):
    """(ℓ_f, ℓ_s) of θ_0, the plain, Case I and Case II runs on sc.task (F1, F3, F4) of one arm: its rows,
    their groups g, the prefix of their run ids (analysis.arms)."""
    fig, ax, colors = figure(figsize=(6.5, 4.5))
    a = seed_means([r for r in rows if r["task"] == sc.task])
    ax.errorbar([mean(a, "aligned_capability_loss")], [mean(a, "aligned_safety_loss")], fmt="k*", ms=12, label="θ_0")
    errorbar(ax, [g[prefix + real_run_id("none", sc.task)]], "capability_loss", "safety_loss", label="no constraint",
             fmt="kx", ms=9)
    for i, p in enumerate(sc.proxies):
        es = sorted((e for e in g.values() if e["rows"][0]["constraint"] == "loss" and e["rows"][0]["proxy"] == p),
                    key=lambda e: e["rows"][0]["lam"])
        errorbar(ax, es, "capability_loss", "safety_loss", label=f"Case I, proxy {p}" + (" (same teacher)" if i == 0 else ""),
                 fmt="o-" if len(es) > 1 else "o", color=colors[i % len(colors)])
        for e in es:
            ax.annotate(f"λ={e['rows'][0]['lam']:g}", (mean(e, "capability_loss"), mean(e, "safety_loss")), fontsize=7)
    es = [g[prefix + real_run_id("param", sc.task, radius=r)] for r in sorted(sc.radii)]
    errorbar(ax, es, "capability_loss", "safety_loss", label="Case II", fmt="s--", color="gray")
    for r, e in zip(sorted(sc.radii), es):
        ax.annotate(f"r={r:g}", (mean(e, "capability_loss"), mean(e, "safety_loss")), fontsize=7)
    ax.set(xlabel=f"task loss ℓ_f on held-out {sc.task} (nats/seq)", ylabel="safety loss ℓ_s on held-out D_s (nats/seq)",
           title="F1, F3, F4 on real text: lower-left is better")
    return save_figure(fig, sc, "fig1_real_tradeoff.png", ax)


def fig_real_overlap(sc, g, est, prefix=""):
    """The ℓ_s increase of plain fine-tuning against each task's estimated overlap M (F2), one arm."""
    fig, ax, colors = figure(figsize=(5.5, 4))
    for i, t in enumerate(t for t in dict.fromkeys(sc.tasks) if prefix + real_run_id("none", t) in g):
        e = g[prefix + real_run_id("none", t)]
        ax.errorbar([est["overlap"][t]["M"]], [mean(e, "safety_increase")], yerr=[e["safety_increase"][1]], fmt="o",
                    capsize=3, color=colors[i % len(colors)], label=t)
    ax.set(xlabel="estimated context overlap M with D_s", ylabel="ℓ_s(θ) − ℓ_s(θ_0) (nats/seq)",
           title="F2 on real text: plain fine-tuning per task")
    return save_figure(fig, sc, "fig2_real_overlap.png", ax)


def fig_real_refusals(sc, g, arms):
    """Refusal rates of every model (each arm's θ_0 first, analysis.arms) on each of REFUSAL_SETS."""
    models = {f"θ_0 {init}": analysis.theta0_means(sc, prefix, seeds) for init, seeds, prefix in arms}
    models.update(g)
    fig, ax, colors = figure(figsize=(max(7, 0.7 * len(models)), 4.5))
    w = 0.8 / len(REFUSAL_SETS)
    for j, (k, kind) in enumerate(REFUSAL_SETS.items()):
        ax.bar(np.arange(len(models)) + j * w, [mean(e, f"refusal_{k}") for e in models.values()], w,
               yerr=[e[f"refusal_{k}"][1] for e in models.values()], capsize=2, label=f"{k} ({kind})",
               color=colors[j % len(colors)])
    ax.set_xticks(np.arange(len(models)) + 0.4 - w / 2, list(models), rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="refusal rate", ylim=(0, 1), title="Refusals (greedy; keyword test)")
    return save_figure(fig, sc, "fig3_real_refusals.png", ax)


def fig_strategies(sc, rows):
    """(G_f, G_s) of every strategy along its sweep at one world, θ_0 and plain fine-tuning marked."""
    fig, ax, colors = figure(figsize=(6, 4.5))
    markers = "osD^v<>"
    for i, (name, s) in enumerate(STRATEGIES.items()):
        g = groups(rows, name, overlap=sc.overlap, mismatch_delta=sc.mismatch)
        if s.sweep_param and g:
            errorbar(ax, g, "capability_gap", "safety_gap", marker=markers[i % len(markers)],
                     color=colors[i % len(colors)], label=f"{name} ({s.sweep_param} grid)")
    mark_plain_and_theta0(ax, sc, rows)
    ax.set(xscale="log", yscale="log", xlabel="capability gap G_f (nats)", ylabel="safety gap G_s (nats)",
           title=f"Strategies at κ={sc.overlap:g}, δ={sc.mismatch:g}")
    return save_figure(fig, sc, "fig_strategies.png", ax)


def fig_paper_real(sc, g, arms, curves):
    """Arm P: the safety cost ℓ_s − ℓ_s(θ_0) against the capability gain ℓ_f(θ_0) − ℓ_f, one panel per
    arm (scratch, pretrained): each task's Case I curve (θ_0 at the origin, λ from 0 = plain fine-tuning
    up), and its Case II runs (F2, F3)."""
    fig, axes, colors = figure(1, len(arms), figsize=(5.5 * len(arms), 4.2), squeeze=False)
    for ax, (arm, prefix) in zip(axes[0], arms):
        for i, t in enumerate(analysis.case_tasks(sc)):
            c = curves[(arm, t)]
            es = [e for *_, e in c]
            ax.plot([0] + [mean(e, "capability_gain") for e in es[::-1]],  # θ_0, then λ from large to 0
                    [0] + [mean(e, "safety_increase") for e in es[::-1]], "-", color=colors[i % len(colors)], lw=1)
            errorbar(ax, es, "capability_gain", "safety_increase", fmt="o", color=colors[i % len(colors)],
                     label=f"{t}: Case I (λ)")
            for lam, x, y, _ in c:
                ax.annotate(f"λ={lam:g}", (x, y), fontsize=6)
            e2 = [g[prefix + real_run_id("param", t, radius=r)] for r in sorted(sc.radii)]
            errorbar(ax, e2, "capability_gain", "safety_increase", fmt="s--", color=colors[i % len(colors)],
                     alpha=0.6, label=f"{t}: Case II (r)")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="capability gain ℓ_f(θ_0) − ℓ_f (nats/seq)", ylabel="safety cost ℓ_s − ℓ_s(θ_0) (nats/seq)",
               title=f"arm P, θ_0 from {'scratch' if arm == 'scratch' else 'θ_pre'}")
    return save_figure(fig, sc, "fig1_paper_real_tradeoff.png", *axes[0])
