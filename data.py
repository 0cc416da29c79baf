"""
The synthetic world of THEORY.md §1, where every density is known: three datasets
D = (μ_D, P_D), contexts x ~ μ_D and responses y ~ P_D(·|x),

    D_s  = (μ_s,  P_s)   the ORIGINAL safety data θ_0 was aligned on (evaluation only
                         once fine-tuning starts)
    D_s' = (μ_s', P_s')  the PROXY safety data available while fine-tuning
    D_f  = (μ_f,  P_f)   the task (capability) data

as tables small enough to enumerate, so every loss, gap and bound is an exact sum over
contexts and responses rather than a sample estimate. The second half holds those exact
sums (entropies, expected log-losses, KL and TV per context), which theory.py builds on.
Real text, where the densities are unknown, has the same source interface in realtext/textdata.py.
"""

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from common import ConfigError, DataError

# -----------------------------------------------------------------------------
# The synthetic world
#
# A context x is ctx_len symbols (c1, c2, c3) from an alphabet of n_symbols, so the
# context space has n_symbols**ctx_len elements (1,728 by default), few enough to
# enumerate. The first symbol is the topic: topics below n_harmful are "harmful".
#   S = {x : c1 < n_harmful}   the safety contexts (harmful prompts)
#   T = the rest               contexts only the task uses
# A response is two tokens y = (o, c): an opener o and a content token c.
#   safety (teacher A):  o ~ a refusal opener, c = the reason token of topic c1 (noisy)
#   proxy (teacher B):   the same kind of refusal in another style, mixed in by δ
#   task:                o = answer opener of c2's parity, c = answer token copying c3
# so on a shared context the task demands an answer where safety demands a refusal:
# TV(P_s(·|x), P_f(·|x)) = 1 there, and bound (C) of THEORY.md §2 is far from trivial.


@dataclass
class WorldConfig:
    overlap: float = 0.25     # κ ∈ [0,1]: share of task contexts drawn from the safety contexts S
    mismatch: float = 0.3     # δ ∈ [0,1]: weight of the other teacher in the proxy, P_s' = (1−δ)P_s + δQ
    n_symbols: int = 12       # alphabet of context symbols (also the number of answer tokens)
    ctx_len: int = 3          # symbols per context: n_symbols**ctx_len contexts
    n_harmful: int = 4        # topics c1 < n_harmful are harmful: |S| = n_harmful·n_symbols**(ctx_len−1)
    answer_overlap: float = 0.0  # ρ ∈ [0,1]: on S, P_s and P_f each give share ρ to the other's answers


REFUSAL_A = [0.55, 0.25, 0.15, 0.05]  # teacher A's refusal openers (the original safety data)
REFUSAL_B = [0.05, 0.15, 0.25, 0.55]  # teacher B's refusal openers (the mismatched proxy)
REASON_P = 0.85                       # P(c = the topic's reason token); the rest is uniform
ANSWER_P = 0.9                        # P(task opener and answer token are the right ones)


def check_world_config(wc):
    for name in ("overlap", "mismatch", "answer_overlap"):
        v = getattr(wc, name)
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise DataError(f"--{name} {v} is outside [0, 1]: pass a value between 0 and 1")
    if wc.ctx_len < 2:
        raise DataError(f"--ctx_len {wc.ctx_len} must be at least 2 (topic + answer symbol)")
    if not (1 <= wc.n_harmful < wc.n_symbols):
        raise DataError(f"--n_harmful {wc.n_harmful} must be in [1, n_symbols-1={wc.n_symbols - 1}]")
    if wc.n_symbols ** wc.ctx_len > 200_000:
        raise DataError(f"n_symbols**ctx_len = {wc.n_symbols ** wc.ctx_len} contexts is too many "
                        f"to enumerate exactly: lower --n_symbols or --ctx_len")


class SyntheticWorld:
    """Contexts, the three context distributions μ (n_ctx,) and the three response
    distributions P (n_ctx, n_open, n_content) as float64 tables, plus a sampler.

    Token ids: symbols 0..n−1, SEP = n, then refusal openers, answer openers, reason
    tokens, answer tokens. A training sequence is [x, SEP, o, c]; the model reads
    p(o|x) at SEP and p(c|x,o) at o.
    """

    name = "synthetic"

    def __init__(self, wc: WorldConfig):
        check_world_config(wc)
        self.wc = wc
        n, L, nh = wc.n_symbols, wc.ctx_len, wc.n_harmful
        self.SEP = n
        self.open_ids = torch.arange(n + 1, n + 1 + 4 + 2)            # 4 refusal + 2 answer openers
        self.content_ids = torch.arange(n + 7, n + 7 + nh + n)       # nh reasons + n answers
        self.vocab_size = int(self.content_ids[-1]) + 1
        self.block_size = L + 3                                       # x, SEP, o, c
        self.seq_len = L + 2                                          # model input length
        self.contexts = torch.tensor(list(itertools.product(range(n), repeat=L)), dtype=torch.long)
        n_ctx = len(self.contexts)
        c1, c2, cL = (self.contexts[:, 0].numpy(), self.contexts[:, 1].numpy(),
                      self.contexts[:, -1].numpy())
        harmful = c1 < nh
        self.harmful = torch.from_numpy(harmful)

        # context distributions: μ_s = μ_s' uniform on S; μ_f = (1−κ)·U(T) + κ·U(S)
        mu_S = harmful / harmful.sum()
        mu_T = (~harmful) / (~harmful).sum()
        self.mu = {"safety": mu_S, "proxy": mu_S.copy(),
                   "task": (1 - wc.overlap) * mu_T + wc.overlap * mu_S}

        n_open, n_content = 6, nh + n
        # original safety data, teacher A: refusal opener ⊗ noisy reason of the topic
        reason = np.full((n_ctx, n_content), 0.0)
        reason[:, :nh] = (1 - REASON_P) / nh
        reason[np.arange(n_ctx), c1 % nh] += REASON_P
        P_s = np.zeros((n_ctx, n_open, n_content))
        P_s[:, :4, :] = np.asarray(REFUSAL_A)[None, :, None] * reason[:, None, :]
        # teacher B: other opener style, reason of the next topic
        reason_b = np.full((n_ctx, n_content), 0.0)
        reason_b[:, :nh] = (1 - REASON_P) / nh
        reason_b[np.arange(n_ctx), (c1 + 1) % nh] += REASON_P
        Q = np.zeros((n_ctx, n_open, n_content))
        Q[:, :4, :] = np.asarray(REFUSAL_B)[None, :, None] * reason_b[:, None, :]
        # task: answer opener of c2's parity, answer token copying the last symbol
        opener = np.full((n_ctx, 2), 1 - ANSWER_P)
        opener[np.arange(n_ctx), c2 % 2] = ANSWER_P
        answer = np.zeros((n_ctx, n_content))
        answer[:, nh:] = (1 - ANSWER_P) / n
        answer[np.arange(n_ctx), nh + cL] += ANSWER_P
        P_f = np.zeros((n_ctx, n_open, n_content))
        P_f[:, 4:, :] = opener[:, :, None] * answer[:, None, :]
        # shared answer support (ρ > 0): on the safety contexts the safety teacher answers with
        # probability ρ and the task's answers refuse with probability ρ, so P_s ≪ P_f and
        # P_f ≪ P_s' there: (A1) and (B1) become finite, and (A2), (B2) are no longer attained
        rho, on_s = wc.answer_overlap, harmful[:, None, None]
        P_s, P_f = (np.where(on_s, (1 - rho) * P_s + rho * P_f, P_s),
                    np.where(on_s, (1 - rho) * P_f + rho * P_s, P_f))
        self.P = {"safety": P_s, "proxy": (1 - wc.mismatch) * P_s + wc.mismatch * Q, "task": P_f}
        self.Q = Q
        self._cdf = {k: torch.from_numpy(np.cumsum(v.reshape(n_ctx, -1), axis=1)) for k, v in self.P.items()}
        self._mu_t = {k: torch.from_numpy(v) for k, v in self.mu.items()}

    def entropy(self, name):
        """H_D = E_{x~μ_D} H(P_D(·|x)) in nats per sequence (THEORY.md §1)."""
        return conditional_entropy(self.mu[name], self.P[name])

    def sequences(self, ctx_idx, open_idx, content_idx):
        """Token sequences [x, SEP, o, c] (N, L+3) for context/opener/content indices."""
        N = len(ctx_idx)
        return torch.cat([self.contexts[ctx_idx], torch.full((N, 1), self.SEP),
                          self.open_ids[open_idx].view(N, 1), self.content_ids[content_idx].view(N, 1)], 1)

    def batch(self, name, n, generator):
        """n i.i.d. examples x ~ μ_D, y ~ P_D(·|x) as (inputs, targets, loss_mask), each
        (n, L+2); the mask is true on the two response targets."""
        x = torch.multinomial(self._mu_t[name], n, replacement=True, generator=generator)
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        cdf = self._cdf[name][x]
        j = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp(max=cdf.size(1) - 1)
        n_content = self.P[name].shape[2]
        seq = self.sequences(x, j // n_content, j % n_content)
        return response_batch(seq, prompt_len=self.wc.ctx_len + 1)


def response_batch(seq, prompt_len):
    """Shift a (N, T+1) batch of full sequences into inputs, next-token targets and a
    mask that is true exactly on the response targets (positions ≥ prompt_len)."""
    inputs, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, prompt_len - 1:] = True
    return inputs, targets, mask


# -----------------------------------------------------------------------------
# Exact population quantities over enumerable tables. A conditional is a table
# P (n_ctx, ...) of response probabilities per context; μ is (n_ctx,). The conventions
# of information theory hold throughout: 0·log 0 = 0, 0·∞ = 0, and a/0 = ∞ for a > 0.


def conditional_entropy(mu, P):
    """H_D = E_{x~μ} H(P(·|x)) (THEORY.md §1), nats per sequence."""
    P2 = P.reshape(len(P), -1)
    plogp = np.where(P2 > 0, P2 * np.log(np.where(P2 > 0, P2, 1.0)), 0.0)
    return float(-(mu * plogp.sum(1)).sum())


def expected_nll(mu, P, logq):
    """ℓ_D = E_{x~μ} E_{y~P(·|x)} [−log q(y|x)] (THEORY.md §1), exact; logq is a table
    of the model's log-probabilities with the same shape as P. Terms with P = 0 vanish
    even where log q = −inf."""
    P2, L2 = P.reshape(len(P), -1), np.asarray(logq, dtype=np.float64).reshape(len(P), -1)
    w = mu[:, None] * P2
    return float(-np.where(w > 0, w * np.where(w > 0, L2, 0.0), 0.0).sum())


def flat_table(P):
    return np.asarray(P, dtype=np.float64).reshape(len(P), -1)


def ratio(a, b):
    """a / b elementwise with 0/0 := 0 (no mass on either side constrains nothing)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a == 0, 0.0, a / b)


def expect(mu, f):
    """E_{x~μ} f(x) = Σ_x μ(x) f(x), skipping contexts with μ(x) = 0 (where f may be ∞)."""
    mu, f = np.asarray(mu, dtype=np.float64), np.asarray(f, dtype=np.float64)
    return float(np.where(mu > 0, mu * np.where(mu > 0, f, 0.0), 0.0).sum())


def weighted(w, f):
    """w·f elementwise with 0·∞ := 0: a mixture weight of zero ignores an infinite KL."""
    return np.where(w > 0, w * np.where(w > 0, f, 0.0), 0.0)


def context_kl(P, Q):
    """KL(P(·|x) ‖ Q(·|x)) for every context x, shape (n_ctx,): +∞ where Q misses part of
    P's support. The per-context term inside every gap and bound of THEORY.md §1–§2."""
    P2, Q2 = flat_table(P), flat_table(Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P2 > 0, P2 * (np.log(np.where(P2 > 0, P2, 1.0)) - np.log(Q2)), 0.0)
    return terms.sum(1)


def context_tv(P, Q):
    """TV(P(·|x), Q(·|x)) = ½ Σ_y |P − Q| for every context x, shape (n_ctx,) (bound C)."""
    return 0.5 * np.abs(flat_table(P) - flat_table(Q)).sum(1)


def gap(mu, P, Q):
    """G_D(Q) = E_{x~μ_D} KL(P_D(·|x) ‖ Q(·|x)) of a model Q on D = (μ, P) (THEORY.md §1);
    +∞ when Q gives zero probability to something D says."""
    return expect(mu, context_kl(P, Q))


# -----------------------------------------------------------------------------
# The batches of a run, from any source with batch(name, n, generator) and seq_len: the world,
# real text (realtext.textdata.RealData) or the pretraining corpus (realtext.corpus.Corpus)


def batch_shape(cfg, seq_len, sys_):
    """Sequences per step and accumulation steps from the global batch in tokens."""
    per_seq = seq_len
    if cfg.batch_tokens % (per_seq * cfg.micro_batch * sys_.world_size):
        raise ConfigError(
            f"--batch_tokens {cfg.batch_tokens} must be a multiple of tokens per sequence ({per_seq}) "
            f"× --micro_batch {cfg.micro_batch} × world size {sys_.world_size} "
            f"= {per_seq * cfg.micro_batch * sys_.world_size}")
    global_seqs = cfg.batch_tokens // per_seq
    return global_seqs, global_seqs // (cfg.micro_batch * sys_.world_size)


STREAM_SEEDS = {"align": 0, "finetune": 1, "pretrain": 4}  # 2: the proxy stream, 3: a Fisher metric's


class Streams:
    """The batches of a stage, one seeded generator per dataset, so that Case I's proxy draws
    never shift the task batches: `--lam 0` then reproduces `--constraint none` bit for bit.
    Each rank takes its slice of the one global batch, so that 2 ranks × B/2 see exactly
    what 1 rank × B sees."""

    def __init__(self, stage, world, cfg, sys_, with_proxy):
        self.world, self.sys_ = world, sys_
        self.global_seqs, self.accum = batch_shape(cfg, world.seq_len, sys_)
        self.local_seqs = self.global_seqs // sys_.world_size
        self.main = {"pretrain": "general", "align": "safety", "finetune": "task"}[stage]
        self.gens = {self.main: torch.Generator().manual_seed(cfg.seed * 1000 + STREAM_SEEDS[stage])}
        if with_proxy:
            self.gens["proxy"] = torch.Generator().manual_seed(cfg.seed * 1000 + 2)

    def batch(self, name):
        """(x, y, mask, n_tokens): this rank's slice, and the global count of response
        tokens, the loss normaliser."""
        x, y, m = self.world.batch(name, self.global_seqs, self.gens[name])
        n_tokens = m.sum()
        sl = slice(self.sys_.rank * self.local_seqs, (self.sys_.rank + 1) * self.local_seqs)
        if self.sys_.device_type == "cuda":
            return (*(t[sl].pin_memory().to(self.sys_.device, non_blocking=True) for t in (x, y, m)), n_tokens)
        return (*(t[sl].to(self.sys_.device) for t in (x, y, m)), n_tokens)

    def state(self):
        return {k: g.get_state() for k, g in self.gens.items()}

    def load_state(self, states):
        for k, g in self.gens.items():
            g.set_state(states[k])


def world_config(cfg):
    """The WorldConfig of a TrainConfig (or any object with its fields)."""
    return WorldConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(WorldConfig)})
