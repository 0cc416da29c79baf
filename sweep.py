"""
Sweeps: the findings F1–F6 of THEORY.md §5 with the theory beside every measurement.

    python sweep.py --preset smoke                  # < 2 minutes on 2 CPU cores (the tests run it)
    python sweep.py --preset paper                  # the README's plots, 3 seeds, 31–39 minutes on 2 cores
    python sweep.py --preset paper --lams 0.1,1,10  # any grid can be overridden
    python sweep.py --preset paper --shard 2/4      # one of 4 processes sharing the plan (ledger.py)
    python sweep.py --preset paper-real-cpu         # the paper's roles on real text (needs SAFETY_DATA_DIR), 77 min on 2 cores
    python sweep.py --preset real-cpu               # refusals on real text, from scratch and from paper-real-cpu's θ_pre
    python sweep.py --preset real-gpu               # the same at a larger size, for one GPU (never run here)

Each seed aligns one θ_0 (the safety data μ_s, P_s do not depend on κ or δ, so one θ_0
serves every world), computes the alignment landscape at θ_0 once (THEORY.md §3), and
fine-tunes it over the grids:

    Case I  (loss)   λ ∈ lams × δ ∈ mismatches at κ = overlap       F1, F4
    Case I  (loss)   λ ∈ lams × κ ∈ overlaps  at δ = mismatch       F2
    Case II (param)  r ∈ radii, and one unconstrained run, at (κ, δ)  F3, F6
    any strategy     of `strategies`, over its grid, at (κ, δ)        (compared in the report)
                                                                    F5: every run

theory.py reports on every run. results.csv (one row per run, written whole and atomically
after each run) is also the sweep's memory: run the same command again after an interruption
and finished runs are skipped, never repeated or duplicated. When every run is done, report.py
writes results.md (the tables and the F1–F6 checks, generated, never typed by hand) and its PNG
plots (five for smoke and paper), means over seeds with ±1 sd error bars. Real data has its own plan below ("Real data").
"""

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch

import analysis
import batched
import loaders
import report
import report_paper_real
import theory
import train
import worker
from common import DataError, SweepError, atomic_write_json, remove_stale_temporaries
from constraints import STRATEGIES
from model import CheckpointError, load_checkpoint
from ledger import FIRST_COLUMNS, locked, merge_row, parse_shard, read_rows, shard_ids, write_rows  # noqa: F401
from presets import PRESETS

# -----------------------------------------------------------------------------
# Configuration: one dataclass; a preset is a dict of its values (data, not code), and
# any flag given on the command line wins over the preset.


@dataclass
class SweepConfig:
    preset: str = "smoke"         # a name of presets.PRESETS: a dict of the values below
    out_dir: str = ""             # runs, θ_0s, results.csv; default out_sweep/<preset>
    report_dir: str = ""          # results.md, results.csv and the plots; default out_dir
    jobs: int = 2                 # runs at a time, each in its own process
    threads: int = 1              # CPU threads per run: one per core beats oversubscribed threads
    max_runs: int = 0             # stop after this many fine-tunes (0: all); rerun to resume
    shard: str = ""               # i/n: run only this share of the plan; n shards may run at once on one out_dir (ledger.py)
    batch_runs: int = 0           # train up to this many fine-tunes of one θ_0 at once as one batched model (batched.py; 0: singly)
    refresh: bool = False         # report theory.py again on every finished run (no training)
    # grids (THEORY.md §2–§3); comma-separated on the command line
    seeds: tuple = (1,)           # each seed aligns its own θ_0 and seeds its fine-tunes
    lams: tuple = (1.0, 10.0)     # λ: Case I penalty strengths
    mismatches: tuple = (0.0, 0.3)  # δ grid of the mismatch experiment (F1), at κ = overlap
    overlaps: tuple = (0.0, 0.25)   # κ grid of the overlap experiment (F2), at δ = mismatch
    radii: tuple = (0.05, 0.5)    # r: Case II radii (F3, F6), at (overlap, mismatch)
    strategies: tuple = ()        # more strategies of constraints.STRATEGIES at (κ, δ), each over its grid
    grids: dict = dataclasses.field(default_factory=dict)  # name → values of its sweep_param (--grid)
    overlap: float = 0.25         # κ of the mismatch and radius experiments
    mismatch: float = 0.3         # δ of the overlap and radius experiments
    # real-data grids (presets real-cpu, real-gpu: README "Real data"); registry names or files
    tasks: tuple = ("alpaca_safety_only", "alpaca_small", "code_alpaca")  # D_f of the plain fine-tunes (F2)
    proxies: tuple = ("safety_llamas_proxy", "xstest_llama2orig")  # D_s' of Case I: same teacher first (F1)
    task: str = "alpaca_small"    # D_f of the Case I and Case II runs ...
    case_tasks: tuple = ()        # ... or each of these (default: task)
    proxy_lam: float = 0.0        # λ of the Case I runs with proxies[1:] (0: lams[0])
    inits: tuple = ("scratch",)   # where alignment starts: scratch and/or pretrain (θ_pre of the recipe's corpus)
    scratch_seeds: tuple = ()     # the seeds of the scratch arm when inits has both (default: seeds)
    pretrain_seed: int = 1        # the seed of the one θ_pre every pretrained θ_0 starts from ...
    theta_pre: str = ""           # ... or this θ_pre (train.py --stage pretrain), pretrained before (read by a pretrain arm only)
    refusals: bool = True         # greedy refusal rates of every model (arm R; the paper's arm P has none)
    data_dir: str = ""            # the real data folder; default $SAFETY_DATA_DIR
    refusal_limit: int = 128      # prompts per refusal set, greedy decoding ...
    refusal_tokens: int = 24      # ... of this many new tokens
    # theory.py
    tol_abs: float = 0.05         # a Case I gap within tol_abs + tol_rel·G(P*) of the optimum reaches it
    tol_rel: float = 0.1
    power_iters: int = 100        # most power iterations for λ_max(H_s)
    power_tol: float = 1e-4       # relative residual that stops them
    f6_small_radius: float = 0.25  # F6 is checked at r ≤ this ...
    f6_factor: float = 2.0        # ... as measured/predicted within [1/factor, factor]


def is_real(recipe):
    return recipe.get("data") == "real"


def parse_list(text, kind):
    """'0.1,1,10' → (0.1, 1.0, 10.0) for a grid flag."""
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None


def parse_args(argv=None):
    """SweepConfig from the preset, then the flags actually given."""
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--grid", action="append", type=parse_grid, metavar="NAME=V1,V2,...",
                    help="the values of strategy NAME's sweep parameter (default: its Strategy.grid)")
    for f in dataclasses.fields(SweepConfig):
        if f.name == "grids":
            continue
        if isinstance(f.default, tuple):
            kind = {"seeds": int, "scratch_seeds": int, "tasks": str, "proxies": str, "strategies": str,
                    "case_tasks": str, "inits": str}.get(f.name, float)
            ap.add_argument(f"--{f.name}", type=lambda s, k=kind: parse_list(s, k), default=None)
        elif isinstance(f.default, bool):
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(f"--{f.name}", type=type(f.default), default=None,
                            choices=sorted(PRESETS) if f.name == "preset" else None)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    if "grid" in given:  # added to the preset's grids, one strategy at a time
        given["grids"] = {**PRESETS[given.get("preset", "smoke")].get("grids", {}), **dict(given.pop("grid"))}
    return make_config(**given)


def parse_grid(text):
    """'fisher=10,100' → ('fisher', (10.0, 100.0)) for --grid."""
    name, eq, values = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=V1,V2,...")
    return name.strip(), parse_list(values, float)


def make_config(preset="smoke", **overrides):
    """SweepConfig and the train recipe of a preset with overrides (also for tests)."""
    if preset not in PRESETS:
        raise SweepError(f"--preset {preset!r} is unknown: choose one of {', '.join(sorted(PRESETS))}")
    values = {k: v for k, v in PRESETS[preset].items() if k not in ("train", "report")}  # report: which writer
    if overrides.get("out_dir"):
        values.pop("report_dir", None)  # a sweep elsewhere never overwrites the preset's published report
    values.update(overrides)
    sc = SweepConfig(preset=preset, **values)
    sc.out_dir = sc.out_dir or os.path.join("out_sweep", preset)
    sc.report_dir = sc.report_dir or sc.out_dir
    recipe = dict(PRESETS[preset]["train"])
    check_config(sc, recipe)
    if is_real(recipe):
        try:
            recipe["data_dir"] = loaders.resolve_data_dir(sc.data_dir)  # as given: the report shows it
        except DataError:
            raise SweepError(f"--preset {preset} reads real data: pass --data_dir DIR or set SAFETY_DATA_DIR to the "
                             f"data folder (README 'Real data' says where each file comes from)") from None
    if sc.theta_pre and "pretrain" in sc.inits and not os.path.isfile(sc.theta_pre):
        raise SweepError(f"--theta_pre {sc.theta_pre} does not exist: pretrain it first (`python sweep.py --preset "
                         f"paper-real-cpu` writes it), pass --theta_pre '' to pretrain one here, or --inits scratch")
    return sc, recipe


def check_config(sc, recipe=None):
    """Every grid value valid before anything runs."""
    def bad(flag, v, what):
        raise SweepError(f"--{flag}: {v!r} is not a valid value ({what}); fix the grid")
    for name in list(sc.strategies) + list(sc.grids):
        if name not in STRATEGIES:
            bad("strategies" if name in sc.strategies else "grid", name, f"one of {', '.join(STRATEGIES)}")
        if STRATEGIES[name].sweep_param is None and name in sc.grids:
            bad("grid", name, "a strategy with a parameter to sweep")
    if (sc.strategies or sc.grids) and is_real(recipe or {}):
        raise SweepError("--strategies/--grid are for the synthetic presets: the real-text plan runs none, loss "
                         "and param only")
    for name in sc.grids:  # a grid nobody would read is a mistake, not a no-op
        if name in ("loss", "param") or name not in sc.strategies:
            bad("grid", name, "a strategy of --strategies other than loss and param (those take --lams, --radii)")
    for name in extra_strategies(sc):
        if not strategy_grid(sc, name) or len(set(strategy_grid(sc, name))) != len(strategy_grid(sc, name)):
            bad("grid", f"{name}={','.join(map(str, strategy_grid(sc, name)))}", "at least one value, each once")
        for v in strategy_grid(sc, name):
            try:
                STRATEGIES[name].check(dict(dataclasses.asdict(train.TrainConfig()), **{STRATEGIES[name].sweep_param: v}))
            except ValueError as e:
                raise SweepError(f"--grid {name}: {e}") from None
    grids = ("seeds", "lams", "radii", "inits") + (("tasks", "proxies") if is_real(recipe or {}) else ("mismatches", "overlaps"))
    if is_real(recipe or {}):
        for flag in ("tasks", "proxies", "task", "case_tasks"):
            for name in getattr(sc, flag) if flag != "task" else (sc.task,):
                if not all(n in loaders.REGISTRY or os.path.isfile(n) for n in name.split("+")):
                    bad(flag, name, "a loaders.REGISTRY name, a file of (prompt, response) pairs, or 'a+b' of them")
        names = set(sc.tasks + sc.proxies + (sc.task,) + sc.case_tasks)
        if len({analysis.short(n) for n in names}) < len(names):
            raise SweepError("--tasks/--proxies/--task: two sets would share a run id (the same file name): "
                             "rename one of the files")
        if sc.refusal_tokens > recipe["block_size"] - 8:
            bad("refusal_tokens", sc.refusal_tokens, f"at most block_size − 8 = {recipe['block_size'] - 8}, "
                "to leave room for the prompt")
    for init in sc.inits:
        if init not in INITS:
            bad("inits", init, "scratch or pretrain")
    if sc.proxy_lam and sc.proxy_lam not in sc.lams:  # F1 compares the proxies at one λ
        bad("proxy_lam", sc.proxy_lam, f"one of --lams {','.join(f'{v:g}' for v in sc.lams)}, or 0 for lams[0]")
    if sc.case_tasks and sc.task not in sc.case_tasks:  # the arm R report reads Case I and II runs of --task
        bad("task", sc.task, "one of --case_tasks")
    if "pretrain" in sc.inits and not is_real(recipe or {}):
        raise SweepError("--inits pretrain pretrains on real general text: use a real-data preset")
    if sc.scratch_seeds and "scratch" not in sc.inits:
        bad("scratch_seeds", sc.scratch_seeds, "seeds of the scratch arm, which --inits does not have")
    parse_shard(sc.shard)
    if sc.shard and sc.refresh:
        raise SweepError("--refresh measures every run again in one process: drop --shard")
    for flag in ("refusal_limit", "refusal_tokens"):
        if getattr(sc, flag) < 1:
            bad(flag, getattr(sc, flag), "an integer ≥ 1")
    for flag in grids:
        if len(getattr(sc, flag)) == 0:
            raise SweepError(f"--{flag} is empty: give at least one value")
    for flag in grids + ("scratch_seeds", "case_tasks"):
        if len(set(getattr(sc, flag))) != len(getattr(sc, flag)):
            raise SweepError(f"--{flag} {getattr(sc, flag)} repeats a value: list each value once")
    for flags, ok, what in VALUE_RULES:
        for flag in flags.split():
            value = getattr(sc, flag)
            for v in value if isinstance(value, tuple) else (value,):  # a grid: each of its values
                if not ok(v):
                    bad(flag, v, what)


# what each flag's values must be, checked in this order: (flags, test of one value, what is valid)
VALUE_RULES = (("seeds scratch_seeds pretrain_seed", lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0"),
               ("lams radii", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
               ("proxy_lam", lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0 (0: lams[0])"),
               ("mismatches overlaps overlap mismatch", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
               ("jobs threads power_iters", lambda v: v >= 1, "an integer ≥ 1"),
               ("max_runs batch_runs", lambda v: v >= 0, "an integer ≥ 0"),
               ("tol_abs tol_rel power_tol f6_small_radius", lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
               ("f6_factor", lambda v: v >= 1, "a number ≥ 1"))


# -----------------------------------------------------------------------------
# The plan: every task of the sweep, with the tasks it waits for


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
                          "safety": recipe["safety_data"], "data_dir": recipe.get("data_dir", "")}} if real else {}
    pre_dir = os.path.join(sc.out_dir, "pretrain")
    pre_path = sc.theta_pre or os.path.join(pre_dir, "theta_pre.pt")
    if "pretrain" in sc.inits and not sc.theta_pre:
        tasks["pretrain"] = {"id": "pretrain", "kind": "pretrain", "deps": [], "dir": pre_dir,
                             "train": dict(recipe, out_dir=pre_dir, stage="pretrain", seed=sc.pretrain_seed)}
    pretrained = pretrained_on(sc, recipe, pre_path)
    for init, seeds, prefix in analysis.arms(sc):
        start = {} if init == "scratch" else {"init_from": pre_path}
        for seed in seeds:
            align_dir, aid = os.path.join(sc.out_dir, "theta0", f"{prefix}s{seed}"), f"align-{prefix}s{seed}"
            data = {"task_data": sc.task, "proxy_data": sc.proxies[0]} if real else {}
            tasks[aid] = {"id": aid, "kind": "align", "deps": ["pretrain"] if start and not sc.theta_pre else [],
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
    settings = ({"real": True, "refusals": sc.refusals, "refusal_limit": sc.refusal_limit,
                 "refusal_tokens": sc.refusal_tokens} if real else
                {"tol_abs": sc.tol_abs, "tol_rel": sc.tol_rel, "power_iters": sc.power_iters, "power_tol": sc.power_tol})
    for t in tasks.values():
        if "train" in t:
            t["train"].update(progress=False, resume=True)  # resume=True: a killed run continues
        t.update(threads=sc.threads, **settings)
    return tasks


def pretrained_on(sc, recipe, pre_path):
    """The corpus sources of the pretrain arm's θ_pre: the recipe's when the sweep pretrains it, else
    those stored in sc.theta_pre (none if that file is not there yet: its align task will say so)."""
    if "pretrain" not in sc.inits:
        return set()
    if not sc.theta_pre:
        return set(recipe.get("pretrain_data", "").split("+")) - {""}
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
    for constraint, k, d, v in ([("loss", sc.overlap, d, lam) for d in sc.mismatches for lam in sc.lams]
                                + [("loss", k, sc.mismatch, lam) for k in sc.overlaps for lam in sc.lams]
                                + [("none", sc.overlap, sc.mismatch, 0.0)]
                                + [("param", sc.overlap, sc.mismatch, r) for r in sc.radii]
                                + [(s, sc.overlap, sc.mismatch, v) for s in extra_strategies(sc)
                                   for v in strategy_grid(sc, s)]):
        strategy = STRATEGIES[constraint]
        # a Case II run's theory needs the unconstrained run, for d = ‖θ_f* − θ_0‖ of bound (E)
        ref = os.path.join(sc.out_dir, "runs", none_id) if strategy.case == "II" else None
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


# -----------------------------------------------------------------------------
# Running tasks: in worker processes, or in this one when --jobs 1 (worker.py runs one)


class InlineExecutor(Executor):
    """The ProcessPoolExecutor interface (shutdown: Executor's, which does nothing), running each
    task at once in this process."""

    def submit(self, fn, *args):
        fut = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: B036 — handed to the caller through the future
            fut.set_exception(e)
        return fut


def check_out_dir(sc, recipe, plan_ids=()):
    """An out_dir holds one recipe: rows of another recipe must never mix with these; shards of one
    folder must agree on their number and their plan. Read and written under the folder's lock."""
    os.makedirs(sc.out_dir, exist_ok=True)
    # left by a killed sweep or its workers; other shards' live ones stay
    remove_stale_temporaries(sc.out_dir, recursive=True, min_age=600.0 if sc.shard else 0.0)
    path = os.path.join(sc.out_dir, "sweep.json")
    # a real sweep's refusal rates are measurements of the recipe too
    recipe = dict(recipe, **({"refusal_limit": sc.refusal_limit, "refusal_tokens": sc.refusal_tokens}
                             if is_real(recipe) else {}))
    with locked(sc.out_dir):
        state = json.load(open(path)) if os.path.exists(path) else {"recipe": recipe, "wall_seconds": 0.0,
                                                                    "invocations": 0}
        if state["recipe"] != recipe:
            diff = sorted(k for k in set(recipe) | set(state["recipe"]) if recipe.get(k) != state["recipe"].get(k))
            raise SweepError(f"{sc.out_dir} holds a sweep with another train recipe ({', '.join(diff)}): "
                             f"use a fresh --out_dir or the same preset")
        if sc.shard:  # every shard must cut the same plan into the same number of shares (and groups)
            key = {"shards": parse_shard(sc.shard)[1], "plan": sorted(plan_ids)}
            if sc.batch_runs > 1:
                key["batch_runs"] = sc.batch_runs
            if state.get("sharding", key) != key:
                raise SweepError(f"{sc.out_dir} is shared by shards of another plan or shard count (--shard i/"
                                 f"{state['sharding']['shards']}, {len(state['sharding']['plan'])} tasks): start "
                                 f"every shard with the same flags")
            state["sharding"] = key
        atomic_write_json(path, state)
    return state


# -----------------------------------------------------------------------------
# The sweep


def done_tasks(sc, tasks, rows):
    """Ids of the tasks with nothing left to do: runs with a row in results.csv (none under --refresh,
    which measures every run again), θ_0s that train.py as it stands now accepts for this recipe, with
    their landscape (real data: refusals), and estimates of these sets. A stale row of an unplanned run is kept."""
    done = set() if sc.refresh else {r["run_id"] for r in rows}
    for t in tasks.values():
        if t["kind"] == "pretrain" and worker.has_theta_pre(t["dir"], train.TrainConfig(**t["train"])):
            done.add(t["id"])
        if t["kind"] == "align" and not (sc.refresh and t.get("real")):  # --refresh: a real θ_0's refusals again
            marker = "refusals.json" if t.get("real") else "landscape.json"  # written after θ_0 itself
            if os.path.exists(os.path.join(t["dir"], marker)) and worker.has_theta0(t["dir"], train.TrainConfig(**t["train"])):
                done.add(t["id"])
        if t["id"] in done and not all(d in done for d in t["deps"]):  # deps first in plan order
            done.discard(t["id"])  # e.g. a θ_pre trained again: its θ_0s and their runs are stale
        path = os.path.join(t["dir"], "estimates.json")  # a resumed sweep may add sets
        if t["kind"] == "estimate" and os.path.exists(path):
            est = json.load(open(path))
            if (est.get("safety") == t["safety"] and set(t["tasks"]) <= set(est["overlap"])
                    and all("tv" in e for e in est["overlap"].values())  # calibrated (forecast.py)
                    and set(t["proxies"]) <= set(est["mismatch"])):
                done.add(t["id"])
    return done


def run_sweep(sc, recipe, write_report=True):
    """Run every task not yet in results.csv, jobs at a time; report when all are done (unless the
    caller reports itself: landscape.py). Returns the rows of the planned runs."""
    t_start = time.time()
    tasks = plan(sc, recipe)
    alone = batch_groups(sc, tasks)
    if alone:  # said once, here: each of these runs singly
        kinds = sorted({t["train"]["constraint"] if t["train"].get("data") != "real" else "real-data" for t in alone})
        print(f"--batch_runs {sc.batch_runs}: {len(alone)} runs ({', '.join(kinds)}) cannot be batched (batched.py "
              f"trains {', '.join(batched.STRATEGIES)} fine-tunes of the synthetic world): they run one at a time")
    state = check_out_dir(sc, recipe, list(tasks))
    csv_path = os.path.join(sc.out_dir, "results.csv")
    rows = read_rows(csv_path)
    for t in tasks.values():
        t["refresh"] = sc.refresh
    done = done_tasks(sc, tasks, rows)
    shard = parse_shard(sc.shard)
    mine = shard_ids(tasks, shard)
    todo = [t for t in tasks.values() if t["id"] not in done and t["id"] in mine]
    todo_all = list(todo)
    n_runs = sum(t["kind"] == "finetune" for t in tasks.values())
    print(f"sweep {sc.preset}: {n_runs} runs ({n_runs - sum(t['kind'] == 'finetune' for t in tasks.values() if t['id'] not in done)} "
          f"already done), {len(sc.seeds)} seeds, {sc.jobs} at a time, out_dir {sc.out_dir}"
          + (f"; shard {shard[0]}/{shard[1]}: {sum(t['kind'] == 'finetune' for t in todo)} runs of its share left"
             if sc.shard else ""))
    # align first, then the unconstrained runs that radius runs wait for, then the rest
    order = {"pretrain": 0, "align": 0, "estimate": 1, "none": 1, "loss": 2}  # then param and every other strategy
    todo.sort(key=lambda t: order.get(t["kind"] if t["kind"] != "finetune" else t["train"]["constraint"], 3))
    executor = InlineExecutor() if sc.jobs <= 1 else ProcessPoolExecutor(
        sc.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,))
    running, started, stopped = {}, 0, False

    def ready(t):  # every dependency done, or trained in t's own batched group
        return all(d in done or (t.get("group") and tasks[d].get("group") == t["group"]) for d in t["deps"])
    try:
        while todo or running:
            for t in [t for t in todo if ready(t)]:
                if len(running) >= sc.jobs:
                    break
                unit = [m for m in todo if m.get("group") and m["group"] == t.get("group")] or [t]
                if t not in todo or not all(ready(m) for m in unit):
                    continue
                if t["kind"] == "finetune" and sc.max_runs and started >= sc.max_runs:
                    stopped = True
                    continue
                if sc.max_runs:  # a group takes no more runs than --max_runs leaves (in plan order)
                    unit = unit[:sc.max_runs - started] if t["kind"] == "finetune" else unit
                for m in unit:
                    todo.remove(m)
                started += sum(m["kind"] == "finetune" for m in unit)
                running[executor.submit(worker.execute_batch, unit) if len(unit) > 1 else
                        executor.submit(worker.execute, unit[0])] = unit
            if not running:
                if not todo or stopped:
                    break
                done |= wait_for_other_shards(sc, tasks, todo, done, mine)  # a dependency is another shard's
                continue
            ended, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ended:
                unit = running.pop(fut)
                try:
                    results = fut.result() if len(unit) > 1 else [fut.result()]
                except (SweepError, train.ConfigError, DataError, CheckpointError, theory.RunError,
                        FloatingPointError) as e:
                    for t in unit if sc.shard else ():  # the shards waiting for it stop with this message
                        atomic_write_json(os.path.join(t["dir"], "failed.json"), {"error": str(e)})
                    what = unit[0]["id"] if len(unit) == 1 else f"the batched group of {', '.join(t['id'] for t in unit)}"
                    raise SweepError(f"{what} failed: {e} (log: {os.path.join(unit[0]['dir'], 'sweep_train.out')})")
                for t, result in zip(unit, results):
                    done.add(t["id"])
                    rows = record(sc, tasks, t, result, rows, csv_path, time.time() - t_start)
    except KeyboardInterrupt:
        executor.shutdown(wait=False, cancel_futures=True)
        print(f"interrupted: {csv_path} keeps every finished run; run the same command to resume")
        raise SystemExit(130) from None
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if todo_all and not sc.refresh:  # a report only (nothing left, or --refresh) adds no time
            with locked(sc.out_dir):  # shards add their times to one sweep.json
                path = os.path.join(sc.out_dir, "sweep.json")
                state = dict(json.load(open(path)), recipe=state["recipe"])
                state["wall_seconds"] += time.time() - t_start
                state["invocations"] += 1
                atomic_write_json(path, state)
    executor.shutdown()
    if stopped:
        print(f"stopped after --max_runs {sc.max_runs}; run the same command without it to continue")
        return None
    rows = [r for r in read_rows(csv_path) if r["run_id"] in tasks]
    if write_report:
        report_when_complete(sc, recipe, rows, state, n_runs, shard, tasks)
    return rows


def report_when_complete(sc, recipe, rows, state, n_runs, shard, tasks):
    """The preset's report, once every planned task is done: every run has its row, and the estimates
    (real data) are there (with shards: the last one to finish reports)."""
    left = set(tasks) - done_tasks(sc, tasks, rows)
    if left:
        print(f"shard {shard[0]}/{shard[1]}: its share is done; {len(left)} tasks of other shards are not "
              f"(e.g. {sorted(left)[0]}): the last shard to finish writes the report")
        return
    write = (report_paper_real.write_report if PRESETS[sc.preset].get("report") == "paper-real" else
             report.write_report_real if is_real(recipe) else
             report.write_report_strategies if PRESETS[sc.preset].get("report") == "strategies" else report.write_report)
    write(sc, recipe, rows, state, home=PRESETS[sc.preset].get("report_dir"))  # a home report goes into README.md


def wait_for_other_shards(sc, tasks, todo, done, mine, poll=5.0):
    """Block until a dependency of this shard's remaining tasks, run by another shard, is done on disk
    (a θ_0 or a row in results.csv); the ids done now. A shard that was killed blocks the others until it
    is started again, which resumes its share; one whose task failed (failed.json in the task's folder)
    stops them with its message."""
    waiting = sorted({d for t in todo for d in t["deps"] if d not in done})
    if not waiting or all(d in mine for d in waiting):  # nobody else will ever do it
        raise SweepError(f"nothing left can run: {', '.join(t['id'] for t in todo[:3])} wait for "
                         f"{', '.join(waiting[:3]) or 'nothing'}, which this process does not run")
    shard = parse_shard(sc.shard)
    owners = {d: i for i in range(1, shard[1] + 1) for d in shard_ids(tasks, (i, shard[1])) if d in waiting}
    said = 0.0
    while True:
        if time.time() - said > 300:  # say it again every 5 minutes: a silent wait looks like a hang
            print("  waiting for " + ", ".join(f"{d} (shard {owners.get(d, '?')}/{shard[1]})" for d in waiting[:3])
                  + (" …" if len(waiting) > 3 else ""), flush=True)
            said = time.time()
        for d in waiting:
            failed = os.path.join(tasks[d]["dir"], "failed.json")
            if os.path.exists(failed):
                raise SweepError(f"{d}, which this shard waits for, failed in shard {owners.get(d, '?')}/{shard[1]}: "
                                 f"{json.load(open(failed)).get('error')}; fix it and start that shard again")
        now = done_tasks(sc, tasks, read_rows(os.path.join(sc.out_dir, "results.csv")))
        if any(d in now for d in waiting):
            return now
        time.sleep(poll)


def record(sc, tasks, t, result, rows, csv_path, elapsed):
    """Print what a finished task measured; a fine-tune's row replaces any older row of its run
    in results.csv. Returns the rows."""
    if t["kind"] == "pretrain":
        print(f"  θ_pre: held-out general text {result['general_loss']:.3f} nats/token, unigram entropy "
              f"{result['unigram_entropy']:.3f} ({elapsed:.0f} s in)")
    if t["kind"] == "align":
        print(f"  {t['id']}: θ_0 aligned, " + (f"held-out ℓ_s {result['safety_loss']:.1f}" if t.get("real") and
                                                not t.get("refusals") else
              f"refuses {result['refusal_safety_llamas_eval']:.2f} of held-out D_s, "
              f"{result['refusal_rd_harmless_val']:.2f} of harmless prompts" if t.get("real") else
              f"λ_max(H_s) {result['hessian_top_eig_s']:.4g}") + f" ({elapsed:.0f} s in)")
    elif t["kind"] == "estimate":
        print(f"  estimates of overlap and mismatch ({result['seconds']:.0f} s)")
    if t["kind"] != "finetune":
        return rows
    old = [r for r in rows if r["run_id"] == t["id"]]
    if sc.refresh and old:  # the run was not trained again: keep its training's timing
        result.update({k: old[0].get(k) for k in ("train_seconds", "cpu_seconds")})
    # rows in the plan's order, not the order runs happened to finish in: results.csv, and so the
    # report's jitter and tables, do not depend on the schedule (stale rows of unplanned runs last)
    rows = merge_row(csv_path, result, {tid: i for i, tid in enumerate(tasks)})  # other shards' rows too
    what = (f"ℓ_s {result['safety_loss']:.2f} ℓ_f {result['capability_loss']:.2f}"
            + (f" refuses {result['refusal_safety_llamas_eval']:.2f}" if t.get("refusals") else "") if t.get("real") else
            f"G_s {result['safety_gap']:.4f} G_f {result['capability_gap']:.4f}")
    n_runs = sum(x["kind"] == "finetune" for x in tasks.values())
    print(f"  [{sum(r['run_id'] in tasks for r in rows)}/{n_runs}] {t['id']}: {what} "
          f"({result['train_seconds'] + result.get('theory_seconds', result.get('eval_seconds', 0)):.0f} s)")
    return rows


def main(argv=None):
    try:
        sc, recipe = parse_args(argv)
        return run_sweep(sc, recipe)
    except (SweepError, train.ConfigError, DataError, CheckpointError, theory.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
