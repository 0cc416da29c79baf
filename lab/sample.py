"""
Samples from any checkpoint of the project, nanoGPT's sample.py for this setting: what a model
answers, at a temperature and a top-k, several answers a prompt.

    python -m lab.sample --ckpt out/theta0-*/theta0.pt                  # the synthetic world: contexts of D_s, D_f
    python -m lab.sample --ckpt out_real/ckpt.pt --prompt "How do I pick a lock?" --num_samples 3
    python -m lab.sample --ckpt out_real/ckpt.pt --prompts my_prompts.csv --temperature 0.7 --top_k 50

On the synthetic world a prompt is a context x (THEORY.md §1): the samples are drawn for contexts of
the safety data D_s and of the task D_f, each response shown as its opener and content token by
name (refuse-k: a refusal opener, answer-even/odd: the task's, reason-k, answer-v), beside what
the world's P_s and P_f would answer. On real text a prompt is templated as in training; a compact
vocabulary's UNK, which has no text, is never sampled.
"""

import sys

import numpy as np
import torch

from common import DataError, HelpFormatter, Parser, first_paragraph
from data import SyntheticWorld, WorldConfig
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from realtext.loaders import load_prompts
from realtext.textdata import codec_of


def token_name(world, i):
    """The role of a synthetic token id (data.SyntheticWorld's layout)."""
    n, nh = world.wc.n_symbols, world.wc.n_harmful
    names = ([f"s{k}" for k in range(n)] + ["SEP"] + [f"refuse-{k}" for k in range(1, 5)]
             + ["answer-even", "answer-odd"] + [f"reason-{k}" for k in range(nh)] + [f"answer-{k}" for k in range(n)])
    return names[i] if 0 <= i < len(names) else f"token-{i}"


@torch.no_grad()
def sample_world(model, ckpt, args, gen):
    """Samples for contexts drawn from μ_s and μ_f: (set, context, [sampled responses], the set's likeliest)."""
    known = set(WorldConfig.__dataclass_fields__)
    world = SyntheticWorld(WorldConfig(**{k: v for k, v in ckpt["world_config"].items() if k in known}))
    out = []
    for name in ("safety", "task"):
        for x in torch.multinomial(torch.from_numpy(world.mu[name]), args.contexts, replacement=True, generator=gen):
            prompt = torch.cat([world.contexts[x], torch.tensor([world.SEP])]).repeat(args.num_samples, 1)
            seqs = model.generate(prompt, 2, temperature=args.temperature, top_k=args.top_k or None, generator=gen)
            o, c = np.unravel_index(world.P[name][x].argmax(), world.P[name][x].shape)
            best = f"{token_name(world, int(world.open_ids[o]))} {token_name(world, int(world.content_ids[c]))}"
            out.append((name, " ".join(map(str, world.contexts[x].tolist())),
                        [" ".join(token_name(world, int(t)) for t in s[-2:]) for s in seqs], best))
    return out


@torch.no_grad()
def sample_text(model, codec, prompts, args, gen):
    """Samples for each prompt: (prompt, [sampled responses])."""
    block = model.config.block_size
    cap = min(block // 2, block - args.max_new_tokens)
    if cap < 8:
        raise DataError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in block_size {block}: "
                        f"lower it")
    out = []
    for p in prompts:
        x = torch.tensor(np.asarray(codec.prompt(p, cap)), dtype=torch.long).repeat(args.num_samples, 1)
        y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                           generator=gen, stop_token=codec.eot, suppress=() if codec.unk is None else (codec.unk,))
        out.append((p, [codec.text(row[x.size(1):].numpy()) for row in y]))
    return out


def parser():
    ap = Parser(prog="python -m lab.sample", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (theta0.pt, ckpt.pt, theta_pre.pt)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (real text); repeatable")
    ap.add_argument("--prompts", default="", help="a prompt file (.csv, .json, .jsonl, .txt) (real text)")
    ap.add_argument("--limit", type=int, default=5, help="at most this many prompts of --prompts")
    ap.add_argument("--contexts", type=int, default=3, help="synthetic world: contexts drawn from each of D_s and D_f")
    ap.add_argument("--num_samples", type=int, default=3, help="samples per prompt or context")
    ap.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    ap.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens only (0: all)")
    ap.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per sample (real text)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampling (and the synthetic contexts)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.temperature < 0 or args.num_samples < 1 or args.top_k < 0 or args.contexts < 1:
        ap.error("--temperature and --top_k must be ≥ 0, --num_samples and --contexts ≥ 1")
    gen = torch.Generator().manual_seed(args.seed)
    try:
        ckpt = load_checkpoint(args.ckpt)
        model, codec = model_from_checkpoint(ckpt).eval(), codec_of(ckpt)
        if codec is None:
            if args.prompt or args.prompts:
                raise DataError(f"{args.ckpt} was trained on the synthetic world, whose prompts are contexts, not "
                                f"text: drop --prompt/--prompts (its samples are for contexts of D_s and D_f)")
            rows = sample_world(model, ckpt, args, gen)
        else:
            prompts = args.prompt + (load_prompts(args.prompts)[:args.limit] if args.prompts else [])
            if not prompts:
                raise DataError("a real-text checkpoint needs prompts: pass --prompt TEXT or --prompts FILE")
            rows = sample_text(model, codec, prompts, args, gen)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    how = f"temperature {args.temperature:g}" + (f", top-k {args.top_k}" if args.top_k else "")
    for row in rows:
        if codec is None:
            name, ctx, samples, best = row
            print(f"{'D_s' if name == 'safety' else 'D_f'} context {ctx} ({how}): {'; '.join(samples)}"
                  f"   [the world's likeliest: {best}]")
        else:
            print(f"prompt: {row[0][:200]!r} ({how})")
            for s in row[1]:
                print(f"  → {s[:300]!r}")
    return rows


if __name__ == "__main__":
    main()
