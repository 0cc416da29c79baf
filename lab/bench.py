"""
Throughput of the training step: the project's step under each strategy against a plain
PyTorch loop of the same model, on fixed random tokens (no data loading, no evaluation).

    python -m lab.bench                                     # every config, every variant
    python -m lab.bench --config nanogpt-cpu --steps 20     # one config
    python -m lab.bench --scaling                           # + how cost grows with size
    python -m lab.bench --json bench.json                   # + every row as JSON
    python -m lab.bench --config gpt2-small --device cuda --compile --variants baseline,none,param

Variants: `baseline` is a minimal loop written here (forward, backward, clip, AdamW);
every strategy of constraints.STRATEGIES (`none`, `loss`, `param`, `penalty`, ...) calls
train.train_step, the very function run_stage trains with, under that strategy. `loss` also runs the proxy batch, so it is compared
with `none` on twice the batch in the same micro-batches (row `none ×2`): the same tokens.

Measuring: warm-up (and compilation) outside the timed window, the device
synchronised before every clock read, the median of ≥ 10 steps. The variants of a config
run interleaved, one step each in turn, the order reversed every other round, so that a noisy
shared machine slows them all alike: compare variants within one run only.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import theory
import train
from common import HelpFormatter, Parser, atomic_write_text, first_paragraph
from constraints import STRATEGIES, make_strategy
from data import SyntheticWorld, WorldConfig
from lab import batched
from lab.machine import device_name, peak_memory_mb, reset_peak_memory, sync
from model import GPT, GPTConfig, flat_params
from system import setup_system

# -----------------------------------------------------------------------------
# What is measured

# a plain loop over the same model, the unconstrained step over twice the tokens (what `loss`
# costs at best), and every fine-tuning strategy of constraints.STRATEGIES through train.train_step
VARIANTS = ("baseline", "none2x", *STRATEGIES)


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int               # real vocabulary; the model pads it to a multiple of 64
    batch: int                    # sequences per step (on a GPU)
    seq_len: int = 0              # T, tokens per sequence; 0: block_size
    cpu_batch: int = 0            # on CPU, if the GPU batch is too slow; 0: batch
    cpu_seq_len: int = 0          # on CPU, likewise; 0: seq_len
    variants: tuple = ()          # empty: VARIANTS, every one
    note: str = ""


CONFIGS = {
    # nanoGPT's shakespeare_char config shrunk for a CPU (its README)
    "nanogpt-cpu": Shape(4, 4, 128, 64, 65, 12),
    # `python train.py`'s defaults on the synthetic world: filled in from TrainConfig below
    "synthetic": None,
    # GPT-2 small (124M); vocabulary 50257 padded to 50304, logits cut back to 50257
    "gpt2-small": Shape(12, 12, 768, 1024, 50257, 16, cpu_batch=1, cpu_seq_len=256,
                        note="on CPU B=1, T=256 (a GPU step of B=16, T=1024 takes minutes here)"),
    # real data on CPU: a tiny model's step with the whole GPT-2 output vocabulary against a
    # restricted one, the size of `train.py --data real --vocab_cap 4096` (--restricted_vocab);
    # the body is train.py's default size, T is --block_size's default
    "vocab-full": Shape(2, 4, 64, 128, 50257, 16, variants=("none",)),
    "vocab-restricted": Shape(2, 4, 64, 128, 4096, 16, variants=("none",)),
}
GROUPS = {"vocab": ("vocab-full", "vocab-restricted")}  # configs timed against each other
VARIANT = {"none2x": "none"}  # the JSON `variant` of a row; its `label` keeps the full name
LABEL = {"none2x": "none ×2"}

# dense bf16 peaks from NVIDIA's datasheets (A100, H100 SXM; the H200 has the H100's compute);
# any other device gets no MFU rather than a wrong one
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def synthetic_shape():
    """The model and batch of `python train.py` (fine-tune stage) on the synthetic world."""
    tc = train.TrainConfig()
    world = SyntheticWorld(train.world_config(tc))
    return Shape(tc.n_layer, tc.n_head, tc.n_embd, world.block_size, world.vocab_size,
                 tc.batch_tokens // world.seq_len, seq_len=world.seq_len,
                 note=f"world batches, loss on the {world.seq_len - tc.ctx_len} response tokens")


# -----------------------------------------------------------------------------
# The machine


def gpu_peak(name):
    if "PCIe" in name or "NVL" in name:  # not the SXM parts of the table
        return None
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def matmul_peak(sys_, n=2048, reps=5):
    """fp32 matmul FLOP/s of this device, the best of `reps`: the yardstick for GFLOP/s on
    CPU. main() measures it before every config and at the end and keeps the highest, so
    that a moment of load on a shared machine does not pass for the peak."""
    a = torch.randn(n, n, device=sys_.device)
    b = torch.randn(n, n, device=sys_.device)
    times = []
    for i in range(reps + 1):
        sync(sys_)
        t0 = time.perf_counter()
        a @ b
        sync(sys_)
        if i >= 1:  # one warm-up
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


# -----------------------------------------------------------------------------
# The steps


@dataclass
class Case:
    config: str
    variant: str                  # one of VARIANTS
    step: object                  # a callable running one training step
    batch: int
    seq_len: int
    accum: int
    tokens_per_step: int          # every token through forward and backward (task + proxy)
    flops_per_token: float
    n_params: int
    times: list = field(default_factory=list)
    peak_mb: float = 0.0


def random_batch(shape, B, T, sys_, gen):
    """(x, y, mask, n_tokens) as train.py's get_batch returns them: fixed tokens on the
    device, the loss on every position; n_tokens stays on the host as there."""
    x = torch.randint(0, shape.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, shape.vocab_size, (B, T), generator=gen)
    m = torch.ones(B, T, dtype=torch.bool)
    return (x.to(sys_.device), y.to(sys_.device), m.to(sys_.device), m.sum())


def world_batch(world, name, B, sys_, gen):
    x, y, m = world.batch(name, B, gen)
    return (x.to(sys_.device), y.to(sys_.device), m.to(sys_.device), m.sum())


def baseline_step(model, optimizer, batch, sys_, grad_clip):
    """The plain loop (nanoGPT's, one micro-batch), on the same model and loss mask."""
    x, y, m, _ = batch
    with sys_.autocast():
        _, loss = model(x, y, m)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_cases(name, shape, args, sys_):
    """One model per config; every variant trains it in turn (a step costs the same
    whatever the weights). Each constraint keeps its own θ_0, as a fine-tune would."""
    cpu = sys_.device_type != "cuda"
    B = args.batch or (shape.cpu_batch if cpu and shape.cpu_batch else shape.batch)
    T = args.seq_len or (shape.cpu_seq_len if cpu and shape.cpu_seq_len else shape.seq_len) or shape.block_size
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=max(T, shape.block_size), vocab_size=shape.vocab_size,
                          n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)).to(sys_.device)
    params = flat_params(model)
    tc = train.TrainConfig()  # the optimizer and clipping of a default run
    optimizer = train.make_optimizer(model, tc, args.lr, sys_)
    scaler = torch.amp.GradScaler(sys_.device_type, enabled=sys_.ptdtype == torch.float16)
    base_opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                 fused=sys_.device_type == "cuda")
    train_model = torch.compile(model) if args.compile else model  # the training forward only

    gen = torch.Generator().manual_seed(1)
    if name == "synthetic":  # the world's own batches: the loss on the response tokens only
        world = SyntheticWorld(train.world_config(tc))
        task, proxy, task2 = (world_batch(world, n, b, sys_, gen) for n, b in
                              (("task", B), ("proxy", B), ("task", 2 * B)))
    else:
        task, proxy, task2 = (random_batch(shape, b, T, sys_, gen) for b in (B, B, 2 * B))

    constraints = {}

    def project(kind, batch=task, proxy_batch=None, accum=1):
        if kind not in constraints:
            c = constraints[kind] = make_strategy(kind, params, dict(dataclasses.asdict(tc), radius=args.radius))
            c.setup(model, lambda n: tuple(t[:n] for t in proxy[:3]))
        c = constraints[kind]
        return lambda: train.train_step(train_model, optimizer, scaler, params, c, sys_, batch, proxy_batch,
                                        accum, tc.grad_clip)

    fpt = model.estimate_flops_per_token(T)
    n_params = model.num_params()
    cases = []
    for v in [v for v in (args.variants or shape.variants or VARIANTS) if v in (shape.variants or VARIANTS)]:
        if v == "baseline":
            step = lambda: baseline_step(train_model, base_opt, task, sys_, tc.grad_clip)  # noqa: E731
        elif v == "none2x":  # the unconstrained step over the tokens of `loss`: 2B in micro-batches of B
            step = project("none", batch=task2, accum=2)
        elif v == "loss":
            step = project("loss", proxy_batch=proxy)
        else:
            step = project(v)
        mult = 2 if v in ("none2x", "loss") else 1
        cases.append(Case(name, v, step, B * mult if v == "none2x" else B, T, 2 if v == "none2x" else 1,
                          mult * B * T, fpt, n_params))
    if "param" in constraints:
        # the projection alone, timed in the same rounds: its cost is a small difference of two
        # noisy step times, but a direct reading on its own
        c = constraints["param"]
        cases.append(Case(name, "param_hook", lambda: c.after_step(params), B, T, 1, 0, fpt, n_params))
    return cases


def time_cases(cases, steps, warmup, sys_):
    """Warm every case up, then time one step of each in turn, `steps` rounds, the order
    reversed every other round; the device synchronised before every clock read."""
    for c in cases:
        for _ in range(warmup):
            c.step()
    sync(sys_)
    for r in range(steps):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            reset_peak_memory(sys_)
            sync(sys_)
            t0 = time.perf_counter()
            c.step()
            sync(sys_)
            c.times.append(time.perf_counter() - t0)
            c.peak_mb = max(c.peak_mb, peak_memory_mb(sys_))


def row(c):
    ms = 1e3 * statistics.median(c.times)
    tps = c.tokens_per_step / (ms / 1e3)
    flops = c.flops_per_token * tps
    r = {"table": "step", "config": c.config, "variant": VARIANT.get(c.variant, c.variant),
         "label": LABEL.get(c.variant, c.variant), "ms_per_step": ms, "tokens_per_s": tps,
         "peak_mem_mb": c.peak_mb, "batch": c.batch, "seq_len": c.seq_len, "accum": c.accum,
         "tokens_per_step": c.tokens_per_step, "n_params": c.n_params, "steps": len(c.times),
         "ms_p25": 1e3 * float(np.percentile(c.times, 25)), "ms_p75": 1e3 * float(np.percentile(c.times, 75)),
         "gflops": flops / 1e9, "times_ms": [1e3 * t for t in c.times]}
    return r


def add_fractions(rows, sys_, peak_flops):
    """MFU on a GPU (None off the peak table), the fraction of the matmul peak on CPU."""
    for r in rows:
        if r.get("gflops") is None:
            continue
        if sys_.device_type == "cuda":
            r["mfu"] = r["gflops"] * 1e9 / peak_flops if peak_flops else None
        else:
            r["matmul_peak_fraction"] = r["gflops"] * 1e9 / peak_flops


def paired_ratio(a, b):
    """Median over rounds of a's time over b's time in the same round: robust to drift."""
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def acceptance(cases):
    """Issue 5, acceptance 1: the three ratios within one run."""
    by = {c.variant: c for c in cases}
    med = {k: statistics.median(c.times) for k, c in by.items()}
    out = []
    if "baseline" in by and "none" in by:
        out.append(("none tokens/s ÷ baseline tokens/s", med["baseline"] / med["none"],
                    1 / paired_ratio(by["none"], by["baseline"]), "≥ 0.97", med["baseline"] / med["none"] >= 0.97))
    if "param" in by and "none" in by:
        out.append(("param time ÷ none time", med["param"] / med["none"], paired_ratio(by["param"], by["none"]),
                    "≤ 1.03", med["param"] / med["none"] <= 1.03))
    if "param_hook" in by and "none" in by:  # not judged: the projection's share, read directly
        out.append(("(none + projection alone) ÷ none", 1 + med["param_hook"] / med["none"],
                    1 + paired_ratio(by["param_hook"], by["none"]), "≤ 1.03",
                    1 + med["param_hook"] / med["none"] <= 1.03))
    if "loss" in by and "none2x" in by:
        out.append(("loss time ÷ none×2 time (same tokens)", med["loss"] / med["none2x"],
                    paired_ratio(by["loss"], by["none2x"]), "≤ 1.05", med["loss"] / med["none2x"] <= 1.05))
    return [{"config": cases[0].config, "ratio": n, "of_medians": a, "paired_median": p, "target": t, "met": ok}
            for n, a, p, t, ok in out]


def print_rows(rows, sys_):
    unit = "MFU" if sys_.device_type == "cuda" else "of fp32 mm peak"
    print(f"{'config':<17}{'variant':<10}{'B×T×acc':>13}{'ms/step':>10}{'p25–p75':>15}{'tokens/s':>11}"
          f"{'GFLOP/s':>9}{unit:>16}{'peak MB':>9}")
    for r in rows:
        frac = r.get("mfu", r.get("matmul_peak_fraction"))
        frac = "n/a" if frac is None else f"{100 * frac:.1f}%"
        print(f"{r['config']:<17}{r['label']:<10}{r['batch']:>5}×{r['seq_len']}×{r['accum']:<3}{r['ms_per_step']:>10.2f}"
              f"{r['ms_p25']:>7.1f}–{r['ms_p75']:<7.1f}{r['tokens_per_s']:>11.0f}{r['gflops']:>9.2f}{frac:>16}"
              f"{r['peak_mem_mb']:>9.0f}")


# -----------------------------------------------------------------------------
# --scaling: how cost grows with the model and with the synthetic world

SCALING_SIZES = {"S": (2, 4, 64), "M": (4, 4, 128), "L": (8, 8, 256)}  # (n_layer, n_head, n_embd)
SCALING_SYMBOLS = (8, 12, 24)  # n_symbols: 512, 1,728 and 13,824 contexts at ctx_len 3


def scaling(args, sys_):
    rows = []
    # step time over three model sizes: nanogpt-cpu's batch, `none` against `param`
    for size, (L, H, D) in SCALING_SIZES.items():
        shape = Shape(L, H, D, 64, 65, 12, variants=("none", "param"))
        a = argparse.Namespace(**{**vars(args), "variants": ["none", "param"], "batch": 0, "seq_len": 0,
                                  "compile": False})
        cases = build_cases(f"scaling-{size}", shape, a, sys_)
        time_cases(cases, args.steps or 10, 2, sys_)
        rows += [row(c) for c in cases if c.tokens_per_step]
    # Hessian power iteration over the same sizes
    iters = 20
    for size, (L, H, D) in SCALING_SIZES.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=L, n_head=H, n_embd=D)).to(sys_.device)
        batch = random_batch(Shape(L, H, D, 64, 65, 12), 12, 64, sys_, torch.Generator().manual_seed(1))
        times = []
        for _ in range(3):
            sync(sys_)
            t0 = time.perf_counter()
            done = timed_power_iteration(model, batch, iters)
            sync(sys_)
            times.append(time.perf_counter() - t0)
        rows.append({"table": "scaling", "config": f"scaling-{size}", "variant": "power_iteration",
                     "label": f"λ_max(H), {done} HVPs", "n_params": model.num_params(), "hvps": done,
                     "ms_total": 1e3 * statistics.median(times),
                     "ms_per_hvp": 1e3 * statistics.median(times) / done,
                     "ms_per_step": None, "tokens_per_s": None, "peak_mem_mb": None})
    # exact synthetic evaluation over three context-space sizes
    from evaluate import evaluate
    tc = train.TrainConfig()
    for n in SCALING_SYMBOLS:
        world = SyntheticWorld(WorldConfig(n_symbols=n, ctx_len=tc.ctx_len, n_harmful=tc.n_harmful))
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=world.block_size, vocab_size=world.vocab_size, n_layer=tc.n_layer,
                              n_head=tc.n_head, n_embd=tc.n_embd)).to(sys_.device)
        times = []
        for i in range(4):
            sync(sys_)
            t0 = time.perf_counter()
            evaluate(model, world, sys_.device)
            sync(sys_)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        rows.append({"table": "scaling", "config": f"world-{n}", "variant": "evaluate",
                     "label": f"exact eval, {len(world.contexts)} contexts", "n_contexts": len(world.contexts),
                     "ms_total": 1e3 * statistics.median(times), "ms_per_step": None, "tokens_per_s": None,
                     "peak_mem_mb": None})
    return rows


def print_scaling(rows):
    for r in rows:
        if r["variant"] == "power_iteration":
            print(f"{r['config']:<12}{r['n_params']:>10} params  power iteration, {r['hvps']} HVPs "
                  f"{r['ms_total']:9.1f} ms "
                  f"({r['ms_per_hvp']:.2f} ms per HVP)")
        elif r["variant"] == "evaluate":
            print(f"{r['config']:<12}{r['n_contexts']:>10} contexts exact evaluation {r['ms_total']:9.1f} ms")


# -----------------------------------------------------------------------------
# --batched: K fine-tunes as one stacked model (batched.py) against one run


def batched_rows(args, sys_):
    """The batched path (batched.py, sweep.py --batch_runs): K fine-tunes of the synthetic config as
    one stacked model against train.train_step on one, interleaved; Case I (loss, a proxy batch
    too) and Case II (param, a ball that binds). Rows: the step, and the time per member-step."""
    tc = train.TrainConfig(constraint="loss", lam=1.0, radius=args.radius)
    world = SyntheticWorld(train.world_config(tc))
    B, gen, rows = tc.batch_tokens // world.seq_len, torch.Generator().manual_seed(1), []
    task, proxy = (world_batch(world, n, B, sys_, gen) for n in ("task", "proxy"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=world.block_size, vocab_size=world.vocab_size, n_layer=tc.n_layer,
                          n_head=tc.n_head, n_embd=tc.n_embd)).to(sys_.device)
    start = {"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    fpt, n = model.estimate_flops_per_token(world.seq_len), model.num_params()
    for kind in ("loss", "param"):
        cfg = dataclasses.replace(tc, constraint=kind)
        pb = proxy if kind == "loss" else None
        params, scaler = flat_params(model), torch.amp.GradScaler(sys_.device_type, enabled=False)
        strategy, optimizer = make_strategy(kind, params, cfg), train.make_optimizer(model, cfg, args.lr, sys_)
        cases = [Case("synthetic", f"{kind} ×1", lambda s=strategy, o=optimizer, p=params, pb=pb: train.train_step(
            model, o, scaler, p, s, sys_, task, pb, 1, tc.grad_clip), B, world.seq_len, 1, 0, fpt, n)]
        for k in args.batched:
            net = batched.Stacked(start, k, sys_.device)
            lams, radii = batched.knobs([cfg] * k, sys_.device)
            stack = lambda b: batched.stack_batches([b] * k) if b else None  # noqa: E731
            cases.append(Case("synthetic", f"{kind} ×{k}", lambda net=net, o=batched.make_optimizer(net, cfg, sys_),
                              x=stack(task), xp=stack(pb), lams=lams, radii=radii: batched.batched_step(
                                  net, sys_, o, x, xp, lams, radii, 1, tc.grad_clip), B, world.seq_len, k, 0, fpt, n))
        time_cases(cases, args.steps or 20, args.warmup or 2, sys_)
        single = cases[0]
        for c in cases:
            ms = 1e3 * statistics.median(c.times)
            rows.append({"table": "batched", "config": "synthetic", "variant": kind, "members": c.accum,
                         "ms_per_step": ms, "ms_per_member_step": ms / c.accum, "tokens_per_s": None,
                         "peak_mem_mb": c.peak_mb, "per_member_speedup": c.accum / paired_ratio(c, single),
                         "steps": len(c.times), "times_ms": [1e3 * t for t in c.times]})
    return rows


def print_batched(rows):
    rows = [r for r in rows if r["table"] == "batched"]
    if rows:
        print(f"\nbatched fine-tunes (batched.py), synthetic config\n{'variant':<9}{'members':>8}{'ms/step':>10}"
              f"{'ms/member-step':>16}{'× one run (paired)':>20}")
        for r in rows:
            print(f"{r['variant']:<9}{r['members']:>8}{r['ms_per_step']:>10.1f}{r['ms_per_member_step']:>16.2f}"
                  f"{r['per_member_speedup']:>20.2f}")


def timed_power_iteration(model, batch, iters):
    """λ_max(H) of the loss on one batch by theory.py's power iteration on Hessian-vector
    products (THEORY.md §3), all `iters` iterations (tol 0). Returns the HVPs done."""
    x, y, m, _ = batch
    land = theory.LossLandscape(model, lambda mdl: mdl(x, y, m)[1])
    return theory.power_iteration(land.hvp, land.n, iters=iters, tol=0.0)[1]


# -----------------------------------------------------------------------------


def parser():
    ap = Parser(prog="python -m lab.bench", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--config", default="all", help=f"all, or a comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--variants", default="", help=f"comma list of {','.join(VARIANTS)}; "
                                                   "default: every variant of the config")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per variant (≥ 10); 0: 20, 10 for gpt2-small on CPU")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps per variant first; 0: 2 (5 with --compile)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step; 0: the config's")
    ap.add_argument("--seq_len", type=int, default=0, help="tokens per sequence T; 0: the config's")
    ap.add_argument("--restricted_vocab", type=int, default=4096, help="vocabulary of the vocab-restricted row")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (torch.set_num_threads); 0: PyTorch's default. On a loaded shared "
                         "machine 1 thread gives far steadier timings than 2 (no stalled OpenMP barriers)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the training forward")
    ap.add_argument("--radius", type=float, default=0.1, help="r of the param rows (the ball binds: a real projection)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the timed steps (time does not depend on it)")
    ap.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=False,
                    help="add the scaling table: step and power-iteration time over 3 model sizes, exact "
                         "evaluation over 3 world sizes")
    ap.add_argument("--batched", default="", help="member counts K, e.g. 1,5,10: add the batched.py table "
                                                    "(K fine-tunes as one model against one run)")
    ap.add_argument("--json", default="", help="also write every row to this file")
    return ap


def parse_args(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    try:
        args.batched = [int(k) for k in args.batched.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--batched {args.batched!r}: give member counts as integers, e.g. 1,5,10")
    if any(k < 1 for k in args.batched):
        ap.error(f"--batched {args.batched}: every member count must be at least 1")
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    names = list(CONFIGS) if args.config == "all" else args.config.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if bad or unknown:
        ap.error(f"unknown {'variant' if bad else 'config'} {(bad or unknown)[0]!r}")
    if args.steps and args.steps < 10:
        ap.error(f"--steps {args.steps}: time at least 10 steps for a median worth reading")
    args.configs = names
    return args


def run_group(group, args, sys_, peaks):
    """Time every variant of the configs of one group, interleaved; print them and return
    (rows, acceptance checks). On CPU the matmul peak is measured again beside them."""
    cpu = sys_.device_type != "cuda"
    cases, checks = [], []
    for g in group:
        cases += build_cases(g, CONFIGS[g], args, sys_)
    if not cases:
        return [], []
    slow = cpu and CONFIGS[group[0]].cpu_batch
    steps = args.steps or (10 if slow else 20)
    warmup = args.warmup or (5 if args.compile else (1 if slow else 2))
    t0 = time.perf_counter()
    if cpu:
        peaks.append(matmul_peak(sys_))
    time_cases(cases, steps, warmup, sys_)
    new = [row(c) for c in cases if c.tokens_per_step]
    print(f"\n{', '.join(group)}: {len(new)} variants × {steps} interleaved steps")
    for n in [CONFIGS[g].note for g in group if CONFIGS[g].note]:
        print(f"  note: {n}")
    for a in (acceptance(cases) if len(group) == 1 else []):
        checks.append(a)
        print(f"  {a['ratio']:<40} {a['of_medians']:.3f} (paired {a['paired_median']:.3f})  target {a['target']}"
              f"  {'met' if a['met'] else 'MISSED'}")
    if len(group) > 1:
        full, restricted = new[0], new[1]
        ratio = full["ms_per_step"] / restricted["ms_per_step"]
        checks.append({"config": "vocab", "ratio": "vocab-full time ÷ vocab-restricted time", "of_medians": ratio,
                       "paired_median": paired_ratio(cases[0], cases[1]), "target": "≥ 3", "met": ratio >= 3})
        print(f"  vocab {CONFIGS['vocab-full'].vocab_size} vs {CONFIGS['vocab-restricted'].vocab_size}: "
              f"step {ratio:.2f}× faster restricted  target ≥ 3  {'met' if ratio >= 3 else 'MISSED'}")
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    return new, checks


def main(argv=None):
    args = parse_args(argv)
    sys_ = setup_system(train.TrainConfig(device=args.device, dtype=args.dtype))
    if args.threads:
        torch.set_num_threads(args.threads)
    CONFIGS["synthetic"] = synthetic_shape()
    CONFIGS["vocab-restricted"].vocab_size = args.restricted_vocab
    name = device_name(sys_)
    cpu = sys_.device_type != "cuda"
    load0 = os.getloadavg()
    peaks = [matmul_peak(sys_)] if cpu else []
    header = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
              "numpy": np.__version__, "cuda": torch.version.cuda, "dtype": str(sys_.ptdtype).replace("torch.", ""),
              "compile": args.compile, "threads": torch.get_num_threads(), "loadavg_start": load0,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:] if argv is None else argv,
              "peak_kind": "highest measured fp32 matmul 2048³" if cpu else "dense bf16 table"}
    print(f"device {name} | torch {torch.__version__} | python {header['python']} | numpy {np.__version__}"
          f" | cuda {torch.version.cuda} | dtype {header['dtype']} | compile {args.compile}"
          f" | threads {header['threads']} | load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    if not cpu:
        print("MFU against " + (f"{gpu_peak(name) / 1e12:.0f} TFLOP/s dense bf16" if gpu_peak(name) else
                                "nothing: device not in the peak table, no MFU"))

    rows, checks = [], []
    done = set()
    for cname in args.configs:
        if cname in done:
            continue
        group = next((g for g in GROUPS.values() if cname in g), (cname,))
        group = [g for g in group if g in args.configs]
        done.update(group)
        new, new_checks = run_group(group, args, sys_, peaks)
        rows += new
        checks += new_checks
    if args.scaling:
        rows += scaling(args, sys_)
    if args.batched:
        rows += batched_rows(args, sys_)
    load1 = os.getloadavg()
    header["loadavg_end"] = load1
    if cpu:
        peaks.append(matmul_peak(sys_))
    peak_flops = max(peaks) if cpu else gpu_peak(name)
    header.update(peak_flops=peak_flops, matmul_peaks=peaks)
    add_fractions(rows, sys_, peak_flops)
    print()
    print_rows([r for r in rows if r["table"] == "step"], sys_)
    print_scaling(rows)
    print_batched(rows)
    if cpu:
        print(f"fp32 matmul peak: {peak_flops / 1e9:.1f} GFLOP/s, the highest of {len(peaks)} measurements "
              f"in this run ({', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        # one list of rows; each carries the run's header, the acceptance ratios come last
        out = [dict(r, run=header) for r in rows]
        out += [dict(a, table="acceptance", variant=None, ms_per_step=None, tokens_per_s=None,
                     peak_mem_mb=None, run=header) for a in checks]
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)  # after minutes of timing, never lost to a path
        atomic_write_text(args.json, json.dumps(out, indent=1))
    return rows, checks


if __name__ == "__main__":
    main()
