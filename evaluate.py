"""
Measuring a model: the losses ℓ_s, ℓ_f and the gaps G_s, G_f of THEORY.md §1.

On the synthetic world these are exact population quantities: the model's conditional
P_θ(y|x) is read off for every context and every response (one forward pass per context
and opener gives p(o|x) and p(c|x,o) for all c), and

    ℓ_D(θ) = Σ_x μ_D(x) Σ_y P_D(y|x) · (−log P_θ(y|x))
    G_D(θ) = ℓ_D(θ) − H_D = E_{x~μ_D} KL(P_D(·|x) ‖ P_θ(·|x))

in nats per sequence, with no sampling at all. On real text the same losses are
estimated on held-out examples and the gaps are unknown (None). Behaviour by generation
(refusal rates, samples) is the harness's: lab/refusals.py.

    python evaluate.py --ckpt out/ckpt.pt      # losses (and, on the synthetic world, gaps)
"""

import json
import sys

import torch
import torch.nn.functional as F

from common import DataError, HelpFormatter, Parser
from data import SyntheticWorld, WorldConfig, expected_nll
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from realtext.textdata import RealDataConfig, codec_of, real_source


@torch.no_grad()
def model_log_table(model, world, device="cpu", chunk=8192):
    """log P_θ(o, c | x) for every context, opener and content token of the world:
    a float64 array (n_ctx, n_open, n_content), comparable entry by entry with the
    world's P tables. Mass the model puts on other tokens simply is not in the table."""
    was_training = model.training
    model.eval()
    n_ctx, n_open = len(world.contexts), len(world.open_ids)
    # every (context, opener) pair once; the content token in the sequence is unused
    ctx = torch.arange(n_ctx).repeat_interleave(n_open)
    opn = torch.arange(n_open).repeat(n_ctx)
    seq = world.sequences(ctx, opn, torch.zeros_like(ctx))[:, :-1]  # (N, L+2): x, SEP, o
    L = world.wc.ctx_len
    out = []
    for i in range(0, len(seq), chunk):
        logits, _ = model(seq[i:i + chunk].to(device))
        logp = F.log_softmax(logits.double(), dim=-1)  # float64: gaps near 0 stay exact
        lp_open = logp[:, L, :][:, world.open_ids.to(device)]                # (n, n_open)
        lp_content = logp[:, L + 1, :][:, world.content_ids.to(device)]      # (n, n_content)
        opener = opn[i:i + chunk].to(device)
        # log p(o|x) + log p(c|x,o) for the opener o in this sequence
        lp_o = lp_open.gather(1, opener.view(-1, 1))
        out.append((lp_o + lp_content).double().cpu())
    model.train(was_training)
    return torch.cat(out).view(n_ctx, n_open, -1).numpy()


def exact_metrics(logq, world):
    """ℓ_s, ℓ_f, G_s, G_f of a table of model log-probabilities (THEORY.md §1)."""
    ls = expected_nll(world.mu["safety"], world.P["safety"], logq)
    lf = expected_nll(world.mu["task"], world.P["task"], logq)
    return {"safety_loss": ls, "capability_loss": lf,
            "safety_gap": ls - world.entropy("safety"), "capability_gap": lf - world.entropy("task")}


def evaluate(model, world, device="cpu"):
    """The metrics of a model on a data source (nats per sequence): exact on the synthetic
    world, held-out estimates with no gaps on real text."""
    if getattr(world, "name", "") == "real":
        return heldout_metrics(model, world, device)
    if getattr(world, "name", "") == "corpus":  # pretraining: every token of held-out general text
        return {"general_loss": heldout_nll(model, world.eval_batches("general"), device) / world.block_size}
    return exact_metrics(model_log_table(model, world, device), world)


def response_nll(model, x, y, m):
    """−log P_θ(y|x) per sequence (B,) in nats (THEORY.md §1), equal to
    model.sequence_nll of the full logits, but with the output layer applied to the
    response positions only (on a 30k vocabulary it is most of the cost)."""
    h = model.hidden_states(x)[m]                                   # (N, C) response positions
    logits = model.lm_head(h)[:, :model.config.vocab_size].float()  # (N, V)
    tok = F.cross_entropy(logits, y[m], reduction="none")           # (N,)
    rows = torch.arange(len(x), device=x.device).unsqueeze(1).expand_as(m)[m]
    return torch.zeros(len(x), device=x.device, dtype=tok.dtype).index_add_(0, rows, tok)


@torch.no_grad()
def heldout_nll(model, batches, device="cpu"):
    """Mean −log P_θ(y|x) over the sequences of `batches` (nats per sequence, THEORY.md §1),
    summed in float64 and divided once (a mean of sums, not a mean of means)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, m in batches:
        x, y, m = x.to(device), y.to(device), m.to(device)
        total += response_nll(model, x, y, m).double().sum().item()
        count += len(x)
    model.train(was_training)
    return total / max(count, 1)


def heldout_metrics(model, source, device="cpu"):
    """ℓ_s and ℓ_f on real data, estimated on the held-out parts of D_s and D_f (THEORY.md
    §1). The gaps G = ℓ − H need the unknown entropies H_D, so they are None."""
    return {"safety_loss": heldout_nll(model, source.eval_batches("safety"), device),
            "capability_loss": heldout_nll(model, source.eval_batches("task"), device),
            "safety_gap": None, "capability_gap": None}


def proxy_metrics(model, source, device="cpu"):
    """Case I's fit of the proxy D_s' (nats per sequence): its loss on examples it trains on, on
    held-out ones of its file (None where the proxy is not a part of a split), and its size."""
    out = {"proxy_train_loss": heldout_nll(model, source.eval_batches("proxy_train"), device),
           "proxy_heldout_loss": None, "proxy_examples": len(source.sets["proxy"][0])}
    if "proxy_heldout" in source.eval_sets:
        out["proxy_heldout_loss"] = heldout_nll(model, source.eval_batches("proxy_heldout"), device)
    return out


# -----------------------------------------------------------------------------
# CLI


def parser():
    ap = Parser(description="The losses ℓ_s, ℓ_f (nats per sequence) and, on the synthetic world, the gaps G_s, "
                            "G_f of a checkpoint, as JSON.",
                formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (theta0.pt, ckpt.pt, theta_pre.pt)")
    ap.add_argument("--data_dir", default="", help="real data folder for the held-out losses (default: the one the "
                                                   "checkpoint was trained on, else $SAFETY_DATA_DIR)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        model = model_from_checkpoint(ckpt, args.device)
        if codec_of(ckpt) is None:
            world = SyntheticWorld(WorldConfig(**ckpt["world_config"]))
        else:
            wc = dict(ckpt["world_config"], data_dir=args.data_dir or ckpt["world_config"]["data_dir"])
            world = real_source(RealDataConfig(**dict(wc, vocab=tuple(wc["vocab"]))))
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    m = evaluate(model, world, args.device)
    print(json.dumps(m, indent=2))
    return m


if __name__ == "__main__":
    main()
