"""
What fine-tuning on a task set will cost in safety, forecast before any fine-tuning (THEORY.md §4,
§2 (A2)): the context overlap of each task with the safety data, the mismatch of a proxy, and the
(A2) bound they make, every number an estimate from prompts and responses alone.

    python -m lab.forecast --safety safety_llamas --task alpaca_small --task code_alpaca
    python -m lab.forecast --safety alpaca_gpt4_align --task my_tasks.jsonl --proxy alpaca_gpt4_proxy \\
        --theta out_sweep/paper-real-cpu/pretrain/theta_pre.pt --json forecast.json

Names are registry names (loaders.REGISTRY) or files (.json, .jsonl, .csv, .txt, as evaluate.py
--prompts reads them). Per task: the calibrated TV(μ_s, μ_f) with its interval, the uncalibrated
reading, the lower bound 2·acc − 1, M = 1 − TV, the lexical score, the representation overlap under
a checkpoint (--theta), the (A2) overlap term per λ and, with --proxy, the (A2) bound = mismatch +
that term. Tasks are ranked by the (A2) term at the first λ: the larger it is, the more of the
safety data's contexts the task claims, the larger the predicted safety cost. The mismatch is one
number shared by every task, so it moves the bound but not the ranking.
"""

import argparse
import os
import sys
import time

import numpy as np

import theory
from common import DataError, HelpFormatter, Parser, atomic_write_json, first_paragraph
from data import SyntheticWorld, WorldConfig
from lab import estimators, gradients
from lab.ledger import read_rows
from model import CheckpointError, load_checkpoint
from realtext import loaders


def theta0_of(theta, safety):
    """The checkpoint dict of --theta (a text checkpoint: estimators.text_model refused any other) when it
    is a θ_0 (or a fine-tune) aligned on `safety`, for the answer-aware terms; None for a θ_pre, which
    has no D_s (only the representation overlap then); one message for a θ_0 of another D_s."""
    ckpt = load_checkpoint(theta)
    wc = ckpt["world_config"]
    if "safety" not in wc:
        return None
    if wc["safety"] != safety:
        raise DataError(f"--theta {theta} was aligned on {wc['safety']}, not --safety {safety}: the answer-aware "
                        f"terms take ∇ℓ_s on that θ_0's own held-out D_s; pass --safety {wc['safety']}")
    return ckpt


def forecast(safety, tasks, proxy="", theta="", lams=(1.0, 10.0), data_dir="", max_n=2000, seed=0,
             grad_examples=256):
    """The forecast of the module docstring as one dict (the --json object): per task its
    estimates, the (A2) terms per λ, its rank; the proxy's mismatch if one is given; with a θ_0,
    the answer-aware terms (lab/gradients.py) and their ranking."""
    t0 = time.time()
    if not tasks:
        raise DataError("no --task given: name at least one task set")
    if safety in tasks:
        raise DataError(f"--task {safety} is D_s itself: its overlap with D_s is complete by definition (M = 1); give "
                        f"another set (one with D_s's prompts and other answers is forecast exactly)")
    for name in [safety, *tasks] + ([proxy] if proxy else []):  # every input found before anything is read or cached
        for part in [name] if os.path.isfile(name) else name.split("+"):
            path = loaders.resolve(part, data_dir)[2]  # a file, a registry name, or one message naming it
            if not os.path.isfile(path):
                raise DataError(f"{part}: its file {path} is not in the data folder: fetch it "
                                f"(python -m realtext.fetch) or fix --data_dir")
    if theta and not os.path.isfile(theta):
        raise DataError(f"--theta {theta} does not exist: pass a θ_pre or θ_0 checkpoint of real text")
    model = estimators.text_model(theta) if theta else None  # a synthetic θ is refused here
    ckpt0 = theta0_of(theta, safety) if theta else None
    for task in tasks if ckpt0 is not None else ():
        gradients.check_answers(task)
    ps = estimators.prompts_of(safety, data_dir)
    mismatch = estimators.real_mismatch(proxy, safety, data_dir=data_dir) if proxy else None
    out = {"estimate": True, "safety": safety, "proxy": proxy or None, "theta": theta or None,
           "lams": [float(v) for v in lams], "mismatch": mismatch, "tasks": {}}
    for i, task in enumerate(tasks, 1):
        print(f"forecast: task {i}/{len(tasks)}, {task} ({time.time() - t0:.0f} s in)", file=sys.stderr, flush=True)
        pf = estimators.prompts_of(task, data_dir)
        same = set(ps) == set(pf)  # D_s's own prompts with other answers: the overlap is exact, not estimated
        c = (estimators.same_prompts_overlap(ps, lams) if same else
             estimators.classifier_overlap(ps, pf, lams=lams, max_n=max_n, seed=seed))
        entry = {k: c[k] for k in ("tv", "tv_interval", "tv_uncalibrated", "tv_lower_bound", "tv_lower_bound_interval",
                                   "M", "M_interval", "M_uncalibrated", "accuracy", "a2_overlap_term",
                                   "a2_overlap_term_interval", "a2_overlap_term_uncalibrated", "n_per_set")}
        entry["lexical"] = estimators.lexical_overlap(ps, pf, max_n=max_n, seed=seed)
        if same:
            entry["exact"] = "the same prompts"
        if mismatch is not None:
            entry["a2_bound"] = {lam: mismatch["mismatch"] + v for lam, v in entry["a2_overlap_term"].items()}
        if model is not None:
            r = (estimators.same_prompts_overlap(ps, lams) if same else
                 estimators.representation_overlap(*model, ps, pf, lams=lams, max_n=max_n, seed=seed))
            entry["representation"] = {k: r[k] for k in ("tv", "tv_interval", "M", "tv_lower_bound",
                                                         "a2_overlap_term")}
        if ckpt0 is not None:
            try:
                source = gradients.task_source(ckpt0, task, data_dir)
            except DataError as e:
                raise DataError(f"the answer-aware terms (--theta a θ_0) read each task's answers: {e}") from None
            entry.update(gradients.answer_terms(model[0], source, ckpt0["config"], grad_examples, seed))
        out["tasks"][task] = entry
    key = float(lams[0])
    out["ranking"] = sorted(out["tasks"], key=lambda t: -out["tasks"][t]["a2_overlap_term"][key])
    for i, t in enumerate(out["ranking"], 1):
        out["tasks"][t]["rank"] = i
    if ckpt0 is not None:  # the first-order Δℓ_s of a plain fine-tune, largest first
        out["ranking_answer_aware"] = sorted(out["tasks"], key=lambda t: -out["tasks"][t]["delta_ls_first_order"])
    out["seconds"] = round(time.time() - t0, 2)
    return out


def synthetic_forecast(overlaps=(0.0, 0.25, 0.5), lams=(1.0, 10.0), n=2000, runs="", seed=0):
    """The same forecast on the synthetic world (data.py), where it can be checked exactly: contexts
    sampled from μ_s and μ_f at each κ, written as words with their positions ('p0s3 p1s7 p2s1'),
    against the exact TV, M and (A2) overlap term of the world's densities, and, given a results.csv
    of the paper preset, the measured G_s of its Case I runs (seed means)."""
    rows = []
    measured = {}
    if runs:
        for r in read_rows(runs):
            if r["constraint"] == "loss" and abs(r["mismatch_delta"] - 0.3) < 1e-9:
                measured.setdefault((r["overlap"], r["lam"]), []).append(r["safety_gap"])
    rng = np.random.default_rng(seed)
    for k in overlaps:
        w = SyntheticWorld(WorldConfig(overlap=k, mismatch=0.3))  # the paper preset's δ
        text = lambda idx: [" ".join(f"p{i}s{int(v)}" for i, v in enumerate(w.contexts[j])) for j in idx]
        ps, pf = (text(rng.choice(len(w.contexts), n, p=w.mu[part])) for part in ("safety", "task"))
        est = estimators.classifier_overlap(ps, pf, lams=lams, max_n=n, seed=seed)
        rows.append({"overlap": k, "tv_exact": 1 - theory.overlap_mass(w.mu["safety"], w.mu["task"]), "estimate": est,
                     "mismatch": theory.mismatch_term(w.mu["safety"], w.P["safety"], w.P["proxy"]),
                     "a2_exact": {lam: theory.overlap_term(w.mu["safety"], w.mu["proxy"], w.mu["task"], lam) for lam in lams},
                     "G_s": {lam: float(np.mean(measured[(k, lam)])) for lam in lams if (k, lam) in measured}})
    return rows


def print_synthetic(rows, lams):
    print("| κ | λ | TV exact | TV calibrated [95%] | TV raw | (A2) term exact | (A2) term forecast | "
          "(A2) bound: exact mismatch + forecast term | G_s measured (Case I, seed mean) |\n|" + " --- |" * 9)
    for r in rows:
        e = r["estimate"]
        for lam in lams:
            print(f"| {r['overlap']:g} | {lam:g} | {r['tv_exact']:.3f} | {e['tv']:.3f} [{e['tv_interval'][0]:.3f}, "
                  f"{e['tv_interval'][1]:.3f}] | {e['tv_uncalibrated']:.3f} | {r['a2_exact'][lam]:.3f} | "
                  f"{e['a2_overlap_term'][lam]:.3f} | {r['mismatch'] + e['a2_overlap_term'][lam]:.3f} | "
                  + (f"{r['G_s'][lam]:.3f} |" if lam in r["G_s"] else "— |"))


def print_forecast(out):
    lam0 = out["lams"][0]
    print(f"forecast for D_s = {out['safety']}" + (f", proxy {out['proxy']} (mismatch estimate "
          f"{out['mismatch']['mismatch']:.2f} nats/seq)" if out["proxy"] else "")
          + f"; every number an estimate ({out['seconds']:.0f} s)")
    cols = ["rank", "task", "overlap M = 1 − TV [95%]", "TV calibrated", "TV ≥ 2·acc − 1", "TV raw",
            "lexical overlap"]
    cols += ["overlap M, hidden states"] if out["theta"] else []
    cols += [f"(A2) term λ={lam:g}" for lam in out["lams"]] + ([f"(A2) bound λ={lam0:g}"] if out["proxy"] else [])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for t in out["ranking"]:
        e = out["tasks"][t]
        row = [str(e["rank"]), t, f"{e['M']:.3f} [{e['M_interval'][0]:.3f}, {e['M_interval'][1]:.3f}]",
               f"{e['tv']:.3f}", f"{e['tv_lower_bound']:.3f}", f"{e['tv_uncalibrated']:.3f}", f"{e['lexical']:.3f}"]
        row += [f"{e['representation']['M']:.3f}"] if out["theta"] else []
        row += [f"{e['a2_overlap_term'][lam]:.3f}" for lam in out["lams"]]
        row += [f"{e['a2_bound'][lam0]:.2f}"] if out["proxy"] else []
        print("| " + " | ".join(row) + " |")
    print(f"rank 1 is the largest predicted safety cost: the (A2) overlap term at λ = {lam0:g} (THEORY.md §2). "
          "M: the share of prompt contexts the two sets have in common (1: the same distribution, 0: disjoint), "
          "from a classifier told to tell them apart (TV, calibrated out of fold; interval: bootstrap over "
          "prompts, joined with the accuracy's binomial interval); TV ≥ 2·acc − 1: the bound the classifier's "
          "accuracy estimates; TV raw: its uncalibrated scores; lexical: shared word n-gram mass.")


def print_answer_terms(out, top=3):
    """The answer-aware terms per task, largest predicted Δℓ_s first, and each task's costliest examples."""
    print(f"\nanswer-aware forecast at θ_0 = {out['theta']}: a plain fine-tune's first-order Δℓ_s (THEORY.md §4)")
    cols = ["task", "Δℓ_s first order [95%] (nats/seq)", "grad cos [95%]", "⟨∇ℓ_s, ∇ℓ_f⟩ [95%]", "weight-decay part",
            "‖∇ℓ_s‖ split-half cos", "examples"]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for t in out["ranking_answer_aware"]:
        e = out["tasks"][t]
        lo, hi = e["delta_ls_first_order_interval"]
        print(f"| {t} | {e['delta_ls_first_order']:+.4g} [{lo:+.4g}, {hi:+.4g}] | {e['grad_cos']:+.3f} "
              f"[{e['grad_cos_interval'][0]:+.3f}, {e['grad_cos_interval'][1]:+.3f}] | {e['grad_dot']:+.3g} "
              f"[{e['grad_dot_interval'][0]:+.3g}, {e['grad_dot_interval'][1]:+.3g}] | {e['delta_ls_decay_term']:+.3g} "
              f"| {e['safety_gradient_split_cos']:.2f} | {e['n_examples']} |")
    print("Δℓ_s > 0: the fine-tune is predicted to raise the held-out safety loss. The prediction holds the "
          "gradients at θ_0 (AdamW's steady-state step over the recorded recipe's learning-rate schedule), so "
          "its sign is the robust part; split-half cos near 0 says ∇ℓ_s is mostly sampling noise.")
    for t in out["ranking_answer_aware"]:
        scores = out["tasks"][t]["example_scores"]
        print(f"{t}: costliest examples: " + "; ".join(f"{s['score']:+.3f} {s['prompt'][:60]!r}" for s in scores[:top]))


def parse_lams(text):
    try:
        lams = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lams {text!r}: not a comma-separated list of numbers") from None
    if not lams or any(not lam > 0 for lam in lams):
        raise argparse.ArgumentTypeError(f"--lams {text!r}: give one or more λ > 0 (λ = 0 makes the (A2) term infinite)")
    return lams


def parser():
    ap = Parser(prog="python -m lab.forecast", description=first_paragraph(__doc__),
                formatter_class=HelpFormatter)
    ap.add_argument("--safety", help="the safety data D_s: a registry name or a file")
    ap.add_argument("--task", action="append", help="a task set D_f (repeat for several)")
    ap.add_argument("--synthetic", action="store_true",
                    help="forecast on the synthetic world at κ = 0, 0.25, 0.5 instead, against its exact overlap")
    ap.add_argument("--runs", default="", help="with --synthetic: the paper preset's results.csv, for measured G_s")
    ap.add_argument("--proxy", default="", help="a proxy D_s' with responses: adds the mismatch and the (A2) bound")
    ap.add_argument("--theta", default="", help="a text checkpoint (θ_pre or θ_0): adds the representation overlap")
    ap.add_argument("--lams", type=parse_lams, default=(1.0, 10.0), help="λ of the (A2) terms; the first ranks the tasks")
    ap.add_argument("--json", default="", help="also write the forecast to this file")
    ap.add_argument("--data_dir", default=os.environ.get("SAFETY_DATA_DIR", ""), help="the data folder of registry names")
    ap.add_argument("--max_n", type=int, default=2000, help="prompts per set in the classifier (a random sample)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sample, the folds and the bootstrap")
    ap.add_argument("--grad_examples", type=int, default=256,
                    help="with a θ_0: task examples whose gradients the answer-aware terms average (a random sample)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.max_n < 10:
        ap.error(f"--max_n {args.max_n}: use at least 10 prompts per set")
    if args.grad_examples < 2:
        ap.error(f"--grad_examples {args.grad_examples}: use at least 2 examples per task")
    if args.synthetic:
        if args.runs and not os.path.isfile(args.runs):
            ap.error(f"--runs {args.runs}: no such file (results/paper/results.csv after `python -m lab.sweep --preset paper`)")
        rows = synthetic_forecast(lams=args.lams, n=args.max_n, runs=args.runs, seed=args.seed)
        print_synthetic(rows, args.lams)
        return rows
    if not args.safety or not args.task:
        ap.error("--safety and at least one --task are required (or --synthetic)")
    try:
        out = forecast(args.safety, args.task, args.proxy, args.theta, args.lams, args.data_dir, args.max_n, args.seed,
                       args.grad_examples)
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print_forecast(out)
    if "ranking_answer_aware" in out:
        print_answer_terms(out)
    if args.json:
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
