"""
Sweeps: the findings F1–F6 of THEORY.md §5 with the theory beside every measurement.

    python -m lab.sweep --preset smoke                  # < 2 minutes on 2 CPU cores (the tests run it)
    python -m lab.sweep --preset paper                  # the README's plots, 3 seeds, 31–39 minutes on 2 cores
    python -m lab.sweep --preset paper --lams 0.1,1,10  # any grid can be overridden
    python -m lab.sweep --preset paper --shard 2/4      # one of 4 processes sharing the plan (ledger.py)
    python -m lab.sweep --preset paper-real-cpu         # the paper's roles on real text (needs SAFETY_DATA_DIR), 77 min on 2 cores
    python -m lab.sweep --preset real-cpu               # refusals on real text, from scratch and from paper-real-cpu's θ_pre
    python -m lab.sweep --preset real-gpu               # the same at a larger size, for one GPU (never run here)

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

import theory
import train
from common import DataError, SweepError, atomic_write_json, parser_from, remove_stale_temporaries
from constraints import STRATEGIES
from lab import analysis, batched, report, report_paper_real, worker
from lab.ledger import locked, merge_row, parse_shard, read_rows, shard_ids
from lab.plan import INITS, batch_groups, describe_plan, extra_strategies, is_real, plan, strategy_grid
from lab.presets import PRESETS
from model import CheckpointError
from realtext import loaders

# -----------------------------------------------------------------------------
# Configuration: one dataclass; a preset is a dict of its values (data, not code), and
# any flag given on the command line wins over the preset.


@dataclass
class SweepConfig:
    # run: which preset, where, and how many processes
    preset: str = "smoke"         # a name of lab/presets.py's PRESETS: a dict of the values below
    out_dir: str = ""             # runs, θ_0s, results.csv ('': out_sweep/<preset>)
    report_dir: str = ""          # results.md, results.csv and the plots ('': out_dir)
    jobs: int = 2                 # runs at a time, each in its own process
    threads: int = 1              # CPU threads per run: one per core beats oversubscribed threads
    max_runs: int = 0             # stop after this many fine-tunes (0: all); rerun to resume
    shard: str = ""               # i/n: run only this share of the plan; n shards may share one out_dir (lab/ledger.py)
    batch_runs: int = 0           # train up to this many fine-tunes of one θ_0 as one batched model (lab/batched.py; 0: singly)
    refresh: bool = False         # report theory.py again on every finished run (no training)
    # grids of the synthetic world (THEORY.md §2–§3), comma-separated: --lams 0.1,1,10
    seeds: tuple = (1,)           # each seed aligns its own θ_0 and seeds its fine-tunes
    lams: tuple = (1.0, 10.0)     # λ: Case I weights of the proxy safety loss
    mismatches: tuple = (0.0, 0.3)  # δ grid of the mismatch experiment (F1), at κ = overlap
    overlaps: tuple = (0.0, 0.25)   # κ grid of the overlap experiment (F2), at δ = mismatch
    radii: tuple = (0.05, 0.5)    # r: Case II radii (F3, F6), at (overlap, mismatch)
    strategies: tuple = ()        # more strategies of constraints.STRATEGIES at (κ, δ), each over its grid
    baselines: bool = True        # the design's runs: Case I over lams, plain, Case II over radii (--no-baselines: only --strategies)
    grids: dict = dataclasses.field(default_factory=dict)  # name → values of its sweep_param (--grid NAME=...)
    overlap: float = 0.25         # κ of the mismatch and radius experiments
    mismatch: float = 0.3         # δ of the overlap and radius experiments
    # real data: the grids of the real-text presets (registry names or files, comma-separated)
    tasks: tuple = ("alpaca_safety_only", "alpaca_small", "code_alpaca")  # D_f of the plain fine-tunes (F2)
    proxies: tuple = ("safety_llamas_proxy", "xstest_llama2orig")  # D_s' of Case I: same teacher first (F1)
    task: str = "alpaca_small"    # D_f of the Case I and Case II runs ...
    case_tasks: tuple = ()        # ... or each of these (default: task)
    proxy_lam: float = 0.0        # λ of the Case I runs with proxies[1:] (0: lams[0])
    inits: tuple = ("scratch",)   # where alignment starts: scratch and/or pretrain (θ_pre of the recipe's corpus)
    scratch_seeds: tuple = ()     # the seeds of the scratch arm when inits has both (default: seeds)
    pretrain_seed: int = 1        # the seed of the one θ_pre every pretrained θ_0 starts from ...
    theta_pre: str = ""           # ... or this θ_pre (train.py --stage pretrain), pretrained before (read by a pretrain arm only) ...
    theta_pre_from: str = ""      # ... which, if it is not there yet, this preset's recipe pretrains first (with --train's values)
    refusals: bool = True         # greedy refusal rates of every model (arm R; the paper's arm P has none)
    mismatch_models: bool = False  # the model-based mismatch: θ_pre aligned on each proxy, scored on D_s
    data_dir: str = ""            # the real data folder; default $SAFETY_DATA_DIR
    refusal_limit: int = 128      # prompts per refusal set, greedy decoding ...
    refusal_tokens: int = 24      # ... of this many new tokens
    # theory: the checks of theory.py's numbers
    tol_abs: float = 0.05         # a Case I gap within tol_abs + tol_rel·G(P*) of the optimum reaches it
    tol_rel: float = 0.1          # (relative part of that tolerance)
    power_iters: int = 100        # most power iterations for λ_max(H_s)
    power_tol: float = 1e-4       # relative residual ‖Hv − λv‖/|λ| that stops them
    f6_small_radius: float = 0.25  # F6 is checked at r ≤ this ...
    f6_factor: float = 2.0        # ... as measured/predicted within [1/factor, factor]


def parse_list(text, kind):
    """'0.1,1,10' → (0.1, 1.0, 10.0) for a grid flag."""
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None


LIST_TYPES = {"seeds": int, "scratch_seeds": int, "tasks": str, "proxies": str, "strategies": str, "case_tasks": str,
              "inits": str}  # the kind of each list flag's values (the others: float)


def parser():
    types = {f.name: (lambda s, k=LIST_TYPES.get(f.name, float): parse_list(s, k))
             for f in dataclasses.fields(SweepConfig) if isinstance(f.default, tuple)}
    ap = parser_from(SweepConfig, __doc__.strip().splitlines()[0], types=types, choices={"preset": sorted(PRESETS)},
                     skip=("grids",), preset=True, prog="python -m lab.sweep")
    ap.add_argument("--train", action="append", type=parse_setting, metavar="KEY=VALUE", default=argparse.SUPPRESS,
                    help="a train.py setting of every run, over the preset's recipe (--train max_iters=50); repeatable")
    ap.add_argument("--grid", action="append", type=parse_grid, metavar="NAME=V1,V2,...", default=argparse.SUPPRESS,
                    help="the values of strategy NAME's sweep parameter (default: its Strategy.grid); repeatable")
    return ap


def parse_args(argv=None):
    """SweepConfig from the preset, then the flags actually given."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    if "train" in given:
        given["train"] = dict(given["train"])
    if "grid" in given:  # added to the preset's grids, one strategy at a time
        given["grids"] = {**PRESETS[given.get("preset", "smoke")].get("grids", {}), **dict(given.pop("grid"))}
    return make_config(**given)


# the TrainConfig fields the plan sets for each run (lab/plan.py), which --train cannot override
PLANNED = ("seed", "overlap", "mismatch", "constraint", "stage", "out_dir", "theta0", "lam", "radius", "gamma",
           "progress", "resume", "eval_interval", "init_from", "task_data", "proxy_data")


def parse_setting(text):
    """'max_iters=50' → ('max_iters', 50), the value of the type of TrainConfig's field."""
    name, eq, value = text.partition("=")
    fields = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    if not eq or name.strip() not in fields:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY a train.py flag (python train.py --help)")
    if name.strip() in PLANNED:
        raise argparse.ArgumentTypeError(f"--train {text}: the sweep sets {name.strip()} run by run (its grids and "
                                         f"folders: --seeds, --overlaps, --lams, --radii, --strategies, ...)")
    default = fields[name.strip()]
    try:
        kind = (lambda v: {"true": True, "false": False}[v.lower()]) if isinstance(default, bool) else type(default)
        return name.strip(), kind(value.strip())
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"--train {text}: {value!r} is not a {type(default).__name__}") from None


def parse_grid(text):
    """'fisher=10,100' → ('fisher', (10.0, 100.0)) for --grid."""
    name, eq, values = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=V1,V2,...")
    return name.strip(), parse_list(values, float)


def make_config(preset="smoke", train=None, **overrides):
    """SweepConfig and the train recipe of a preset with overrides (also for tests); train: TrainConfig
    values that replace the preset's recipe's in every run (--train KEY=VALUE)."""
    if preset not in PRESETS:
        raise SweepError(f"--preset {preset!r} is unknown: choose one of {', '.join(sorted(PRESETS))}")
    values = {k: v for k, v in PRESETS[preset].items() if k not in ("train", "report", "note", "cells")}  # report: which writer
    if overrides.get("out_dir"):
        values.pop("report_dir", None)  # a sweep elsewhere never overwrites the preset's published report
    values.update(overrides)
    sc = SweepConfig(preset=preset, **values)
    sc.out_dir = sc.out_dir or os.path.join("out_sweep", preset)
    sc.report_dir = sc.report_dir or sc.out_dir
    recipe = dict(PRESETS[preset]["train"], **(train or {}))
    check_config(sc, recipe)
    if is_real(recipe):
        try:
            recipe["data_dir"] = loaders.resolve_data_dir(sc.data_dir)  # as given: the report shows it
        except DataError:
            raise SweepError(f"--preset {preset} reads real data: pass --data_dir DIR or set SAFETY_DATA_DIR to the "
                             f"data folder (README 'Real data' says where each file comes from)") from None
    if sc.theta_pre_from and sc.theta_pre_from not in PRESETS:
        raise SweepError(f"--theta_pre_from {sc.theta_pre_from!r} is unknown: choose one of {', '.join(sorted(PRESETS))}")
    if sc.theta_pre and "pretrain" in sc.inits and not os.path.isfile(sc.theta_pre) and not sc.theta_pre_from:
        raise SweepError(f"--theta_pre {sc.theta_pre} does not exist: pretrain it first (`python -m lab.sweep --preset "
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
    if not sc.baselines and not sc.strategies:
        raise SweepError("--no-baselines leaves nothing to run: name the strategies to sweep with --strategies NAME,...")
    if (sc.strategies or sc.grids or not sc.baselines) and is_real(recipe or {}):
        raise SweepError("--strategies/--grid are for the synthetic presets: the real-text plan runs none, loss "
                         "and param only")
    try:
        train.check_config(train.TrainConfig(**{**recipe, "stage": "finetune"})) if recipe is not None else None
    except (TypeError, train.ConfigError) as e:
        raise SweepError(f"--train: {e}") from None
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
        if t["kind"] == "gradients" and all(d in done for d in t["deps"]) and worker.has_gradients(t):
            done.add(t["id"])
        path = os.path.join(t["dir"], "estimates.json")  # a resumed sweep may add sets
        if t["kind"] == "estimate" and os.path.exists(path):
            est = json.load(open(path))
            if (est.get("safety") == t["safety"] and set(t["tasks"]) <= set(est["overlap"])
                    and all("tv" in e for e in est["overlap"].values())  # calibrated (forecast.py)
                    and set(t["proxies"]) <= set(est["mismatch"]) and "coverage" in est):
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
    n_runs = sum(t["kind"] == "finetune" for t in tasks.values())
    print(describe_plan(sc, recipe, {t["id"]: t for t in todo}, done), flush=True)
    print(f"sweep {sc.preset}: {n_runs} runs ({n_runs - sum(t['kind'] == 'finetune' for t in tasks.values() if t['id'] not in done)} "
          f"already done), {len(sc.seeds)} seeds, {sc.jobs} at a time, out_dir {sc.out_dir}"
          + (f"; shard {shard[0]}/{shard[1]}: {sum(t['kind'] == 'finetune' for t in todo)} runs of its share left"
             if sc.shard else ""))
    try:
        stopped = run_tasks(sc, tasks, list(todo), done, mine, csv_path, t_start)
    finally:
        if todo and not sc.refresh:  # a report only (nothing left, or --refresh) adds no time
            state = add_wall_time(sc, state, t_start)
    if stopped:
        print(f"stopped after --max_runs {sc.max_runs}; run the same command without it to continue")
        return None
    rows = [r for r in read_rows(csv_path) if r["run_id"] in tasks]
    if write_report:
        report_when_complete(sc, recipe, rows, state, n_runs, shard, tasks)
    return rows


def add_wall_time(sc, state, t_start):
    """Add this invocation's wall time to sweep.json (shards add theirs to one file, under the lock);
    the state it holds now."""
    with locked(sc.out_dir):
        path = os.path.join(sc.out_dir, "sweep.json")
        state = dict(json.load(open(path)), recipe=state["recipe"])
        state["wall_seconds"] += time.time() - t_start
        state["invocations"] += 1
        atomic_write_json(path, state)
    return state


def run_tasks(sc, tasks, todo, done, mine, csv_path, t_start):
    """Run the tasks of `todo` as their dependencies finish, sc.jobs at a time (a batched group as one
    unit), recording each finished run's row. Returns whether --max_runs stopped it early."""
    # align first (and read each θ_0, before any fine-tune of it), then the unconstrained runs that radius runs wait
    # for, then the rest
    order = {"pretrain": 0, "align": 0, "gradients": 0, "estimate": 1, "none": 1, "loss": 2}  # then param and every other strategy
    todo.sort(key=lambda t: order.get(t["kind"] if t["kind"] != "finetune" else t["train"]["constraint"], 3))
    executor = InlineExecutor() if sc.jobs <= 1 else ProcessPoolExecutor(
        sc.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,))
    running, started, stopped, rows = {}, 0, False, read_rows(csv_path)

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
                results = unit_results(sc, fut, unit)
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
    executor.shutdown()
    return stopped


def unit_results(sc, fut, unit):
    """The rows of a finished unit (one task, or a batched group); a failure stops the sweep with its
    message (and, with shards, leaves failed.json for the shards that wait for it)."""
    try:
        return fut.result() if len(unit) > 1 else [fut.result()]
    except (SweepError, train.ConfigError, DataError, CheckpointError, theory.RunError, FloatingPointError) as e:
        for t in unit if sc.shard else ():  # the shards waiting for it stop with this message
            atomic_write_json(os.path.join(t["dir"], "failed.json"), {"error": str(e)})
        what = unit[0]["id"] if len(unit) == 1 else f"the batched group of {', '.join(t['id'] for t in unit)}"
        raise SweepError(f"{what} failed: {e} (log: {os.path.join(unit[0]['dir'], 'sweep_train.out')})") from None


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
             report.write_report_strategies if PRESETS[sc.preset].get("report") == "strategies" or not sc.baselines
             else report.write_report)
    write(sc, recipe, rows, state, home=PRESETS[sc.preset].get("report_dir"))
    if PRESETS[sc.preset].get("note"):
        print(PRESETS[sc.preset]["note"])  # a home report goes into README.md


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
    elif t["kind"] == "gradients":
        print(f"  {t['id']}: answer-aware forecast of {len(result['tasks'])} tasks ({result['seconds']:.0f} s)")
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
          f"({result['train_seconds'] + result.get('theory_seconds', result.get('eval_seconds', 0)):.1f} s)")
    return rows


def main(argv=None):
    try:
        sc, recipe = parse_args(argv)
        return run_sweep(sc, recipe)
    except (SweepError, train.ConfigError, DataError, CheckpointError, theory.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
