"""
The answer-aware forecast (THEORY.md §4, "Answer-aware forecast"): what a plain fine-tune on a task
set will do to the held-out safety loss ℓ_s, to first order in the change of the weights, read from
gradients at θ_0 before any fine-tuning. The context terms of lab/forecast.py see prompts only, so
two task sets with the same prompts get the same terms whatever their answers; here answers that
agree with D_s's on shared contexts pull ℓ_s down and answers that conflict push it up.

With u_i the gradient at θ_0 of example i's summed response NLL over the task's mean answer length
(a batch's mean of u_i is the gradient of the fine-tune's token-mean loss), ū their mean, g_s the
gradient of held-out ℓ_s (nats per sequence), S = Σ_t η_t and B the batch in sequences:

    grad_dot = ⟨g_s, ū⟩,   grad_cos = grad_dot / (‖g_s‖ ‖ū‖),
    Δℓ_s ≈ −S ⟨g_s, ū ⊘ (√v + ε)⟩ − S·wd·⟨g_s, θ_0⟩_decayed,   v = ū² + Var_i(u_i)/B

(AdamW's steady-state step with the gradient held at θ_0). Per example, c_i = −S⟨g_s ⊘ (√v+ε), u_i⟩
ranks the task's examples by predicted safety cost; Δℓ_s is their mean plus the decay term.
"""

import math
import os

import numpy as np
import torch

from common import DataError
from evaluate import response_nll
from model import flat_params
from realtext import loaders
from realtext.textdata import RealData, RealDataConfig, collate
from train import decayed, lr_at

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which train.make_optimizer keeps


def flat_grad(model, loss):
    """∇loss as one float64 vector over flat_params(model)."""
    grads = torch.autograd.grad(loss, flat_params(model), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, flat_params(model))])


def example_gradient(model, part, i, pad):
    """∇ of example i's summed response NLL (nats per sequence) at the model's weights."""
    seqs, plens = part
    x, y, m = collate([seqs[i]], [plens[i]], pad)
    return flat_grad(model, response_nll(model, x, y, m).sum())


def safety_halves(model, part, pad, keys=None, batch_size=16):
    """∇ℓ_s on each half of the held-out part of D_s (nats per sequence): two estimates, independent
    when no prompt is in both halves, whose inner product is then unbiased for ‖∇ℓ_s‖² and whose
    cosine says how much of either is signal (near 1) or sampling noise (near 0). With the examples'
    prompt keys, halves by the parity of each distinct prompt's rank, so that duplicates of a prompt
    stay in one half; else by position. Returns the two gradients and their numbers of examples."""
    halves = [torch.zeros(0, dtype=torch.float64)] * 2
    n = len(part[0])
    if n < 2:
        raise DataError(f"held-out D_s has {n} example(s): ∇ℓ_s and its split-half check need at least 2 "
                        f"(a larger safety set, or a θ_0 with more --eval_examples)")
    side = np.arange(n) % 2 if keys is None else np.unique(np.asarray(keys), return_inverse=True)[1] % 2
    if side.min() == side.max():
        side = np.arange(n) % 2  # one distinct prompt: by position
    for h in (0, 1):
        idx = np.flatnonzero(side == h).tolist()
        total = None
        for k in range(0, len(idx), batch_size):
            x, y, m = collate([part[0][i] for i in idx[k:k + batch_size]],
                              [part[1][i] for i in idx[k:k + batch_size]], pad)
            g = flat_grad(model, response_nll(model, x, y, m).sum())
            total = g if total is None else total + g
        halves[h] = total / len(idx)
    return halves, (int((side == 0).sum()), int((side == 1).sum()))


def safety_gradient(model, part, pad, keys=None, batch_size=16):
    """g_s = ∇ℓ_s on the held-out part of D_s (nats per sequence), and the cosine between the
    gradients of its two halves (safety_halves)."""
    halves, sizes = safety_halves(model, part, pad, keys, batch_size)
    g_s = (halves[0] * sizes[0] + halves[1] * sizes[1]) / sum(sizes)
    return g_s, float(torch.nn.functional.cosine_similarity(halves[0], halves[1], dim=0))


def schedule(cfg):
    """(S, B): the summed learning rate of a plain fine-tune of cfg's length (train.lr_at) and its
    batch in sequences."""
    steps = cfg["max_iters"]
    return sum(lr_at(t, cfg["lr"], cfg["warmup_iters"], steps) for t in range(steps)), \
        max(1, cfg["batch_tokens"] // cfg["block_size"])


def decayed_mask(model):
    """1 on the coordinates AdamW decays (tensors with dim ≥ 2, as train.make_optimizer), else 0."""
    return torch.cat([torch.full((p.numel(),), float(decayed(p.dim())), dtype=torch.float64) for p in flat_params(model)])


def answer_terms(model, source, cfg, max_n=256, seed=0, n_boot=1000):
    """The answer-aware terms of the module docstring for source's task (its training part, a
    random sample of max_n examples), with 95% intervals over the task's examples: bootstrap for
    grad_dot and delta_ls_first_order (means of per-example terms), jackknife for grad_cos."""
    model = model.eval()
    pad = source.codec.eot
    part = source.sets["task"]
    n_all = len(part[0])
    if n_all < 2:
        raise DataError(f"{source.wc.task}: {n_all} training example(s): the answer-aware terms need at least 2")
    idx = np.random.default_rng(seed).permutation(n_all)[:max_n]
    g_s, split_cos = safety_gradient(model, source.eval_sets["safety"], pad, source.keys["safety_eval"])
    scale = float(np.mean([len(part[0][i]) - part[1][i] for i in idx]))  # mean answer tokens: u_i's unit
    # pass 1: ū and the per-coordinate variance of u_i, for AdamW's v
    s1 = s2 = torch.zeros_like(g_s)
    for i in idx:
        u = example_gradient(model, part, int(i), pad) / scale
        s1, s2 = s1 + u, s2 + u * u
    n = len(idx)
    ubar = s1 / n
    S, B = schedule(cfg)
    v = ubar ** 2 + (s2 / n - ubar ** 2).clamp_min(0) / B
    w = -S * g_s / (v.sqrt() + ADAM_EPS)
    decay = -S * cfg["weight_decay"] * float((g_s * decayed_mask(model) * torch.cat(
        [p.detach().reshape(-1).double() for p in flat_params(model)])).sum())
    # pass 2: each example's score and dot product, and what the jackknife of the cosine needs
    c, dot, ui_ubar, ui_sq = (np.zeros(n) for _ in range(4))
    for k, i in enumerate(idx):
        u = example_gradient(model, part, int(i), pad) / scale
        c[k], dot[k] = float(w @ u), float(g_s @ u)
        ui_ubar[k], ui_sq[k] = float(ubar @ u), float(u @ u)
    return summarise(g_s, ubar, c, dot, ui_ubar, ui_sq, decay, split_cos, S, B, idx, part, source, n_boot, seed)


def summarise(g_s, ubar, c, dot, ui_ubar, ui_sq, decay, split_cos, S, B, idx, part, source, n_boot, seed):
    """The answer_terms dict from the per-example numbers of its two passes."""
    n = len(c)
    rng = np.random.default_rng(seed + 1)
    boot = rng.integers(0, n, size=(n_boot, n))
    gs_norm, ubar_sq = float(g_s.norm()), float(ubar @ ubar)
    cos = float(dot.mean()) / (gs_norm * math.sqrt(ubar_sq) + 1e-300)
    # jackknife: ū without example i is (n·ū − u_i)/(n − 1)
    loo_dot = (n * dot.mean() - dot) / (n - 1)
    loo_norm = np.sqrt(np.maximum(n * n * ubar_sq - 2 * n * ui_ubar + ui_sq, 0)) / (n - 1)
    loo_cos = loo_dot / (gs_norm * loo_norm + 1e-300)
    se = math.sqrt((n - 1) / n * float(((loo_cos - loo_cos.mean()) ** 2).sum()))
    interval = lambda values: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    delta = float(c.mean()) + decay
    order = np.argsort(-c, kind="stable")
    prompt = lambda i: source.codec.text(part[0][i][:part[1][i]]).replace("### Instruction:\n", "").split(
        "\n\n### Response:")[0].strip()
    return {"grad_dot": float(dot.mean()), "grad_dot_interval": interval(dot[boot].mean(axis=1)),
            "grad_cos": cos, "grad_cos_interval": [max(-1.0, cos - 1.96 * se), min(1.0, cos + 1.96 * se)],
            "delta_ls_first_order": delta, "delta_ls_first_order_interval": interval(c[boot].mean(axis=1) + decay),
            "delta_ls_decay_term": decay, "safety_gradient_norm": gs_norm, "safety_gradient_split_cos": split_cos,
            "task_gradient_norm": math.sqrt(ubar_sq), "summed_lr": S, "batch_sequences": B, "n_examples": n,
            "example_scores": [{"prompt": prompt(int(idx[k])), "score": float(c[k])} for k in order]}


def check_answers(task):
    """A task file's (prompt, response) pairs can be read, before anything else is: the answer-aware
    terms fit its answers. Registry names are checked when they are read (RealData)."""
    if not os.path.isfile(task):
        return
    what = "prompts only" if task.lower().endswith(".txt") else None
    try:
        examples = None if what else loaders.load_examples(task)
    except DataError as e:
        what = f"no answers to read ({e})"
    if what is None and len(examples) < 2:
        what = f"{len(examples)} example: at least 2 are needed"
    if what:
        raise DataError(f"--task {task}: {what}; the answer-aware terms (--theta a θ_0) fit each task's answers: give "
                        f".json (Alpaca), .jsonl or .csv with prompts and responses, or a θ_pre for the context terms alone")


def task_source(ckpt, task, data_dir=""):
    """RealData of a θ_0's own D_s, proxy and vocabulary with `task` as D_f (its training part is what
    a plain fine-tune on it would see)."""
    wc = dict(ckpt["world_config"])
    rc = RealDataConfig(**{**wc, "task": task, "data_dir": data_dir or wc["data_dir"], "vocab": tuple(wc["vocab"])})
    return RealData(rc)
