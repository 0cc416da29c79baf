"""
One task of a sweep, run in a worker process (or in sweep.py's own when --jobs 1): align a θ_0
and measure its landscape (THEORY.md §3), fine-tune one run and report its theory (§2–§3), or,
on real text, estimate overlap and mismatch (§4) and measure refusal rates. Each returns the
row that sweep.py writes into results.csv; train.py's own output goes to a log file in the
task's folder.
"""

import dataclasses
import fcntl
import json
import os
import time
from contextlib import ExitStack, redirect_stderr, redirect_stdout

import torch

import theory
import train
from common import ConfigError, DataError, SweepError, atomic_write_json
from data import SyntheticWorld, WorldConfig
from lab import analysis, batched, estimators, forecast, refusals
from lab import gradients as gradients_lib
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from realtext import startpoints
from realtext.textdata import Codec, RealData, answer_coverage, codec_of, dataset_part, train_and_heldout


def has_theta0(align_dir, cfg):
    """Is there a θ_0 in align_dir that train.py (as the code stands now) accepts for cfg?"""
    theta0 = os.path.join(align_dir, "theta0.pt")
    if cfg.init_from not in ("scratch", "gpt2") and not os.path.exists(cfg.init_from):
        return False  # its θ_pre is not trained yet
    return os.path.exists(theta0) and load_checkpoint(theta0).get("align_key") == train.align_key(cfg)


def has_theta_pre(pre_dir, cfg):
    """Is there a θ_pre in pre_dir pretrained with cfg's recipe?"""
    path = os.path.join(pre_dir, "theta_pre.pt")
    return os.path.exists(path) and load_checkpoint(path).get("pretrain_key") == startpoints.pretrain_key(cfg)


def has_gradients(task):
    """Whether the θ_0 of a gradients task holds its answer-aware forecast of every task."""
    path = os.path.join(task["dir"], "answer_forecast.json")
    if not (os.path.exists(path) and os.path.exists(os.path.join(task["dir"], "theta0.pt"))):
        return False
    out = json.load(open(path))
    return set(task["tasks"]) <= set(out["tasks"]) and out["theta0_hash"] == load_checkpoint(
        os.path.join(task["dir"], "theta0.pt"))["theta0_hash"]


def resumable(run_dir):
    """Has a killed task left a checkpoint in run_dir that train.py --resume continues?"""
    return any(os.path.exists(os.path.join(run_dir, f)) for f in (*train.RESUME_FILES.values(), "theta0.pt"))


def finished(run_dir):
    """Is run_dir a finished fine-tune that theory.py can read?"""
    try:
        theory.load_run(run_dir)
        return True
    except (theory.RunError, CheckpointError, DataError):
        return False


def execute(task):
    """Align a θ_0 and compute its landscape, or fine-tune one run and report its theory (real data:
    estimate, or measure refusals). train.py's own output goes to a log file in the task's folder.
    The task's folder is locked while it runs: a worker left running by a sweep killed with SIGKILL
    finishes first, and the sweep started again then finds its work done (resume) instead of
    training the same run twice at once."""
    with ExitStack() as stack:
        take(task, stack)
        return _execute(task)


def _execute(task):
    torch.set_num_threads(task["threads"])
    if task["kind"] == "estimate":
        return estimate(task)
    if task["kind"] == "gradients":
        return gradients(task)
    t0, cpu0 = time.time(), time.process_time()  # CPU time too: wall time depends on who else runs
    cfg = dataclasses.replace(train.TrainConfig(**task["train"]), resume=resumable(task["dir"]))
    os.makedirs(task["dir"], exist_ok=True)
    # --refresh on a trained run: its theory (real data: its refusals) is reported again, not its training
    refresh = task.get("refresh") and (os.path.exists(os.path.join(task["dir"], "metrics.json")) if task.get("real")
                                       else task["kind"] == "finetune" and finished(task["dir"]))
    if task["kind"] == "pretrain":
        return pretrain(task, cfg, t0, cpu0)
    if not refresh and (task["kind"] == "finetune" or not has_theta0(task["dir"], cfg)):
        with open(os.path.join(task["dir"], "sweep_train.out"), "w") as f, redirect_stdout(f), redirect_stderr(f):
            train.main(cfg, argv=[])
    train_s, t1 = time.time() - t0, time.time()
    if task.get("real"):
        return measure_real(task, train_s, t1, cpu0)
    if task["kind"] == "align":
        theta0, landscape = os.path.join(task["dir"], "theta0.pt"), os.path.join(task["dir"], "landscape.json")
        ckpt = load_checkpoint(theta0)
        # aligned again (train.py's θ_0 identity changed with its code): alignment is
        # deterministic, so the weights must be those the sweep's finished runs started from
        if os.path.exists(landscape) and json.load(open(landscape))["theta0_hash"] != ckpt["theta0_hash"]:
            raise SweepError(f"{theta0} came out different from the θ_0 this sweep's runs were fine-tuned from "
                             f"(the training code changed): start a fresh --out_dir")
        known = dataclasses.asdict(WorldConfig())  # a θ_0 saved before a field was added has its default
        world = SyntheticWorld(WorldConfig(**{k: v for k, v in ckpt["world_config"].items() if k in known}))
        land = theory.theta0_landscape(model_from_checkpoint(ckpt).eval(), world, task["power_iters"], task["power_tol"])
        land.update(theta0_hash=ckpt["theta0_hash"], train_seconds=train_s, landscape_seconds=time.time() - t1,
                    cpu_seconds=time.process_time() - cpu0)
        atomic_write_json(landscape, land)
        return land
    return theory_row(task, train_s, t1, cpu0)


def theory_row(task, train_s, t1, cpu0):
    """A finished synthetic fine-tune's theory (theory.py, to theory.json) and its results.csv row."""
    land = json.load(open(os.path.join(task["landscape_dir"], "landscape.json")))
    landscape = {k: land[k] for k in ("safety_loss_theta0", "grad_norm_s", "hessian_top_eig_s", "hessian_iters",
                                      "hessian_residual")}
    out = theory.report(task["dir"], task["reference"], landscape, task["power_iters"], task["power_tol"])
    out = theory.json_safe(case1_verdict(out, task["tol_abs"], task["tol_rel"]))
    atomic_write_json(os.path.join(task["dir"], "theory.json"), out)
    metrics = json.load(open(os.path.join(task["dir"], "metrics.json")))
    row = {"run_id": task["id"], **out, **{f"aligned_{k}": v for k, v in metrics["aligned"].items()},
           **{f"finetuned_{k}": v for k, v in metrics["finetuned"].items()}}
    row.update(train_seconds=round(train_s, 2), theory_seconds=round(time.time() - t1, 2),
               cpu_seconds=round(time.process_time() - cpu0, 2))
    return row


def case1_verdict(out, tol_abs, tol_rel):
    """Does a Case I run reach the exact optimum P*_λ? Its gaps within tol_abs + tol_rel·G(P*) nats
    of the optimum's count as reaching it (misses are reported, not hidden); other runs as they are."""
    if "case1_safety_excess" not in out:
        return out
    tol_s = tol_abs + tol_rel * out["optimum_safety_gap"]
    tol_f = tol_abs + tol_rel * out["optimum_capability_gap"]
    return dict(out, case1_safety_tolerance=tol_s, case1_capability_tolerance=tol_f,
                case1_within_tolerance=abs(out["case1_safety_excess"]) <= tol_s
                and abs(out["case1_capability_excess"]) <= tol_f)


def execute_batch(tasks):
    """Fine-tune several runs of one θ_0 as one batched model (batched.py, sweep.py --batch_runs),
    then report each one's theory as execute does; the rows in order. A run already trained to its
    end with this configuration (--refresh, or a sweep killed before its row was written) is not
    trained again (train.py --resume would find it at its last step). Each trained run's train_seconds and
    cpu_seconds are its share of the group's; the group's output goes to its first run's
    sweep_train.out. Runs that batched.py refuses to group are trained one at a time, saying why."""
    with ExitStack() as stack:
        for t in tasks:
            take(t, stack)
        torch.set_num_threads(tasks[0]["threads"])
        t0, cpu0 = time.time(), time.process_time()
        todo = [t for t in tasks if not (finished(t["dir"]) if t.get("refresh") else trained(t))]  # --refresh: theory only
        cfgs = [dataclasses.replace(train.TrainConfig(**t["train"]), resume=resumable(t["dir"])) for t in todo]
        why = None
        try:
            batched.check_group(cfgs)
        except ConfigError as e:
            why = str(e)
        if why is None and todo:
            with open(os.path.join(todo[0]["dir"], "sweep_train.out"), "w") as f, redirect_stdout(f), redirect_stderr(f):
                batched.finetune_group(cfgs)
            for t in todo[1:]:  # where each run's training output is
                with open(os.path.join(t["dir"], "sweep_train.out"), "w") as f:
                    f.write(f"trained in one batched group with {todo[0]['id']}: see {todo[0]['dir']}/sweep_train.out\n")
        if why:  # the sweep's own output
            print(f"  {todo[0]['id']} and {len(todo) - 1} more are not batched ({why}): trained one at a time",
                  flush=True)
        for t, cfg in zip(todo, cfgs) if why else ():
            with open(os.path.join(t["dir"], "sweep_train.out"), "w") as f, redirect_stdout(f), redirect_stderr(f):
                train.main(cfg, argv=[])
        share = ((time.time() - t0) / max(1, len(todo)), (time.process_time() - cpu0) / max(1, len(todo)))
        rows = []
        for t in tasks:
            train_s, cpu_s = share if t in todo else (0.0, 0.0)
            rows.append(theory_row(t, train_s, time.time(), time.process_time() - cpu_s))
        return rows


def trained(task):
    """Is the task's fine-tune finished, with the configuration the sweep plans for it now?"""
    if not finished(task["dir"]):
        return False
    saved = json.load(open(os.path.join(task["dir"], "config.json")))["config"]
    cfg = dataclasses.asdict(train.TrainConfig(**task["train"]))
    how = {"resume": None, "progress": None}  # how it ran, not what it computes
    return {**dataclasses.asdict(train.TrainConfig()), **saved, **how} == {**cfg, **how}


def take(task, stack):
    """Lock the task's folder for as long as `stack` is open (a task runs in one worker at a time), and
    drop a failed.json left by an earlier attempt: the shards waiting for this task wait again."""
    os.makedirs(task["dir"], exist_ok=True)
    fcntl.flock(stack.enter_context(open(os.path.join(task["dir"], ".lock"), "a")), fcntl.LOCK_EX)
    if os.path.exists(os.path.join(task["dir"], "failed.json")):
        os.remove(os.path.join(task["dir"], "failed.json"))


def pretrain(task, cfg, t0, cpu0):
    """θ_pre (train.py --stage pretrain) unless it exists; its corpus statistics and held-out loss."""
    if not has_theta_pre(task["dir"], cfg):
        with open(os.path.join(task["dir"], "sweep_train.out"), "w") as f, redirect_stdout(f), redirect_stderr(f):
            train.main(cfg, argv=[])
    stats = load_checkpoint(os.path.join(task["dir"], "theta_pre.pt"))["corpus"]
    path = os.path.join(task["dir"], "pretrain.json")
    out = dict(stats, train_seconds=round(time.time() - t0, 2), cpu_seconds=round(time.process_time() - cpu0, 2))
    if os.path.exists(path):  # trained before this invocation: keep its training's timing
        out.update({k: json.load(open(path)).get(k) for k in ("train_seconds", "cpu_seconds")})
    atomic_write_json(path, out)
    return out


def measure_real(task, train_s, t1, cpu0):
    """Refusal rates (Wilson intervals) of a real θ_0 (to refusals.json) or fine-tune on each of
    analysis.REFUSAL_SETS, as flat columns (without task["refusals"], none); a fine-tune's row adds
    its held-out losses and the proxy's (evaluate.proxy_metrics)."""
    import evaluate
    ckpt = load_checkpoint(os.path.join(task["dir"], "theta0.pt" if task["kind"] == "align" else "ckpt.pt"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = refusal_columns(task, ckpt, device) if task.get("refusals", True) else {}
    row.update(train_seconds=round(train_s, 2), eval_seconds=round(time.time() - t1, 2),
               cpu_seconds=round(time.process_time() - cpu0, 2))
    if task["kind"] == "align":
        path = os.path.join(task["dir"], "refusals.json")
        if task.get("refresh") and os.path.exists(path):  # θ_0 was not trained again: keep its training's timing
            row.update({k: json.load(open(path)).get(k) for k in ("train_seconds", "cpu_seconds")})
        row.update(theta0_record(task, ckpt, device))
        atomic_write_json(path, row)
        return row
    metrics = json.load(open(os.path.join(task["dir"], "metrics.json")))
    a, f = metrics["aligned"], metrics["finetuned"]
    cfg = train.TrainConfig(**task["train"])
    world = train.make_world(cfg, ckpt["world_config"].get("vocab", ()))
    proxy = evaluate.proxy_metrics(model_from_checkpoint(ckpt).to(device).eval(), world, device)
    seqs = cfg.batch_tokens // world.seq_len  # proxy sequences per step under Case I
    proxy["proxy_epochs"] = cfg.max_iters * seqs / proxy["proxy_examples"] if cfg.constraint == "loss" else 0.0
    row.update(eval_seconds=round(time.time() - t1, 2), cpu_seconds=round(time.process_time() - cpu0, 2))
    return {"run_id": task["id"], **task["meta"], "safety_loss": f["safety_loss"],
            "capability_loss": f["capability_loss"], "safety_increase": f["safety_loss"] - a["safety_loss"],
            "capability_gain": a["capability_loss"] - f["capability_loss"], "distance": f["distance"],
            "aligned_safety_loss": a["safety_loss"], "aligned_capability_loss": a["capability_loss"], **proxy, **row}


def theta0_record(task, ckpt, device):
    """A real θ_0's held-out losses; where alignment stopped (realtext/validation.py); the size of
    ∇ℓ_s at θ_0 from the two halves of held-out D_s, ⟨g_A, g_B⟩ (unbiased for ‖∇ℓ_s‖², THEORY.md §1
    'θ_0 at the optimum'); and, for a proxy's model (task["score_on"]), its loss on D_s's held-out part."""
    world = train.make_world(train.TrainConfig(**task["train"]), ckpt["world_config"].get("vocab", ()))
    model = model_from_checkpoint(ckpt).to(device).eval()
    import evaluate
    out = evaluate.heldout_metrics(model, world, device)
    out = {"safety_loss": out["safety_loss"], "capability_loss": out["capability_loss"]}
    halves, _ = gradients_lib.safety_halves(model.cpu(), world.eval_sets["safety"], world.codec.eot,
                                            world.keys["safety_eval"])
    out.update(grad_dot_halves=float(halves[0] @ halves[1]), grad_split_cos=float(
        torch.nn.functional.cosine_similarity(halves[0], halves[1], dim=0)),
        grad_norm=float(((halves[0] + halves[1]) / 2).norm()))
    stop = ckpt.get("early_stop")
    if stop:
        out.update(stop_step=float(stop["stop_step"]), last_step=float(stop["last_step"]),
                   validation_loss=stop["validation_loss"], validation_curve=stop["validation_curve"])
    if task.get("score_on"):
        rc = dataclasses.replace(world.wc, safety=task["score_on"])
        out["loss_on_original"] = evaluate.heldout_nll(model, RealData(rc).eval_batches("safety"), "cpu")
    return out


def refusal_columns(task, ckpt, device):
    """Greedy refusal rates of the checkpoint's model on analysis.REFUSAL_SETS, with Wilson intervals, and
    the refusal margin (refusals.refusal_margin) on the sets of analysis.MARGIN_SETS."""
    model, codec = model_from_checkpoint(ckpt).to(device).eval(), codec_of(ckpt)
    row = {}
    for name in analysis.MARGIN_SETS:
        prompts = dataset_part(name, ckpt["world_config"].get("data_dir", "")).prompts[:task["refusal_limit"]]
        r = refusals.refusal_margin(model, codec, prompts, device)
        row.update({f"margin_{name}": r["margin"], f"margin_{name}_sd": r["margin_sd"]})
    rep = refusals.refusal_report(model, codec,
                                  ckpt["world_config"].get("data_dir", ""),
                                  harmful=[k for k, v in analysis.REFUSAL_SETS.items() if v == "harmful"],
                                  harmless=[k for k, v in analysis.REFUSAL_SETS.items() if v == "harmless"],
                                  limit=task["refusal_limit"], max_new_tokens=task["refusal_tokens"], device=device)
    for name, r in rep.items():
        row.update({f"refusal_{name}": r["rate"], f"refusal_{name}_low": r["ci_low"],
                    f"refusal_{name}_high": r["ci_high"], f"refusal_{name}_n": float(r["n"]),
                    f"refusal_{name}_unreadable": r["unreadable"] / max(r["n"], 1),  # empty or mostly UNK
                    f"refusal_{name}_coverage": r["prompt_coverage"]})
    return row


def gradients(task):
    """The answer-aware forecast (lab/gradients.py, THEORY.md §4) of every task of the sweep at one
    θ_0, before any fine-tune of it, to answer_forecast.json beside it: per task its grad_dot,
    grad_cos and first-order Δℓ_s with intervals (the per-example scores left out: the forecast's
    own --json has them)."""
    t0 = time.time()
    path = os.path.join(task["dir"], "theta0.pt")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    out = {"theta0_hash": ckpt["theta0_hash"], "tasks": {}}
    recipe = dataclasses.asdict(train.TrainConfig(**task["recipe"]))  # the plain fine-tune's schedule
    for name in task["tasks"]:
        terms = gradients_lib.answer_terms(model, gradients_lib.task_source(ckpt, name), recipe, max_n=128)
        out["tasks"][name] = {k: v for k, v in terms.items() if k != "example_scores"}
    out["seconds"] = round(time.time() - t0, 2)
    atomic_write_json(os.path.join(task["dir"], "answer_forecast.json"), out)
    return out


def estimate(task):
    """The overlap forecast of each task set against D_s (forecast.py: calibrated TV, M, the (A2)
    terms) and the mismatch estimate of each proxy (THEORY.md §4), labelled estimates, to
    estimates/estimates.json."""
    t0 = time.time()
    fc = forecast.forecast(task["safety"], task["tasks"], data_dir=task["data_dir"])
    out = {"estimate": True, "safety": task["safety"], "overlap": fc["tasks"], "mismatch": {}}
    block = task.get("block_size")
    # every proxy's references on one budget of answer tokens: 90% of the smallest proxy's scored span,
    # so that every set is subsampled in each draw (estimators.ngram_mismatch)
    tokens = int(0.9 * min(int(dataset_part(p, task["data_dir"]).cut(block).r_off[-1]) for p in task["proxies"]))
    for name in task["proxies"]:
        m = estimators.real_mismatch(name, task["safety"], data_dir=task["data_dir"], tokens=tokens, block_size=block)
        out["mismatch"][name] = {"mismatch": m["mismatch"], "sd": m["mismatch_sd"], "interval": m["mismatch_interval"],
                                 "tokens": tokens, "n_original": m["n_train_original"], "n_proxy": m["n_train_proxy"]}
    # the share of each set's answer tokens the loss scores at the recipe's block size (textdata.answer_coverage)
    codec = Codec(None)  # GPT-2's own ids: answer lengths do not depend on the compact vocabulary
    parts = {task["safety"]: train_and_heldout(task["safety"], task["data_dir"])[0],
             **{n: dataset_part(n, task["data_dir"]) for n in task["proxies"]},
             **{n: train_and_heldout(n, task["data_dir"])[0] for n in task["tasks"]}}
    out["coverage"] = {n: answer_coverage(ts, codec, block) for n, ts in parts.items()}
    out["seconds"] = round(time.time() - t0, 2)
    os.makedirs(task["dir"], exist_ok=True)
    atomic_write_json(os.path.join(task["dir"], "estimates.json"), out)
    return out
