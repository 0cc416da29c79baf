"""
The plan of a sweep (lab/sweep.py): every task, with the tasks it waits for. Each seed aligns one
θ_0 (the safety data μ_s, P_s do not depend on κ or δ, so one θ_0 serves every world), then
fine-tunes it over the grids of THEORY.md §2–§3 (synthetic_runs) or over the real-text arms
(real_runs). A task is a dict: its id, kind (pretrain, align, finetune, estimate), folder,
dependencies and the train.py recipe it runs.
"""

import os
import statistics
import time

import torch

import train
from constraints import STRATEGIES
from lab import analysis, batched
from lab.presets import PRESETS
from model import CheckpointError, load_checkpoint
from realtext import startpoints


def is_real(recipe):
    return recipe.get("data") == "real"



TAGS = {"lam": "lam", "radius": "r"}  # a run id's name for a sweep parameter (default: its own name)


def run_id(constraint, overlap, mismatch, value, seed):
    """'loss-k0.25-d0.3-lam1-s1': the strategy, the world, the value of its sweep parameter, the seed."""
    p = STRATEGIES[constraint].sweep_param
    knob = f"-{TAGS.get(p, p)}{value:g}" if p else ""
    return f"{constraint}-k{overlap:g}-d{mismatch:g}{knob}-s{seed}"


def extra_strategies(sc):
    """The strategies of --strategies beyond the design's none, loss and param."""
    return [s for s in sc.strategies if s not in ("none", "loss", "param")]


def strategy_grid(sc, name):
    """The values of a strategy's sweep parameter: --grid NAME=..., else its class's grid."""
    return tuple(sc.grids.get(name, STRATEGIES[name].grid))


INITS = ("scratch", "pretrain")


def plan(sc, recipe):
    """The tasks: (on real data, the estimators once, and θ_pre if an arm needs it,) one align
    per arm and seed, then its fine-tunes (synthetic_runs or real_runs). A run in two
    experiments is planned once."""
    real = is_real(recipe)
    tasks = {"estimate": {"id": "estimate", "kind": "estimate", "deps": [], "dir": os.path.join(sc.out_dir, "estimates"),
                          "tasks": list(dict.fromkeys(sc.tasks + (sc.task,) + sc.case_tasks)), "proxies": list(sc.proxies),
                          "safety": recipe["safety_data"], "data_dir": recipe.get("data_dir", ""),
                          "block_size": recipe.get("block_size", train.TrainConfig.block_size)}} if real else {}
    pre_path, pre_recipe = theta_pre_source(sc, recipe)
    if pre_recipe is not None:
        pre_dir = os.path.dirname(pre_path)
        tasks["pretrain"] = {"id": "pretrain", "kind": "pretrain", "deps": [], "dir": pre_dir,
                             "train": dict(pre_recipe, out_dir=pre_dir, stage="pretrain", seed=sc.pretrain_seed)}
    pretrained = pretrained_on(sc, pre_path, pre_recipe)
    for init, seeds, prefix in analysis.arms(sc):
        start = {} if init == "scratch" else {"init_from": pre_path}
        for seed in seeds:
            align_dir, aid = os.path.join(sc.out_dir, "theta0", f"{prefix}s{seed}"), f"align-{prefix}s{seed}"
            data = {"task_data": sc.task, "proxy_data": sc.proxies[0]} if real else {}
            tasks[aid] = {"id": aid, "kind": "align", "deps": ["pretrain"] if start and "pretrain" in tasks else [],
                          "dir": align_dir, "train": dict(recipe, out_dir=align_dir, stage="align", seed=seed,
                                                          **data, **start)}
            for rid, knobs, fields in (real_runs if real else synthetic_runs)(sc, seed, align_dir):
                rid = prefix + rid
                if rid in tasks or (start and set(knobs.get("task_data", "").split("+")) & pretrained):
                    continue  # planned already, or a task θ_pre was pretrained on (train.py refuses it)
                run_dir = os.path.join(sc.out_dir, "runs", rid)
                if "meta" in fields:
                    fields["meta"]["init"] = init
                tasks[rid] = {"id": rid, "kind": "finetune", "dir": run_dir, **fields,
                              "deps": [aid] + fields.get("deps", []),
                              "train": dict(recipe, out_dir=run_dir, stage="finetune", seed=seed, **knobs, **start,
                                            theta0=os.path.join(align_dir, "theta0.pt"),
                                            eval_interval=recipe["max_iters"])}
    if real:
        tasks.update(theta0_checks(sc, recipe, tasks, pre_path))
    settings = ({"real": True, "refusals": sc.refusals, "refusal_limit": sc.refusal_limit,
                 "refusal_tokens": sc.refusal_tokens} if real else
                {"tol_abs": sc.tol_abs, "tol_rel": sc.tol_rel, "power_iters": sc.power_iters, "power_tol": sc.power_tol})
    for t in tasks.values():
        if "train" in t:
            t["train"].update(progress=False)  # the worker resumes a killed run (worker.resumable)
        t.update(threads=sc.threads, **settings)
        if t.get("score_on"):
            t["refusals"] = False  # a proxy's model is scored on D_s, not asked to refuse
    return tasks


def theta0_checks(sc, recipe, tasks, pre_path):
    """The real-text checks that read a θ_0 before its fine-tunes say anything (THEORY.md §1, 'θ_0 at
    the optimum'; §4): per θ_0, the answer-aware forecast of every task (lab/gradients.py); and with
    sc.mismatch_models, the model-based mismatch: θ_pre aligned, by the recipe of θ_0, on each proxy
    instead of D_s (seed 1), whose held-out loss on D_s is set against θ_0's."""
    out = {}
    for t in [t for t in tasks.values() if t["kind"] == "align"]:
        gid = "gradients-" + t["id"].removeprefix("align-")
        out[gid] = {"id": gid, "kind": "gradients", "deps": [t["id"]], "dir": t["dir"],
                    "tasks": list(dict.fromkeys(sc.tasks + analysis.case_tasks(sc))), "recipe": dict(recipe)}
    if sc.mismatch_models and "pretrain" in sc.inits:
        for p in sc.proxies:
            mid, d = f"mismatch-{analysis.short(p)}", os.path.join(sc.out_dir, "mismatch", analysis.short(p))
            out[mid] = {"id": mid, "kind": "align", "deps": ["pretrain"] if "pretrain" in tasks else [], "dir": d,
                        "score_on": recipe["safety_data"],
                        "train": dict(recipe, out_dir=d, stage="align", seed=1, safety_data=p, task_data=sc.task,
                                      proxy_data=sc.task, init_from=pre_path)}  # no proxy in alignment
    return out


def theta_pre_source(sc, recipe):
    """(path of the pretrain arm's θ_pre, the recipe that pretrains it here or None). Without
    --theta_pre: this sweep's own, from its recipe. With it: that file as it is, or, when it is not
    there yet and the preset borrows it (theta_pre_from), the owner preset's recipe with this sweep's
    values over its own preset's (--train, the data folder); into the owner's file only when that is
    exactly the owner's recipe, so that the owner finds the θ_pre it would train, else into this
    sweep's own folder."""
    own = os.path.join(sc.out_dir, "pretrain", "theta_pre.pt")
    if "pretrain" not in sc.inits:
        return sc.theta_pre or own, None
    if not sc.theta_pre:
        return own, recipe
    if not sc.theta_pre_from or os.path.isfile(sc.theta_pre):
        return sc.theta_pre, None
    mine = PRESETS[sc.preset]["train"] if sc.preset in PRESETS else {}
    owner = PRESETS[sc.theta_pre_from]["train"]
    borrowed = dict(owner, **{k: v for k, v in recipe.items() if mine.get(k, None) != v})
    exact = startpoints.pretrain_key(train.TrainConfig(**borrowed)) == startpoints.pretrain_key(
        train.TrainConfig(**dict(owner, data_dir=recipe.get("data_dir", ""))))
    shared = exact and os.path.basename(sc.theta_pre) == "theta_pre.pt"
    return (sc.theta_pre if shared else own), borrowed


def pretrained_on(sc, pre_path, pre_recipe):
    """The corpus sources of the pretrain arm's θ_pre: the recipe's when the sweep pretrains it, else
    those stored in its file (none if that file is not there yet: its align task will say so)."""
    if "pretrain" not in sc.inits:
        return set()
    if pre_recipe is not None:
        return set(pre_recipe.get("pretrain_data", "").split("+")) - {""}
    try:
        return set(load_checkpoint(pre_path)["config"].get("pretrain_data", "").split("+")) - {""}
    except CheckpointError:
        return set()


def batch_groups(sc, tasks):
    """--batch_runs K: mark the fine-tunes that batched.py trains together (t["group"]): runs of one
    θ_0 that share everything but their knobs (batched.batch_key), in plan order, K at a time.
    Returns the fine-tunes that cannot be batched, which run singly."""
    if sc.batch_runs <= 1:
        return []
    groups, alone = {}, []
    for t in tasks.values():
        if t["kind"] != "finetune":
            continue
        key = batched.batch_key(train.TrainConfig(**t["train"]))
        if key is None:
            alone.append(t)
        else:
            groups.setdefault((t["deps"][0], key), []).append(t)  # deps[0]: the align task of its θ_0
    for members in groups.values():
        for i in range(0, len(members), sc.batch_runs):
            chunk = members[i:i + sc.batch_runs]
            for t in chunk if len(chunk) > 1 else ():
                t["group"] = f"batch-{chunk[0]['id']}"
    return alone


def synthetic_runs(sc, seed, align_dir):
    """The fine-tunes of one seed over the synthetic grids: (run id, TrainConfig values, task fields)."""
    none_id = run_id("none", sc.overlap, sc.mismatch, 0.0, seed)
    # λ = 0 for runs without the proxy term: plain fine-tuning IS Case I at λ = 0
    design = ([("loss", sc.overlap, d, lam) for d in sc.mismatches for lam in sc.lams]
              + [("loss", k, sc.mismatch, lam) for k in sc.overlaps for lam in sc.lams]
              + [("none", sc.overlap, sc.mismatch, 0.0)]
              + [("param", sc.overlap, sc.mismatch, r) for r in sc.radii])
    if not sc.baselines:  # an ablation: only the strategies named, the design's among them
        design = [run for run in design if run[0] in sc.strategies]
    planned_none = any(run[0] == "none" for run in design)
    for constraint, k, d, v in design + [(s, sc.overlap, sc.mismatch, v) for s in extra_strategies(sc)
                                         for v in strategy_grid(sc, s)]:
        strategy = STRATEGIES[constraint]
        # a Case II run's theory needs the unconstrained run, for d = ‖θ_f* − θ_0‖ of bound (E)
        ref = os.path.join(sc.out_dir, "runs", none_id) if strategy.case == "II" and planned_none else None
        knobs = {"constraint": constraint, "overlap": k, "mismatch": d, "lam": 0.0, "radius": 0.0}
        if strategy.sweep_param:
            knobs[strategy.sweep_param] = v
        yield run_id(constraint, k, d, v, seed), knobs, {"landscape_dir": align_dir, "reference": ref,
                                                         "deps": [none_id] if ref else []}


# Real data (presets real-cpu, real-gpu; THEORY.md §4–§5): no densities, so no gaps or bounds;
# every model (θ_0 too) has held-out losses (nats per sequence) and greedy refusal rates on held-out
# harmful and harmless prompts (evaluate.py), and the sweep estimates overlap and mismatch once
# (estimators.py). Each seed's θ_0 (refusals, with helpful answers mixed in) is fine-tuned:
#
#     none            D_f ∈ tasks                                    F2
#     Case I  (loss)  λ ∈ lams with the same-teacher proxies[0],
#                     and proxies[1:] at proxy_lam, D_f = task       F1, F4
#     Case II (param) r ∈ radii, D_f = task                          F3
#
# (each of case_tasks instead of task, if given), for each arm of `inits`: θ_0 from scratch, or
# from θ_pre, pretrained once on the general text corpus (corpus.py; run ids "pre-...")
def real_runs(sc, seed, align_dir):
    """The fine-tunes of one seed of a real-data sweep: (run id, TrainConfig values, task fields)."""
    cases = analysis.case_tasks(sc)
    for constraint, task, proxy, lam, r in ([("none", t, "", 0.0, 0.0) for t in dict.fromkeys(sc.tasks + cases)]
                                            + [("loss", t, sc.proxies[0], lam, 0.0) for t in cases for lam in sc.lams]
                                            + [("loss", t, p, sc.proxy_lam or sc.lams[0], 0.0)
                                               for t in cases for p in sc.proxies[1:]]
                                            + [("param", t, "", 0.0, r) for t in cases for r in sc.radii]):
        yield (analysis.real_run_id(constraint, task, proxy, lam, r, seed),
               {"constraint": constraint, "task_data": task, "proxy_data": proxy or sc.proxies[0], "lam": lam, "radius": r},
               {"meta": {"constraint": constraint, "task": task, "proxy": proxy, "lam": lam, "radius": r, "seed": seed}})


def step_seconds(recipe, threads=1, steps=5):
    """Seconds one plain fine-tuning step of the recipe takes here and now (median of a few, on `threads`
    threads as a sweep's worker runs), for the plan's estimate; None for real text (building its data
    would take longer than the guess)."""
    if is_real(recipe):
        return None
    cfg = train.TrainConfig(**dict(recipe, device="cpu", progress=False))
    world, sys_ = train.make_world(cfg), train.setup_system(cfg)
    model = train.new_model(cfg, world, sys_)
    optimizer = train.make_optimizer(model, cfg, cfg.lr, sys_)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    streams, params, times = train.Streams("finetune", world, cfg, sys_, False), train.flat_params(model), []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i in range(steps + 1):
            t0 = time.perf_counter()
            train.train_step(model, optimizer, scaler, params, None, sys_, streams.batch("task"), None, streams.accum,
                             cfg.grad_clip)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times[1:])


def describe_plan(sc, recipe, tasks, done):
    """One line: the plan's size, its training steps and, on the synthetic world, the time they take
    here at a plain step's time measured now (a Case I step, with its proxy batch, counted as two;
    evaluation and theory come on top, and --batch_runs is not counted)."""
    left = [t for t in tasks.values() if t["id"] not in done]
    if sc.refresh:
        return f"plan: --refresh, no training: theory.py again on {sum(t['kind'] == 'finetune' for t in left)} runs"
    n = {kind: sum(t["kind"] == kind for t in left) for kind in ("finetune", "align", "pretrain")}
    case1 = sum(t["kind"] == "finetune" and t["train"].get("constraint") == "loss" for t in left)
    get = lambda k: recipe.get(k, getattr(train.TrainConfig, k))
    steps = n["finetune"] * get("max_iters") + n["align"] * get("align_iters") + n["pretrain"] * get("pretrain_iters")
    line = (f"plan: {n['finetune']} fine-tunes, {n['align']} θ_0 and {n['pretrain']} θ_pre left to train, "
            f"{steps:,} optimizer steps")
    t = step_seconds(recipe, sc.threads) if steps else None
    if t is not None:  # a Case I step and a SAM align step each take two forward-backward passes
        sam = n["align"] * get("align_iters") if get("align_method") == "sam" else 0
        work = (steps + case1 * get("max_iters") + sam) * t / 60 / sc.jobs
        line += (f"; about {work:.1f} min of training at {t * 1000:.1f} ms a plain step measured now, {sc.jobs} at a "
                 f"time (evaluation and theory come on top)")
    return line
