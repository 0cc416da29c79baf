"""
Several fine-tunes of one θ_0 trained as one batched model: the sweep's fast path
(`python -m lab.sweep --batch_runs K`). train.py stays the readable single run; this file trains K
of its fine-tunes at once and writes each one's run folder exactly as train.py would.

Each member keeps everything its single run has: its world (κ, δ), its strategy and knob
(λ of Case I, r of Case II; THEORY.md §2–§3) and its seeded batch streams (train.Streams), so
that the members of a seed see the batches their single runs would. Only the arithmetic is
shared: the members' weights are stacked along a new first dimension
(torch.func.stack_module_state) and one vmapped forward computes every member's loss. The
members share no parameter, so

  - the gradient of Σ_k loss_k with respect to member k's weights is loss_k's own gradient;
  - AdamW is elementwise: one optimizer over the stacked tensors is K optimizers;
  - gradient clipping and the projection onto the ball ‖θ − θ_0‖ ≤ r (THEORY.md §3) use each
    member's own norm;

and the weights equal the single runs' to float tolerance (tests/test_batched.py). Members must
agree on everything but the knobs and the world (batch_key); strategies other than none, loss
and param, which prepare per-run state at θ_0 (a Fisher metric), run singly. A batched group
always trains from step 0: one killed before its end is trained again whole, as a single run
of the sweep (which saves only at its end) would be.
"""

import dataclasses
import json
import os

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import train
from common import ConfigError, atomic_write_json
from constraints import STRATEGIES as STRATEGY_CLASSES
from constraints import make_strategy
from model import GPT, GPTConfig, flat_params
from system import Log, prepare_out_dir, print_table, record_metrics, run_info, setup_system

STRATEGIES = ("none", "loss", "param")  # the strategies whose hooks batch (constraints.py)
KNOBS = ("out_dir", "constraint", "lam", "radius", "overlap", "mismatch", "resume", "progress")  # may differ


def batch_key(cfg):
    """What members of one batched group must share: every TrainConfig field but the knobs, and
    whether they draw proxy batches (a group of Case I runs and one of the others, so that no
    member computes a proxy loss it does not use). None: the run cannot be batched."""
    if cfg.constraint not in STRATEGIES or cfg.data != "synthetic" or cfg.stage != "finetune" or cfg.dtype == "float16":
        return None  # float16 needs a loss scaler, which one optimizer over K members would share
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in KNOBS}
    return json.dumps(fields, sort_keys=True) + f"|proxy={cfg.constraint == 'loss'}"


class Stacked:
    """K copies of one GPT's weights, stacked: params[name] is (K, *shape). `skeleton` is a GPT of
    the same configuration whose forward functional_call runs with the stacked weights."""

    def __init__(self, theta0_ckpt, k, device):
        self.skeleton = GPT(GPTConfig(**theta0_ckpt["model_config"])).to(device)
        self.skeleton.load_state_dict(theta0_ckpt["model"])
        params, self.buffers = stack_module_state([self.skeleton] * k)  # tied weights once
        assert not self.buffers, "a model with buffers would need them vmapped too"
        self.names = list(params)
        self.params = [params[n].detach().requires_grad_() for n in self.names]  # flat_params's order
        self.theta0 = [p.detach().clone() for p in flat_params(self.skeleton)]
        self.k = k

        def member_loss(params, x, y, m):
            # the math attention: the fused CPU kernel has no vmap rule, and vmap would loop over members
            with sdpa_kernel(SDPBackend.MATH):
                return functional_call(self.skeleton, (dict(zip(self.names, params)), self.buffers), (x, y, m))[1]
        self.losses = vmap(member_loss)  # (params, x, y, m), each with a leading K dim → (K,) losses

    @torch.no_grad()
    def member(self, i):
        """Member i as a plain GPT (the skeleton, its weights overwritten): for evaluation and saving."""
        for p, s in zip(flat_params(self.skeleton), self.params):
            p.copy_(s[i])
        return self.skeleton


def per_member(v, like):
    """A (K,) vector shaped to broadcast against a stacked tensor (K, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def clip_grad_norms_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ member by member: each member's gradient, as one flat
    vector, scaled to norm ≤ max_norm with the same coefficient max_norm / (norm + 1e-6)."""
    k = params[0].size(0)
    norms = torch.stack([p.grad.reshape(k, -1).norm(dim=1) for p in params], dim=1)  # (K, n_tensors)
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(per_member(coef, p.grad))


@torch.no_grad()
def distances(params, theta0):
    """‖θ_k − θ_0‖₂ of each member k over all its parameters (THEORY.md §3), a (K,) tensor; the squares
    summed in float64 on CPU, as constraints.distance does there."""
    k = params[0].size(0)
    norms = torch.stack([(p - p0).reshape(k, -1).norm(dim=1) for p, p0 in zip(params, theta0)], dim=1)
    if norms.device.type == "cpu":
        return norms.double().square().sum(dim=1).sqrt().to(params[0].dtype)
    return torch.linalg.vector_norm(norms, dim=1)


@torch.no_grad()
def project_(params, theta0, radii):
    """θ_k ← θ_0 + (θ_k − θ_0)·min(1, r_k/‖θ_k − θ_0‖), as constraints.project_ does for one run: the
    weight 1 − s is exactly 0 inside the ball (and for r = ∞), where lerp returns θ_k bit for bit."""
    s = torch.clamp(radii / torch.clamp(distances(params, theta0), min=1e-30), max=1.0)
    w = (1.0 - s).to(params[0].dtype)
    for p, p0 in zip(params, theta0):
        p.lerp_(p0, per_member(w, p))


class MemberOptimizer:
    """Member i's slice of the stacked AdamW state, in torch.optim's state_dict format, so that
    its checkpoint is the one its single run writes (train.py --resume continues it)."""

    def __init__(self, optimizer, i):
        self.optimizer, self.i = optimizer, i

    def state_dict(self):
        sd = self.optimizer.state_dict()
        state = {j: {n: v[self.i].clone() if v.dim() > 0 else v.clone() for n, v in s.items()}
                 for j, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}


def knobs(cfgs, device):
    """Each member's λ (0 but under Case I) and radius r (∞ but under Case II), as (K,) tensors; the
    radii are None when no member has a ball (nothing to project, and no need to ask the device)."""
    lams = torch.tensor([c.lam if c.constraint == "loss" else 0.0 for c in cfgs], device=device)
    radii = torch.tensor([c.radius if c.constraint == "param" else float("inf") for c in cfgs], device=device)
    return lams, radii if any(c.constraint == "param" for c in cfgs) else None


def make_optimizer(net, cfg, sys_):
    """train.make_optimizer's AdamW over the stacked weights: decay on the tensors that are matrices
    in each member (dim ≥ 2 after the leading member dimension)."""
    groups = [{"params": [p for p in net.params if train.decayed(p.dim() - 1)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in net.params if not train.decayed(p.dim() - 1)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=sys_.device_type == "cuda")


def open_member(cfg, sys_, theta0):
    """A member's run folder, as train.main opens a fine-tune's: its world, config.json and a fresh
    log.jsonl written."""
    world = train.make_world(cfg, theta0["world_config"].get("vocab", ()))
    prepare_out_dir(cfg)
    atomic_write_json(os.path.join(cfg.out_dir, "config.json"),
                      {"config": dataclasses.asdict(cfg),
                       "run": dict(run_info([]), device=sys_.device, world_size=1, batched=True)})
    return world, Log(os.path.join(cfg.out_dir, "log.jsonl"), True, None)


def check_group(cfgs):
    """Raise ConfigError unless the runs can train as one batched group (before anything is written);
    return their θ_0 checkpoint (None for no runs)."""
    for c in cfgs:
        train.check_config(c)
    keys = [batch_key(c) for c in cfgs]
    if None in keys:
        bad = cfgs[keys.index(None)]
        raise ConfigError(f"{bad.out_dir}: a {bad.constraint} run on {bad.data} data cannot be batched "
                          f"(batched.py trains fine-tunes of the synthetic world under {', '.join(STRATEGIES)})")
    if len(set(keys)) > 1:
        a, b = (json.loads(key.split("|")[0]) for key in (keys[0], next(k for k in keys if k != keys[0])))
        diff = sorted(f for f in a if a[f] != b.get(f)) or ["proxy batches (Case I with other strategies)"]
        raise ConfigError(f"these runs differ in {', '.join(diff)}: a batched group shares everything but "
                          f"{', '.join(KNOBS[1:])}")
    theta0s = [train.load_theta0(c.theta0 or os.path.join(c.out_dir, "theta0.pt"), c, True) for c in cfgs]
    if len({t["theta0_hash"] for t in theta0s}) > 1:
        raise ConfigError("these runs start from different θ_0s: a batched group fine-tunes one θ_0")
    if cfgs:
        sys_ = setup_system(cfgs[0])
        if sys_.ddp:
            raise ConfigError("a batched group runs in one process: drop torchrun, or run the fine-tunes one at a time")
        train.batch_shape(cfgs[0], train.make_world(cfgs[0]).seq_len, sys_)
    return theta0s[0] if theta0s else None


def finetune_group(cfgs, progress=False):
    """Fine-tune every TrainConfig of `cfgs` (stage finetune, one θ_0) as one batched model and
    write each run's folder as train.main does: config.json, log.jsonl, ckpt.pt, metrics.json.
    Returns the metrics of each run, in order (train.finetune's)."""
    theta0 = check_group(cfgs)
    cfg, k = cfgs[0], len(cfgs)
    sys_ = setup_system(cfg)
    members = [open_member(c, sys_, theta0) for c in cfgs]  # (world, log) of each run
    net = Stacked(theta0, k, sys_.device)
    strategies = [make_strategy(c.constraint, flat_params(net.skeleton), c) for c in cfgs]  # for distance()
    proxy = strategies[0].needs_proxy
    streams = [train.Streams("finetune", world, c, sys_, proxy) for c, (world, _) in zip(cfgs, members)]
    lams, radii = knobs(cfgs, sys_.device)
    optimizer = make_optimizer(net, cfg, sys_)
    scaler = torch.amp.GradScaler(sys_.device_type, enabled=False)

    def save(step, train_loss):
        """Every member's evaluation and resumable checkpoint (train.evaluate_and_save); the records."""
        return [train.evaluate_and_save("finetune", step, None if train_loss is None else float(train_loss[i]),
                                        net.member(i), world, c, sys_, log, os.path.join(c.out_dir, "ckpt.pt"), s,
                                        theta0["theta0_hash"], MemberOptimizer(optimizer, i), scaler, st)
                for i, (c, (world, log), s, st) in enumerate(zip(cfgs, members, strategies, streams))]

    first = save(0, None)
    last = run_steps(cfg, sys_, net, optimizer, streams, proxy, lams, radii, save, progress,
                     [c.out_dir for c in cfgs])
    out = []
    for c, a, f in zip(cfgs, first, last):
        metrics = {"aligned": dict(record_metrics(a), distance=0.0), "finetuned": record_metrics(f),
                   "constraint": c.constraint,
                   "radius": c.radius, "lam": c.lam, "overlap": c.overlap, "mismatch": c.mismatch}
        atomic_write_json(os.path.join(c.out_dir, "metrics.json"), metrics)
        print_table(metrics, f"{c.out_dir}: {STRATEGY_CLASSES[c.constraint].describe(dataclasses.asdict(c))}")
        out.append(metrics)
    return out


def run_steps(cfg, sys_, net, optimizer, streams, proxy, lams, radii, save, progress, names):
    """train.run_stage's loop for the stacked members: the learning-rate schedule, a batch of each
    member's streams per step, the NaN check every log_interval steps, save() every eval_interval
    steps and at the end. Returns the records of the last save."""
    iters, last = cfg.max_iters, None
    first_bad = torch.full((net.k,), -1, device=sys_.device)  # each member's first non-finite loss
    for step in tqdm(range(iters), desc=f"finetune ×{net.k}", disable=not progress, dynamic_ncols=True):
        lr = train.lr_at(step, cfg.lr, cfg.warmup_iters, iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = stack_batches([s.batch(s.main) for s in streams])
        proxy_batch = stack_batches([s.batch("proxy") for s in streams]) if proxy else None
        step_loss = batched_step(net, sys_, optimizer, batch, proxy_batch, lams, radii, streams[0].accum,
                                 cfg.grad_clip)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad)
        done = step + 1
        if (done % cfg.log_interval == 0 or done == iters or done % cfg.eval_interval == 0) and (first_bad >= 0).any():
            i = int(torch.nonzero(first_bad >= 0)[0])
            raise FloatingPointError(f"finetune of {names[i]} (batched): the loss became NaN or inf at step "
                                     f"{int(first_bad[i])}: lower --lr")
        if done % cfg.eval_interval == 0 or done == iters:
            last = save(done, step_loss)
    return last


def stack_batches(batches):
    """(x, y, mask, n_tokens) of each member → the same with a leading member dimension. n_tokens, the
    global batch's count of response tokens, is counted again on the device (one process: the global
    batch is the member's own), so that a GPU step never waits for a copy from the host."""
    x, y, m = (torch.stack(ts) for ts in list(zip(*batches))[:3])
    return x, y, m, m.sum(dim=(1, 2))


def micro_losses(net, sys_, x, y, m, n_tokens):
    """train.micro_loss for every member: each one's share of its global batch's mean loss."""
    with sys_.autocast():
        loss = net.losses(net.params, x, y, m)
    return loss * (m.sum(dim=(1, 2)) / n_tokens)


def batched_step(net, sys_, optimizer, batch, proxy, lams, radii, accum, grad_clip):
    """train.train_step for the stacked members: the same micro-steps and objective (ℓ_f + λ·ℓ_s'
    under Case I, THEORY.md §2), clipping, AdamW step and projection (Case II, §3). Returns each
    member's step loss, (K,), on the device."""
    x, y, m, n = batch
    micro = x.size(1) // accum
    step_loss = torch.zeros(net.k, device=x.device)
    for i in range(accum):
        sl = slice(i * micro, (i + 1) * micro)
        loss = micro_losses(net, sys_, x[:, sl], y[:, sl], m[:, sl], n)
        if proxy is not None:
            loss = loss + lams * micro_losses(net, sys_, *(t[:, sl] for t in proxy[:3]), proxy[3])
        loss.sum().backward()  # the members share no weight: each gets its own loss's gradient
        step_loss += loss.detach()
    if grad_clip > 0:
        clip_grad_norms_(net.params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if radii is not None:
        project_(net.params, net.theta0, radii)
    return step_loss
