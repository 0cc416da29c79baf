"""
Align, then fine-tune under a constraint (THEORY.md §2–§3).

    python train.py                                      # align θ_0, fine-tune with no constraint
    python train.py --constraint loss --lam 10           # Case I:  ℓ_f + λ·ℓ_s'
    python train.py --constraint param --radius 0.1      # Case II: ‖θ − θ_0‖ ≤ r
    torchrun --standalone --nproc_per_node=2 train.py    # DDP (nccl on GPUs, gloo on CPU)

Stage `align` trains θ_0 on the original safety data D_s, from --init_from (scratch, a
checkpoint such as θ_pre, or gpt2 with --hf_dir: realtext/startpoints.py); stage `finetune` starts from
θ_0 and fits the task data D_f under the chosen strategy; `all` (default) runs both and
reuses a saved θ_0 whose configuration matches. Stage `pretrain` (real data) trains θ_pre on
the general text corpus of realtext/corpus.py, for --init_from. Every run writes into --out_dir:
config.json, log.jsonl (one object per evaluation), checkpoints and metrics.json.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common import ConfigError, DataError, atomic_write_json, given_flags, parser_from, read_config
from constraints import ALIGN_METHODS, STRATEGIES, make_aligner, make_strategy
from data import Streams, batch_shape, world_config  # noqa: F401 (lab/ reads train.world_config)
from evaluate import evaluate, heldout_nll
from model import CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, flat_params, load_checkpoint, params_hash
from realtext.corpus import DEFAULT_CORPUS
from realtext.sources import make_corpus, make_world
from realtext.startpoints import (check_init, init_identity, init_vocab, initial_model, new_model, pretrain_key,
                                  shape_from_init)
from realtext.textdata import SPLIT_VERSION
from realtext.validation import EarlyStop, check_validation
from system import (Log, all_reduce_mean, new_run_folder, prepare_out_dir, print_table, record_metrics, resume_points,
                    run_info, setup_system)

# -----------------------------------------------------------------------------
# Configuration: one dataclass, one line per value; the CLI is generated from it.


@dataclass
class TrainConfig:
    # run: where it writes and which stages it runs
    out_dir: str = ""             # run folder: config.json, log.jsonl, checkpoints, metrics.json ('': a new out/<run>-<time>)
    stage: str = "all"            # pretrain | align | finetune | all (align, then finetune)
    init_from: str = "scratch"    # alignment starts from: scratch | a checkpoint path (θ_pre) | gpt2 (with --hf_dir)
    hf_dir: str = ""              # a local Hugging Face GPT-2 folder, for --init_from gpt2 (its shape is the model's)
    theta0: str = ""              # θ_0 to fine-tune from ('': <out_dir>/theta0.pt, or out/theta0-<recipe key>/ with no --out_dir)
    resume: bool = False          # continue the run in out_dir from its latest checkpoint
    eval_interval: int = 250      # steps between evaluations and checkpoints
    log_interval: int = 25        # steps between progress-bar loss updates (one host sync each)
    # world: the synthetic world of THEORY.md §1 (--data synthetic)
    overlap: float = 0.25         # κ: share of task contexts drawn from the safety contexts, in [0, 1]
    mismatch: float = 0.3         # δ: how far the proxy safety data D_s' is from the original D_s, in [0, 1]
    answer_overlap: float = 0.0   # ρ: share of each other's answers in P_s and P_f on the safety contexts, in [0, 1]
    align_label_smoothing: float = 0.0  # ε: align on (1−ε)·one-hot + ε·uniform targets, in [0, 1] (a wider basin)
    n_symbols: int = 12           # context alphabet size; the world has n_symbols**ctx_len contexts
    ctx_len: int = 3              # context length in symbols
    n_harmful: int = 4            # number of harmful topics
    # real data: text instead of the world (--data real; docs/real-data.md)
    data: str = "synthetic"       # synthetic | real (real: the flags of configs/real.json default to its values)
    safety_data: str = "safety_llamas"        # D_s: a name of realtext.loaders.REGISTRY or a file path
    proxy_data: str = "safety_llamas_proxy"   # D_s': proxy safety data of Case I (a name or a file)
    task_data: str = "alpaca_small"           # D_f: the fine-tuning task (a name or a file)
    align_helpful: str = ""       # helpful (prompt, response) data mixed into the align batches ('' none; 'a+b' mixes)
    data_dir: str = ""            # the real data folder (default: $SAFETY_DATA_DIR)
    block_size: int = 128         # most tokens per example, prompt + response
    restrict_vocab: bool = True   # output vocabulary = the data folder's tokens (a smaller output layer: CPU speed)
    vocab_cap: int = 0            # keep only the N most frequent of those tokens, the rest one UNK (0: all)
    eval_examples: int = 256      # held-out examples of D_s and of D_f per evaluation
    # pretraining: θ_pre on general text (--stage pretrain, real data)
    pretrain_data: str = DEFAULT_CORPUS   # '+'-joined sources of realtext.corpus.SOURCES (or registry names)
    pretrain_iters: int = 2000    # steps of the pretrain stage
    pretrain_lr: float = 3e-3     # peak learning rate of the pretrain stage
    # model: a GPT of this shape (for --init_from gpt2, the folder's own)
    n_layer: int = 2              # transformer blocks
    n_head: int = 4               # attention heads per block
    n_embd: int = 64              # width of the residual stream
    # optimisation: AdamW, linear warm-up, then cosine decay to lr/10
    align_iters: int = 1500       # steps of the align stage
    align_lr: float = 3e-3        # peak learning rate of the align stage
    align_method: str = "plain"   # plain | sam: how the align stage steps (constraints.ALIGN_METHODS)
    sam_rho: float = 0.05         # ρ: radius of SAM's ascent, ‖ε‖₂ ≤ ρ (--align_method sam)
    align_patience: int = 0       # real data: stop after N evaluations with no new least validation ℓ_s (0: never) ...
    align_eval_interval: int = 25  # ... evaluated every this many align steps (then the align stage's --eval_interval)
    max_iters: int = 1000         # steps of the fine-tune stage
    lr: float = 2e-3              # peak learning rate of the fine-tune stage
    warmup_iters: int = 50        # steps of linear warm-up in every stage
    weight_decay: float = 0.0     # AdamW decay on matrices (0: decay would pull θ towards 0, not towards θ_0)
    grad_clip: float = 1.0        # clip the global gradient norm to this (0: no clipping)
    batch_tokens: int = 1280      # global batch per dataset in tokens (on the world: 256 sequences of 5)
    micro_batch: int = 256        # sequences per forward pass; gradient accumulation makes up the rest
    # constraint: the fine-tuning strategy (THEORY.md §2–§3)
    constraint: str = "none"      # none | loss (Case I) | param (Case II) | penalty | fisher (constraints.STRATEGIES)
    radius: float = 1.0           # r: L2 radius of the ball around θ_0 (param)
    lam: float = 1.0              # λ: weight of the proxy safety loss ℓ_s' (loss)
    gamma: float = 1.0            # γ: weight of the soft penalty (γ/2)‖θ−θ_0‖² (penalty, fisher)
    fisher_examples: int = 64     # examples of D_s' behind the diagonal Fisher metric at θ_0 (fisher)
    # system
    seed: int = 1337              # seeds the initial weights and every batch stream
    device: str = "auto"          # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"           # auto (bf16 on CUDA if supported, else fp32) | float32 | bfloat16 | float16
    compile: bool = False         # torch.compile the training forward (GPU; slow to start on CPU)
    progress: bool = True         # show a progress bar


# the fields that decide θ_0: a saved θ_0 is reused only when all of these match
ALIGN_FIELDS = ("n_symbols", "ctx_len", "n_harmful", "n_layer", "n_head", "n_embd", "align_iters",
                "align_lr", "warmup_iters", "weight_decay", "grad_clip", "batch_tokens", "seed",
                "data", "safety_data", "align_helpful", "data_dir", "block_size", "restrict_vocab", "vocab_cap",
                "answer_overlap", "align_label_smoothing", "align_patience", "align_method", "sam_rho")


# `--data real` defaults to configs/real.json (the real-cpu preset's recipe: minutes on 2 CPU cores);
# the dataclass keeps the synthetic values, part of every saved θ_0's key (ALIGN_FIELDS)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


CHOICES = {"stage": ("pretrain", "align", "finetune", "all"), "data": ("synthetic", "real"),
           "constraint": tuple(STRATEGIES), "align_method": tuple(ALIGN_METHODS),
           "dtype": ("auto", "float32", "bfloat16", "float16")}


def parser():
    return parser_from(TrainConfig, __doc__.strip().splitlines()[0], choices=CHOICES,
                       epilog="--config FILE.json sets any of these from a file (the flags given win); --data real "
                              "defaults the flags of configs/real.json to its values.")


def parse_args(argv=None):
    """TrainConfig from the dataclass's defaults, then configs/real.json (--data real), then a
    --config file, then the flags given (parser_from: type from the default, bools as
    --flag/--no-flag, both `--radius 0.1` and `--radius=0.1`); with --init_from gpt2, the model's
    shape from its folder where neither the flags nor the file state it."""
    ap = parser()
    ap.add_argument("--config", default="", help="a JSON file of these flags' values (flags given win)")
    args = vars(ap.parse_args(argv))
    given = given_flags(ap, argv)
    try:
        path = args.pop("config")
        stated = read_config(path, TrainConfig) if path else {}
        args.update({k: v for k, v in stated.items() if k not in given})
        if args["data"] == "real":
            real = read_config(os.path.join(CONFIGS, "real.json"), TrainConfig)
            args.update({k: v for k, v in real.items() if k not in given and k not in stated})
    except ConfigError as e:
        ap.error(str(e))
    return TrainConfig(**shape_from_init(args, given | set(stated)))


def check_config(cfg):
    """Reject bad values before anything is written."""
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} is unknown: choose one of {', '.join(valid)}")
    if cfg.stage == "pretrain" and cfg.data != "real":
        raise ConfigError("--stage pretrain trains on real general text: add --data real")
    check_init(cfg)
    # every strategy's flags, so a bad value never waits for its use; the chosen one's first, so
    # that a flag several share (--gamma) is named with it; then the aligners'
    checked = sorted(STRATEGIES.values(), key=lambda s: s.name != cfg.constraint) + list(ALIGN_METHODS.values())
    for strategy in checked:
        try:
            strategy.check(dataclasses.asdict(cfg))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.sam_rho != TrainConfig.sam_rho and "sam_rho" not in ALIGN_METHODS[cfg.align_method].hparams:
        raise ConfigError(f"--sam_rho is read by --align_method sam only (this run aligns {cfg.align_method}): "
                          "add --align_method sam or drop --sam_rho")
    for name in ("lr", "align_lr", "pretrain_lr", "weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"--{name} {v} must be a finite number ≥ 0")
    for name in ("overlap", "mismatch", "answer_overlap", "align_label_smoothing"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--{name} {v} is outside [0, 1]: pass a value between 0 and 1")
    if cfg.align_patience < 0 or cfg.align_patience and cfg.data != "real":  # the world's ℓ_s is exact: no validation
        raise ConfigError(f"--align_patience {cfg.align_patience}: a count ≥ 0 of evaluations, for --data real only")
    if cfg.answer_overlap and cfg.data == "real":
        raise ConfigError("--answer_overlap shapes the synthetic world's answers: real text has its own; drop it")
    for name in ("align_iters", "max_iters", "pretrain_iters", "eval_interval", "align_eval_interval", "log_interval",
                 "batch_tokens", "micro_batch", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} {getattr(cfg, name)} must be at least 1")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.align_helpful and cfg.data != "real":
        raise ConfigError("--align_helpful mixes helpful text into real-data alignment: add --data real or drop it")


# fields added to ALIGN_FIELDS later enter the key only when set, so that every θ_0 saved
# before them keeps its identity
LATER_ALIGN_FIELDS = ("align_helpful", "answer_overlap", "align_label_smoothing", "align_patience", "align_method",
                      "sam_rho")


def align_key(cfg):
    """Identity of the alignment recipe (μ_s and P_s do not depend on κ or δ; P_s depends on ρ)."""
    fields = {k: getattr(cfg, k) for k in ALIGN_FIELDS}
    for k in LATER_ALIGN_FIELDS:  # an aligner's hyper-parameters whenever it reads them, default or not
        if k == "sam_rho" and k in ALIGN_METHODS[cfg.align_method].hparams:
            continue
        if fields[k] == getattr(TrainConfig, k) or k == "sam_rho":
            del fields[k]
    if cfg.init_from != "scratch":  # the starting point's weights, not its path (realtext/startpoints.py)
        fields["init"] = init_identity(cfg)
    if cfg.data == "real":  # which prompts D_s's parts hold; and where early stopping looks
        fields.update(split=SPLIT_VERSION, **({k: getattr(cfg, k) for k in ("align_eval_interval", "eval_examples")}
                                              if cfg.align_patience else {}))
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# The training loop, shared by both stages


def lr_at(step, peak, warmup, total):
    """Linear warm-up, then cosine decay to peak/10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def decayed(ndim):
    """Whether AdamW decays a tensor of `ndim` dimensions: matmuls and embeddings (≥ 2), never biases
    or norm gains; the one rule of make_optimizer, lab/batched.py and lab/gradients.py."""
    return ndim >= 2


def make_optimizer(model, cfg, lr, sys_):
    """AdamW with weight decay exactly on the tensors with dim ≥ 2 (matmuls, embeddings)."""
    params = flat_params(model)
    groups = [{"params": [p for p in params if decayed(p.dim())], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if not decayed(p.dim())], "weight_decay": 0.0}]
    fused = sys_.device_type == "cuda"  # fused AdamW: one kernel per step on CUDA
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)


def micro_loss(train_model, sys_, x, y, m, n_tokens, smoothing=0.0):
    """This micro-batch's share of the global batch's mean loss over response tokens."""
    # mean over this slice's response tokens, rescaled so that the sum over micro-steps
    # and the DDP average over ranks give the mean over the global batch's tokens
    with sys_.autocast():
        _, loss = train_model(x, y, m, smoothing) if smoothing else train_model(x, y, m)
    return loss * (m.sum() * sys_.world_size / n_tokens)


def train_step(train_model, optimizer, scaler, params, constraint, sys_, batch, proxy, accum, grad_clip, smoothing=0.0,
               aligner=None):
    """One optimizer step on this rank's slice of a global batch: forward and backward over
    `accum` micro-batches (under SAM, again at the aligner's θ + ε), the constraint's gradient hook,
    clipping, AdamW, the projection. run_stage and lab/bench.py both call it, so the benchmark times
    exactly this code. batch, proxy: (x, y, mask, n_tokens) of this rank; proxy only when
    constraint.needs_proxy. Returns the step's loss at θ as a detached device tensor (no host sync)."""
    step_loss = accumulate(train_model, scaler, constraint, sys_, batch, proxy, accum, smoothing)
    if aligner is not None and aligner.ascend_(params):
        accumulate(train_model, scaler, constraint, sys_, batch, proxy, accum, smoothing)  # the gradient at θ + ε
        aligner.descend_(params)
    if scaler.is_enabled():  # fp16: true gradients first, so that a penalty's gradient is not divided by the scale
        scaler.unscale_(optimizer)
    if constraint is not None:
        constraint.before_step(params)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if constraint is not None:
        constraint.after_step(params)
    return step_loss


def accumulate(train_model, scaler, constraint, sys_, batch, proxy, accum, smoothing):
    """The gradients of the global batch's objective, summed over `accum` micro-batches into .grad."""
    micro = batch[0].size(0) // accum
    step_loss = torch.zeros((), device=sys_.device)
    for i in range(accum):
        # only the last micro-step all-reduces the gradients (set before the forward)
        if sys_.ddp:
            train_model.require_backward_grad_sync = i == accum - 1
        sl = slice(i * micro, (i + 1) * micro)
        loss = micro_loss(train_model, sys_, *(t[sl] for t in batch[:3]), batch[3], smoothing)
        if constraint is not None:
            p_loss = None
            if proxy is not None:  # Case I: the proxy safety loss ℓ_s' on the same micro-step
                p_loss = micro_loss(train_model, sys_, *(t[sl] for t in proxy[:3]), proxy[3])
            loss = constraint.objective(loss, p_loss)
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    return step_loss


RESUME_FILES = {"pretrain": "pretrain_ckpt.pt", "align": "align_ckpt.pt", "finetune": "ckpt.pt"}  # in out_dir


def evaluate_and_save(stage, step, train_loss, model, world, cfg, sys_, log, ckpt_path, constraint, theta0_hash,
                      optimizer, scaler, streams, metrics=None, stopper=None):
    """Log the exact (or held-out) metrics and write the resumable checkpoint, on rank 0; return the
    log record (None on other ranks). metrics: evaluate()'s result for these weights, if known."""
    params = flat_params(model)
    # never save weights that are already NaN or inf as the "last good" checkpoint
    if not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError(f"{stage}: the weights became NaN or inf by step {step}; the last good "
                                 f"checkpoint is kept in {ckpt_path}: lower the learning rate")
    record = None
    if sys_.master:
        record = {"stage": stage, "step": step, **(metrics or evaluate(model, world, sys_.device)),
                  "distance": None if constraint is None else constraint.distance(params).item(),
                  "train_loss": train_loss}
        log.write(record)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": f"{stage}-resume", "stage": stage,
                           "step": step, "model": model.state_dict(),
                           "model_config": dataclasses.asdict(model.config),
                           "world_config": dataclasses.asdict(world.wc), "config": dataclasses.asdict(cfg),
                           "align_key": align_key(cfg), "theta0_hash": theta0_hash,
                           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                           "generators": streams.state(),
                           "early_stop": stopper and stopper.state_dict()}, ckpt_path)
    if sys_.ddp:
        torch.distributed.barrier()
    return record


def run_stage(stage, model, world, cfg, sys_, log, ckpt_path, constraint, theta0_hash, resume_ckpt, metrics0=None,
              stopper=None):
    """Train `model` in place for one stage.

    pretrain: min next-token loss on every token of the general text corpus
    align:    min ℓ_s on batches of the original safety data D_s
    finetune: min ℓ_f (+ λ·ℓ_s' under Case I) starting from θ_0, with the constraint's
              gradient hook and projection around every optimizer step
    metrics0: evaluate() at the start, if known. stopper: early stopping (realtext/validation.py), which
    ends the loop; it keeps the best weights, not the model. Returns the last evaluation's log record.
    """
    iters = {"pretrain": cfg.pretrain_iters, "align": cfg.align_iters, "finetune": cfg.max_iters}[stage]
    peak = {"pretrain": cfg.pretrain_lr, "align": cfg.align_lr, "finetune": cfg.lr}[stage]
    params = flat_params(model)
    optimizer = make_optimizer(model, cfg, peak, sys_)
    scaler = torch.amp.GradScaler(sys_.device_type, enabled=sys_.ptdtype == torch.float16)
    streams = Streams(stage, world, cfg, sys_, constraint is not None and constraint.needs_proxy)
    aligner = make_aligner(cfg) if stage == "align" else None
    step = 0
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        streams.load_state(resume_ckpt["generators"])
        step = resume_ckpt["step"]
        if stopper is not None:
            stopper.load_state_dict(resume_ckpt["early_stop"])
    train_model = torch.compile(model) if cfg.compile else model  # training forward only: eval shapes vary
    if sys_.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[sys_.device] if sys_.device_type == "cuda" else None)

    def save(step, train_loss, metrics=None):
        if stopper is not None:  # on every rank, so that all stop at the same step
            metrics = dict(metrics or evaluate(model, world, sys_.device), validation_loss=stopper.update(step, model))
        return evaluate_and_save(stage, step, train_loss, model, world, cfg, sys_, log, ckpt_path, constraint,
                                 theta0_hash, optimizer, scaler, streams, metrics, stopper)

    record = None
    if step == 0 and resume_ckpt is None:  # a checkpoint at step 0 logged its evaluation already
        record = save(0, None, metrics0)
    bar = tqdm(total=iters, initial=step, desc=stage, disable=not (cfg.progress and sys_.master),
               dynamic_ncols=True)
    first_bad = torch.tensor(-1, device=sys_.device)  # first step with a non-finite loss
    loss_sum = torch.zeros((), device=sys_.device)
    every = cfg.align_eval_interval if stopper is not None else cfg.eval_interval
    while step < iters and not (stopper is not None and stopper.done()):  # resumed past the stop: none left
        lr = lr_at(step, peak, cfg.warmup_iters, iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        xs = streams.batch(streams.main)
        xp = streams.batch("proxy") if "proxy" in streams.gens else None
        step_loss = train_step(train_model, optimizer, scaler, params, constraint, sys_, xs, xp, streams.accum,
                               cfg.grad_clip, cfg.align_label_smoothing if stage == "align" else 0.0, aligner)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad)
        loss_sum += step_loss
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0 or step == iters or step % every == 0:
            if sys_.ddp:  # a NaN on any rank stops every rank: none is left waiting in a collective
                torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MAX)
            if first_bad.item() >= 0:  # the one host sync, every log_interval steps
                bar.close()
                raise FloatingPointError(
                    f"{stage}: the loss became NaN or inf at step {first_bad.item()}; the last good "
                    f"checkpoint is kept in {ckpt_path}: lower --{'lr' if stage == 'finetune' else stage + '_lr'}")
            mean_loss = all_reduce_mean(loss_sum, sys_).item() / cfg.log_interval  # per response token
            bar.set_postfix_str(f"train loss {mean_loss:.4f} nats/token")
            loss_sum.zero_()
        if step % every == 0 or step == iters:
            record = save(step, float(all_reduce_mean(step_loss, sys_).item()))
            if stopper is not None and stopper.done():
                break
    bar.close()
    return record


# -----------------------------------------------------------------------------
# The two stages


def train_and_save(stage, model, world, cfg, sys_, log, path, kind, extra, ckpt, stopper=None):
    """Train `model` through one stage from its resume checkpoint ckpt, if any; save it to path as a `kind`
    checkpoint with the fields extra(model) (rank 0); with a stopper, its best weights and its record."""
    resume_path = os.path.join(cfg.out_dir, RESUME_FILES[stage])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    run_stage(stage, model, world, cfg, sys_, log, resume_path, None, None, ckpt, stopper=stopper)
    if stopper is not None:
        stopper.restore(model)
    if sys_.master:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # θ_0's own folder, out/theta0-<key>
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": kind, "model": model.state_dict(),
                           "model_config": dataclasses.asdict(model.config), "world_config": dataclasses.asdict(world.wc),
                           "config": dataclasses.asdict(cfg), **extra(model),
                           **({"early_stop": stopper.record()} if stopper else {})}, path)
        os.remove(resume_path)
    if sys_.ddp:
        torch.distributed.barrier()
    return model


def pretrain(cfg, sys_, log, path, ckpt):
    """Stage 0 (real data): θ_pre = argmin of the next-token loss on the general text corpus,
    from scratch; saved with the corpus's statistics (its unigram entropy: the loss of a model
    that ignores context) and the prompts it holds (startpoints.check_corpus)."""
    world = make_corpus(cfg)
    return train_and_save("pretrain", new_model(cfg, world, sys_), world, cfg, sys_, log, path, "theta_pre", lambda m: {
        "pretrain_key": pretrain_key(cfg), "params_hash": params_hash(m),
        "corpus_keys": torch.from_numpy(world.prompt_keys.view(np.int64)),
        "corpus": dict(world.stats, **evaluate(m, world, sys_.device))}, ckpt)


def align(cfg, sys_, log, theta0_path, ckpt):
    """Stage 1: θ_0 = argmin ℓ_s on D_s, trained from --init_from (with --align_patience, stopped at the
    least ℓ_s on D_s's validation part: realtext/validation.py); saved to theta0_path."""
    world = make_world(cfg, init_vocab(cfg))  # a θ_pre's tokens mean what they meant in pretraining
    loss_of = lambda m, b: heldout_nll(m, b, sys_.device)  # noqa: E731 (evaluate.py's loss, for realtext/validation.py)
    stopper = EarlyStop(cfg.align_patience, world, loss_of) if cfg.align_patience else None
    return train_and_save("align", initial_model(cfg, world, sys_), world, cfg, sys_, log, theta0_path, "theta0",
                          lambda m: {"align_key": align_key(cfg), "theta0_hash": params_hash(m)}, ckpt, stopper)


def load_theta0(path, cfg, explicit):
    """θ_0 from disk if it was aligned with this run's recipe. A file the user named
    must match; the default one is retrained when it does not (returns None)."""
    if not os.path.exists(path):
        if explicit:
            raise CheckpointError(f"--theta0 {path} does not exist: run `python train.py --stage align` "
                                  f"first or drop --theta0")
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "theta0":
        raise CheckpointError(f"--theta0 {path} is a {ckpt.get('kind')} checkpoint, not an aligned θ_0 "
                              f"(theta0.pt written by --stage align)")
    if ckpt["align_key"] != align_key(cfg):
        saved = ckpt["config"]
        diff = [k for k in ALIGN_FIELDS if saved.get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
        diff += ["init_from (another starting point)"] * (not diff)  # the key differs, so the start did
        if explicit:
            raise CheckpointError(f"--theta0 {path} was aligned with other settings ({', '.join(diff)}): "
                                  f"pass the same values or align again with --stage align")
        print(f"θ_0 at {path} was aligned with other settings ({', '.join(diff)}); aligning again")
        return None
    print(f"θ_0: {path}, aligned with this recipe before: reused")
    return ckpt


def finetune(cfg, sys_, log, theta0_ckpt, ckpt):
    """Stage 2: start from θ_0 and fit D_f under the constraint (THEORY.md §2–§3)."""
    world = make_world(cfg, theta0_ckpt["world_config"].get("vocab", ()))
    model = new_model(cfg, world, sys_)
    model.load_state_dict(theta0_ckpt["model"])
    theta0_hash = theta0_ckpt["theta0_hash"]
    at_theta0 = evaluate(model, world, sys_.device)
    aligned = dict(at_theta0, distance=0.0)
    constraint = make_strategy(cfg.constraint, flat_params(model), cfg)
    # a strategy that needs more of θ_0 than its weights (a Fisher metric) measures it now, from
    # its own seeded stream of D_s', before any resumed weights are loaded: a resumed run and an
    # uninterrupted one see the same
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 3)
    constraint.setup(model, lambda n: tuple(t.to(sys_.device) for t in world.batch("proxy", n, gen)))
    resume_path = os.path.join(cfg.out_dir, RESUME_FILES["finetune"])
    if ckpt is not None:  # of this θ_0: main checked it
        model.load_state_dict(ckpt["model"])
    # the last evaluation of the loop is of the final weights: evaluated again only if there was none
    last = run_stage("finetune", model, world, cfg, sys_, log, resume_path, constraint, theta0_hash, ckpt, at_theta0)
    finetuned = (record_metrics(last) if last else
                 dict(evaluate(model, world, sys_.device), distance=constraint.distance(flat_params(model)).item()))
    return {"aligned": aligned, "finetuned": finetuned, "constraint": cfg.constraint,
            "radius": cfg.radius, "lam": cfg.lam, "overlap": cfg.overlap, "mismatch": cfg.mismatch}


def with_paths(cfg):
    """cfg with its run folder and θ_0's path. Not given, every fine-tune gets a folder of its own under
    out/ (out/param-radius0.1-<time>), and θ_0 lives in out/theta0-<its key>/, shared by every run of
    its alignment recipe (θ_pre in out/pretrain-<its key>/). A folder given that a run started before
    keeps the θ_0 it recorded, so that `--out_dir RUN_DIR --resume` finds it."""
    timed = not cfg.out_dir and cfg.stage in ("finetune", "all")  # a new folder named by the clock
    if not cfg.out_dir and cfg.resume or timed and int(os.environ.get("RANK", -1)) != -1:
        raise ConfigError(f"{'--resume continues' if cfg.resume else 'torchrun starts'} one run folder: pass --out_dir")
    store = os.path.join("out", f"theta0-{align_key(cfg)[:8]}")
    recorded = os.path.join(cfg.out_dir, "config.json")
    if cfg.theta0 or cfg.stage == "pretrain":
        theta0 = cfg.theta0
    elif cfg.out_dir and os.path.exists(recorded):  # the folder of a run started before
        with open(recorded) as f:
            theta0 = json.load(f).get("config", {}).get("theta0") or os.path.join(cfg.out_dir, "theta0.pt")
    else:
        theta0 = os.path.join(cfg.out_dir or store, "theta0.pt")
    p = STRATEGIES[cfg.constraint].sweep_param
    name = cfg.constraint + (f"-{p}{getattr(cfg, p):g}" if p else "")
    out = (cfg.out_dir or os.path.join("out", f"pretrain-{pretrain_key(cfg)[:8]}") if cfg.stage == "pretrain" else
           cfg.out_dir or store if cfg.stage == "align" else cfg.out_dir or new_run_folder(os.path.join("out", name)))
    return dataclasses.replace(cfg, out_dir=out, theta0=theta0)


def main(cfg, argv=None):
    check_config(cfg)
    explicit_theta0, cfg = bool(cfg.theta0), with_paths(cfg)
    # raises DataError on an impossible world or unreadable data
    world = make_corpus(cfg) if cfg.stage == "pretrain" else make_world(cfg, init_vocab(cfg))
    sys_ = setup_system(cfg)
    batch_shape(cfg, world.seq_len, sys_)  # raises ConfigError on a batch that does not divide
    theta_pre_path = os.path.join(cfg.out_dir, "theta_pre.pt")
    if cfg.stage == "pretrain" and os.path.exists(theta_pre_path):
        if load_checkpoint(theta_pre_path).get("pretrain_key") == pretrain_key(cfg):
            print(f"θ_pre at {theta_pre_path} was pretrained with this recipe: nothing to do")
            return None
        print(f"θ_pre at {theta_pre_path} was pretrained with another recipe; pretraining again")
    if cfg.init_from != "scratch" and cfg.stage in ("align", "all"):
        initial_model(cfg, world, sys_)  # raises on a starting point of another shape, vocabulary or data
    theta0_ckpt = None
    if cfg.stage in ("finetune", "all"):
        theta0_ckpt = load_theta0(cfg.theta0, cfg, explicit_theta0)  # may raise before any write
    if cfg.align_patience and cfg.stage != "pretrain" and (cfg.stage == "align" or theta0_ckpt is None):
        check_validation(world, cfg.align_patience)  # alignment will run
    resumed = resume_points(cfg, RESUME_FILES, also=[os.path.join(cfg.out_dir, "theta0.pt")])  # checked now
    resumed_from = resumed.get("finetune", {}).get("theta0_hash")
    if theta0_ckpt is not None and resumed_from not in (None, theta0_ckpt["theta0_hash"]):
        raise CheckpointError(f"{os.path.join(cfg.out_dir, RESUME_FILES['finetune'])} was fine-tuned from another θ_0 "
                              f"({resumed_from} ≠ {theta0_ckpt['theta0_hash']}): start a new --out_dir")
    if cfg.stage == "align" and not explicit_theta0 and os.path.exists(cfg.theta0) and not resumed and \
            load_theta0(cfg.theta0, cfg, False) is not None:
        return None  # aligned with this recipe before (load_theta0 said where): nothing to do
    if sys_.master:
        print(f"run folder {cfg.out_dir}" + (f" (resuming {', '.join(resumed)})" if resumed else ""))
        prepare_out_dir(cfg)
        atomic_write_json(os.path.join(cfg.out_dir, "config.json"),
                          {"config": dataclasses.asdict(cfg), "run": dict(run_info(argv), device=sys_.device,
                                                                       world_size=sys_.world_size)})
    if sys_.ddp:
        torch.distributed.barrier()
    keep_steps = {stage: ckpt["step"] for stage, ckpt in resumed.items()}  # log lines up to each checkpoint
    if cfg.resume and (theta0_ckpt is not None or os.path.exists(cfg.theta0)):
        keep_steps.setdefault("align", cfg.align_iters)
    log = Log(os.path.join(cfg.out_dir, "log.jsonl"), sys_.master, keep_steps if cfg.resume else None)

    if cfg.stage == "pretrain":
        pretrain(cfg, sys_, log, theta_pre_path, resumed.get("pretrain"))
        print(f"θ_pre: {theta_pre_path} (align from it with --init_from {theta_pre_path})")
        return None
    if cfg.stage == "align" or (cfg.stage in ("finetune", "all") and theta0_ckpt is None):
        align(cfg, sys_, log, cfg.theta0, resumed.get("align"))
        theta0_ckpt = load_checkpoint(cfg.theta0)
        print(f"θ_0: {cfg.theta0}, aligned now (later runs of this recipe reuse it)")
    if cfg.stage == "align":
        return None
    metrics = finetune(cfg, sys_, log, theta0_ckpt, resumed.get("finetune"))
    if sys_.master:
        atomic_write_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
        print_table(metrics, f"{cfg.out_dir}: {STRATEGIES[cfg.constraint].describe(dataclasses.asdict(cfg))}")
    return metrics


def cli(argv=None):
    cfg = parse_args(argv)
    try:
        main(cfg, argv)
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli()
