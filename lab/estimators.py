"""
Estimates of context overlap and mismatch on real text (THEORY.md §4). Real text has no
densities, so every number here is an ESTIMATE with sampling error and model bias, and is
labelled so in every result. On the synthetic world the same quantities are exact sums
(data.py, theory.py).

- context overlap of D_s and D_f: a lexical n-gram score, a cross-fitted classifier whose
  probabilities give TV(μ_s, μ_f), M = 1 − TV and the (A2) overlap term, and a
  representation score from a model's hidden states;
- mismatch E_{μ_s} KL(P_s‖P_s'): the difference of held-out D_s losses of two reference
  models trained on D_s' and on D_s.

real_overlap and real_mismatch take registry names (real_overlap prompt files too); the
functions above them take prompt lists or token sets. forecast.py (`python -m lab.forecast`) puts
them together into the forecast of a fine-tune's safety cost.
"""

import math
import os
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from common import DataError
from evaluate import heldout_nll
from lab.refusals import wilson_interval
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from realtext import loaders
from realtext.textdata import N_GPT2, RealData, RealDataConfig, codec_of, dataset_part, train_and_heldout

# -----------------------------------------------------------------------------
# Estimates of context overlap and mismatch from samples (THEORY.md §4). Real text has
# no densities, so these are estimates with sampling error and model bias, labelled so.


def words(text):
    """Lowercased words and punctuation marks of a text."""
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


def word_ngrams(text, n_max=2):
    """The word n-grams of a text for n = 1..n_max."""
    w = words(text)
    return [" ".join(w[i:i + n]) for n in range(1, n_max + 1) for i in range(len(w) - n + 1)]


def balanced_sample(a, b, max_n, seed):
    """Equal-size random samples of two lists (the smaller size, at most max_n)."""
    n = min(len(a), len(b), max_n)
    rng = np.random.default_rng(seed)
    return ([a[i] for i in rng.choice(len(a), n, replace=False)],
            [b[i] for i in rng.choice(len(b), n, replace=False)])


def lexical_overlap(prompts_s, prompts_f, n_max=2, max_n=2000, seed=0):
    """Lexical context overlap Σ_g min(p_s(g), p_f(g)) of the word n-gram frequencies
    (n ≤ n_max) of two prompt sets of equal size: one minus the TV distance between their
    bags of n-grams, 1 when both use words alike and 0 with no word in common (THEORY.md
    §4 'lexical score'). An estimate: it sees words, not meanings."""
    a, b = balanced_sample(prompts_s, prompts_f, max_n, seed)
    ca, cb = {}, {}
    for texts, counts in ((a, ca), (b, cb)):
        for t in texts:
            for g in word_ngrams(t, n_max):
                counts[g] = counts.get(g, 0) + 1
    na, nb = sum(ca.values()), sum(cb.values())
    return float(sum(min(v / na, cb.get(g, 0) / nb) for g, v in ca.items()))


def hashed_features(texts, n_buckets=1 << 16, n_max=2):
    """The word n-grams of each text hashed into n_buckets (crc32: the same in every
    process), one array of bucket ids per text."""
    return [np.array([zlib.crc32(g.encode()) % n_buckets for g in word_ngrams(t, n_max)] or [0], dtype=np.int64)
            for t in texts]


def bags(feats):
    """(indices, offsets) of an EmbeddingBag, one bag per array of bucket ids."""
    off = np.concatenate([[0], np.cumsum([len(f) for f in feats])[:-1]])
    return torch.from_numpy(np.concatenate(feats)), torch.from_numpy(off)


def fit_logistic(feats, labels, n_buckets=1 << 16, l2=1e-4, iters=100):
    """A logistic regression p(label = 1 | text) = σ(mean of the weights of the text's
    hashed n-grams + b), fit by L-BFGS on the mean log-loss + (l2/2)‖w‖². Returns the
    logit as a function of a list of feature arrays."""
    bag = torch.nn.EmbeddingBag(n_buckets, 1, mode="mean")
    torch.nn.init.zeros_(bag.weight)
    b = torch.zeros(1, requires_grad=True)
    return _lbfgs_logistic(lambda fs: bag(*bags(fs)).squeeze(1) + b, [bag.weight, b], bag.weight,
                           feats, labels, l2, iters)


def fit_dense_logistic(x, labels, l2=1e-3, iters=200):
    """A logistic regression on dense features (rows of x), each standardised with the training
    rows' mean and sd. Returns the logit as a function of new rows."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    lin = torch.nn.Linear(x.shape[1], 1, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    return _lbfgs_logistic(lambda rows: lin((torch.as_tensor(rows, dtype=torch.float64) - mu) / sd).squeeze(1),
                           [lin.weight, lin.bias], lin.weight, x, labels, l2, iters)


def _lbfgs_logistic(logit_of, params, penalised, feats, labels, l2, iters):
    """Fit logit_of(feats) to labels by L-BFGS on the mean log-loss + (l2/2)‖penalised‖²."""
    y = torch.tensor(labels, dtype=torch.float64)
    opt = torch.optim.LBFGS(params, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(logit_of(feats).double(), y)
                + 0.5 * l2 * penalised.double().pow(2).sum())
        loss.backward()
        return loss
    opt.step(closure)
    return torch.no_grad()(lambda new: logit_of(new).double().numpy())


class torch_threads:
    """Run a block with n torch threads, then restore: small sparse fits are ~10× faster
    on one thread than on two busy shared cores (threads spin waiting for each other)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# ---- Calibration. A regularised classifier is under-confident (its out-of-fold scores, re-fit
# by a logistic in their logit, need slopes of 4–5 on the real sets), so E|2c − 1| read off
# its raw scores understates TV. Platt scaling (one slope and intercept) fails on the known-TV
# sets of the tests: it must both sharpen the prompts that only one set has and flatten those
# both share, and one slope cannot (TV 0.25 read 0.32, 0.5 read 0.56). Isotonic regression
# has no shape to get wrong; it is fit out of fold too, so no prompt calibrates itself.


def pool_adjacent_violators(values, weights):
    """The nondecreasing sequence nearest to `values` in weighted squared error, as blocks:
    (block values, block weights, index of each block's last element)."""
    vals, wts, ends = [], [], []
    for i, (v, w) in enumerate(zip(values, weights)):
        vals.append(float(v)), wts.append(float(w)), ends.append(i)
        while len(vals) > 1 and vals[-2] >= vals[-1]:  # a violation (or a tie): pool the two blocks
            v2, w2 = vals.pop(), wts.pop()
            ends.pop()
            vals[-1], wts[-1], ends[-1] = (vals[-1] * wts[-1] + v2 * w2) / (wts[-1] + w2), wts[-1] + w2, i
    return np.array(vals), np.array(wts), np.array(ends)


def isotonic(z, y):
    """The nondecreasing step function of z nearest to the labels y (pool-adjacent-violators over
    the distinct scores, so tied scores share one value), each step's rate smoothed to
    (k + 1)/(n + 2) so that a finite sample never gives c = 0 or 1, and pooled again where the
    smoothing broke the order. Returns it as a function of new scores."""
    zs, inverse = np.unique(z, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    rate, wts, ends = pool_adjacent_violators(np.bincount(inverse, weights=y) / counts, counts)
    rate, _, ends2 = pool_adjacent_violators((rate * wts + 1) / (wts + 2), wts)
    tops = zs[ends[ends2]]
    return lambda new: rate[np.clip(np.searchsorted(tops, new), 0, len(rate) - 1)]


def out_of_fold(fit, feats, labels, fold):
    """Each item's logit from a classifier fit on the other folds (cross-fitting)."""
    take = (lambda idx: [feats[i] for i in idx]) if isinstance(feats, list) else (lambda idx: feats[idx])
    z = np.empty(len(labels))
    for k in np.unique(fold):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        z[test] = fit(take(train), labels[train].tolist())(take(test))
    return z


def overlap_from_scores(z, labels, fold, lams=(1.0,), n_boot=200, seed=0):
    """Context overlap from out-of-fold logits z of prompts labelled 1 (D_s) and 0 (D_f), equal in
    number (THEORY.md §4 'classifier overlap'), each an estimate:

        TV(μ_s, μ_f) ≈ mean |2c − 1|,   M = 1 − TV,   (A2) term ≈ mean over D_s of log(1 + (1−c)/(λ c))

    with c the isotonic calibration of z fit on the other folds, beside the same read off the
    raw scores σ(z) ('uncalibrated') and the lower bound 2·acc − 1 that the accuracy estimates
    (no test tells the two sets apart better than TV does, so TV ≥ 2·acc_true − 1; acc is its estimate).
    The calibrated TV is reported inside [that estimate, 1]: calibration smooths its rates towards ½,
    so on sets a classifier separates perfectly it would read below what its own accuracy shows.
    The (A2) term uses the calibrated probabilities as they are. Intervals (95%): a bootstrap over
    prompts within each set, the classifier fixed; for TV (and M = 1 − TV) the union of that interval
    with the binomial (Wilson) interval of the accuracy read as 2·acc − 1, so that it is never
    narrower than the sampling error of the accuracy behind the bound."""
    c = np.empty(len(z))
    for k in np.unique(fold):
        m = fold == k
        c[m] = isotonic(z[~m], labels[~m])(z[m])
    raw = np.clip(1 / (1 + np.exp(-z)), 1e-6, 1 - 1e-6)
    right = (z > 0) == (labels == 1)
    a2 = lambda cs, lam: np.log1p((1 - cs) / (lam * cs)).mean(-1)
    rng = np.random.default_rng(seed + 2)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    boot = np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], 1)
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    tv, lb = np.abs(2 * c - 1), 2 * right - 1.0  # per prompt: their means are TV and 2·acc − 1
    bound = max(0.0, float(lb.mean()))
    acc_lo, acc_hi = wilson_interval(int(right.sum()), len(right))
    bound_interval = [max(0.0, 2 * acc_lo - 1), max(0.0, 2 * acc_hi - 1)]
    tv_hat = min(1.0, max(float(tv.mean()), bound))
    boot_tv = interval(tv[boot].mean(1))
    tv_interval = [min(boot_tv[0], bound_interval[0], tv_hat), min(1.0, max(boot_tv[1], bound_interval[1], tv_hat))]
    return {"tv": tv_hat, "tv_interval": tv_interval, "M": 1.0 - tv_hat, "M_interval": [1 - tv_interval[1],
                                                                                          1 - tv_interval[0]],
            "tv_uncalibrated": float(np.abs(2 * raw - 1).mean()), "M_uncalibrated": 1 - float(np.abs(2 * raw - 1).mean()),
            "tv_lower_bound": bound, "tv_lower_bound_interval": bound_interval,
            "accuracy": float(right.mean()),
            "a2_overlap_term": {float(lam): float(a2(c[pos], lam)) for lam in lams},
            "a2_overlap_term_interval": {float(lam): interval(a2(c[boot[:, :len(pos)]], lam)) for lam in lams},
            "a2_overlap_term_uncalibrated": {float(lam): float(a2(raw[pos], lam)) for lam in lams},
            "n_per_set": len(pos)}


def same_prompts_overlap(prompts, lams=(1.0,)):
    """The overlap of a prompt set with itself, exactly (THEORY.md §4): TV 0, M 1, and the (A2) term
    log(1 + 1/λ) of c = ½ everywhere; the classifier_overlap keys, for a task built on D_s's own
    prompts (a refusal cell) where there is nothing to estimate."""
    a2 = {float(lam): float(np.log1p(1 / lam)) for lam in lams}
    return {"tv": 0.0, "tv_interval": [0.0, 0.0], "M": 1.0, "M_interval": [1.0, 1.0], "tv_uncalibrated": 0.0,
            "M_uncalibrated": 1.0, "tv_lower_bound": 0.0, "tv_lower_bound_interval": [0.0, 0.0], "accuracy": 0.5,
            "a2_overlap_term": a2, "a2_overlap_term_interval": {k: [v, v] for k, v in a2.items()},
            "a2_overlap_term_uncalibrated": a2, "n_per_set": len(prompts), "exact": "the same prompts"}


def check_prompt_sets(prompts_s, prompts_f, folds):
    """Two prompt sets an overlap can be estimated from, or one clear message."""
    for what, ps in (("safety", prompts_s), ("task", prompts_f)):
        if len(ps) < folds:
            raise DataError(f"the {what} set has {len(ps)} prompts, fewer than the classifier's {folds} folds: "
                            f"give at least {folds} (hundreds for a useful estimate)")
    if set(prompts_s) == set(prompts_f):
        raise DataError("the safety and task sets hold the same prompts: the overlap of a set with itself is "
                        "complete by definition (M = 1); give two different sets")


def classifier_overlap(prompts_s, prompts_f, lams=(1.0,), folds=5, max_n=2000, seed=0):
    """Context overlap of D_s and D_f by a probabilistic classifier (THEORY.md §4), an estimate:
    a logistic regression on hashed word 1–2-grams, cross-fitted on balanced samples of both
    sets, its scores calibrated out of fold (overlap_from_scores)."""
    return cross_fitted_overlap(hashed_features, fit_logistic, prompts_s, prompts_f, lams, folds, max_n, seed,
                                "hashed word 1-2-gram logistic regression")


def cross_fitted_overlap(features, fit, prompts_s, prompts_f, lams, folds, max_n, seed, what):
    """overlap_from_scores of the classifier `fit` on features(prompts), cross-fitted on balanced
    samples of both sets (D_s labelled 1)."""
    check_prompt_sets(prompts_s, prompts_f, folds)
    a, b = balanced_sample(prompts_s, prompts_f, max_n, seed)
    n = len(a)
    labels, fold = np.array([1] * n + [0] * n), np.random.default_rng(seed + 1).permutation(2 * n) % folds
    x = features(a + b)
    with torch_threads(1):
        z = out_of_fold(fit, x, labels, fold)
    return dict(overlap_from_scores(z, labels, fold, lams, seed=seed),
                kind=f"estimate: {what}, {folds}-fold cross-fitted, isotonic")


class BigramLM:
    """A reference model of responses, P(y_t | y_{t−1}) over GPT-2 tokens, with the
    bigram interpolated with an add-one unigram (Jelinek–Mercer, weight `mix`); the first
    response token is conditioned on the prompt's last token (the response marker).
    Small and fast: the stand-in for 'a model trained on D' in the mismatch estimate."""

    def __init__(self, ts, mix=0.7):
        prev, cur = self._pairs(ts)
        self.mix = mix
        self.uni = np.bincount(cur, minlength=N_GPT2).astype(np.float64)
        self.p_uni = (self.uni + 1) / (self.uni.sum() + N_GPT2)
        self.ctx = np.bincount(prev, minlength=N_GPT2).astype(np.float64)
        self.pairs, self.counts = np.unique(prev * N_GPT2 + cur, return_counts=True)

    @staticmethod
    def _pairs(ts):
        prev, cur = [], []
        for i in range(len(ts)):
            r = ts.response_ids(i).astype(np.int64)
            if len(r):
                seq = np.concatenate([ts.prompt_ids(i)[-1:].astype(np.int64), r])
                prev.append(seq[:-1])
                cur.append(seq[1:])
        return np.concatenate(prev), np.concatenate(cur)

    def prob(self, prev, cur):
        """P(cur | prev), elementwise over arrays of GPT-2 ids."""
        key = prev * N_GPT2 + cur
        j = np.clip(np.searchsorted(self.pairs, key), 0, len(self.pairs) - 1)
        c2 = np.where(self.pairs[j] == key, self.counts[j], 0)
        seen = self.ctx[prev] > 0  # an unseen context falls back to the unigram alone
        p_bi = np.divide(c2, self.ctx[prev], out=np.zeros(len(key)), where=seen)
        w = np.where(seen, self.mix, 0.0)
        return w * p_bi + (1 - w) * self.p_uni[cur]

    def nll(self, ts):
        """−log P(y|x) per example of ts (nats per sequence), over response tokens."""
        out = np.zeros(len(ts))
        for i in range(len(ts)):
            seq = np.concatenate([ts.prompt_ids(i)[-1:], ts.response_ids(i)]).astype(np.int64)
            out[i] = -np.log(self.prob(seq[:-1], seq[1:])).sum()
        return out


def token_matched(ts, tokens, rng):
    """A random subset of ts whose responses hold about `tokens` tokens (examples drawn without
    replacement until the next would pass the budget), so that two sets of different answer lengths
    train their references on the same amount of text."""
    order = rng.permutation(len(ts))
    lengths = np.diff(ts.r_off)[order]
    return ts.subset(order[:max(1, int(np.searchsorted(np.cumsum(lengths), tokens, side="right")))])


def ngram_mismatch(original, proxy, heldout, tokens=None, block_size=None, draws=8, n_boot=1000, seed=0):
    """Mismatch E_{μ_s} KL(P_s‖P_s') ≈ ℓ_{D_s}(reference trained on D_s') − ℓ_{D_s}(reference trained on
    D_s) (THEORY.md §4, "mismatch that measures style"), an estimate. The references are BigramLMs
    trained on `tokens` response tokens of each set (token_matched; default: the smaller set's whole
    text), all sets cut to the span a model of `block_size` positions scores (TokenSet.cut; None:
    whole answers), and scored on the held-out part of D_s; `draws` random draws of the training
    examples within the two sets. Interval: 95% percentiles of the held-out mean over bootstrap
    resamples of the held-out examples, pooled over the draws: the held-out sampling error and the
    spread between draws of one draw's estimate (wider than the mean over draws would need; a set
    sampled whole every time adds no draw spread, hence the worker's budget below the smallest)."""
    if block_size:
        original, proxy, heldout = (ts.cut(block_size) for ts in (original, proxy, heldout))
    # never more than either set holds: past that a "sample" is the whole set, and no longer matched
    tokens = int(min(tokens or math.inf, original.r_off[-1], proxy.r_off[-1]))
    rng = np.random.default_rng(seed)
    diffs, lp, lo, n_o, n_p = [], [], [], [], []
    for _ in range(draws):
        a, b = token_matched(original, tokens, rng), token_matched(proxy, tokens, rng)
        n_o.append(len(a)), n_p.append(len(b))
        nll_o, nll_p = BigramLM(a).nll(heldout), BigramLM(b).nll(heldout)
        lo.append(nll_o.mean()), lp.append(nll_p.mean())
        diffs.append(nll_p - nll_o)
    d = np.array(diffs)  # (draws, held-out examples)
    boot = rng.integers(0, d.shape[1], size=(max(1, n_boot // draws), d.shape[1]))
    pooled = np.concatenate([row[boot].mean(axis=1) for row in d])
    return {"mismatch": float(d.mean()), "mismatch_sd": float(d.mean(axis=1).std()),
            "mismatch_interval": [float(np.percentile(pooled, 2.5)), float(np.percentile(pooled, 97.5))],
            "loss_proxy_reference": float(np.mean(lp)), "loss_original_reference": float(np.mean(lo)),
            "tokens": tokens, "n_train_original": float(np.mean(n_o)), "n_train_proxy": float(np.mean(n_p)),
            "n_heldout": len(heldout), "block_size": block_size,
            "kind": "estimate: interpolated bigram reference models on token-matched samples, nats per sequence"}


# -----------------------------------------------------------------------------
# Model-based estimates of overlap and mismatch on real text (THEORY.md §4)


@torch.no_grad()
def prompt_states(model, codec, prompts, device="cpu", batch_size=64):
    """Each prompt's mean final hidden state over its tokens (templated, cut as in training), one
    row per prompt in order; prompts of equal length go through together."""
    was_training = model.training
    model.eval()
    ids = [codec.prompt(p, model.config.block_size // 2) for p in prompts]
    by_len = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    out = torch.zeros(len(ids), model.config.n_embd, dtype=torch.float64)
    for L, group in by_len.items():
        for c in range(0, len(group), batch_size):
            rows = group[c:c + batch_size]
            x = torch.tensor(np.stack([ids[i] for i in rows]), dtype=torch.long, device=device)
            out[rows] = model.hidden_states(x).mean(1).double().cpu()
    model.train(was_training)
    return out


def mean_prompt_state(model, codec, prompts, device="cpu"):
    """The average over prompts of their mean final hidden states."""
    return prompt_states(model, codec, prompts, device).mean(0)


def representation_overlap(model, codec, prompts_s, prompts_f, lams=(1.0,), folds=5, max_n=2000, seed=0,
                           device="cpu"):
    """Context overlap of D_s and D_f on representations (THEORY.md §4), an estimate: the
    classifier of classifier_overlap on each prompt's mean hidden state under a model (θ_pre or
    θ_0) instead of its words, cross-fitted and calibrated alike."""
    return cross_fitted_overlap(lambda ps: prompt_states(model, codec, ps, device).numpy(), fit_dense_logistic,
                                prompts_s, prompts_f, lams, folds, max_n, seed,
                                "logistic regression on mean hidden states")


def representation_similarity(model, codec, prompts_s, prompts_f, device="cpu"):
    """Representation score of context overlap (THEORY.md §4), an estimate: the cosine
    similarity of the mean hidden states of the two prompt sets under θ_0. Mean states
    of all text share a common direction, so compare scores with each other, not with 0."""
    a = mean_prompt_state(model, codec, prompts_s, device)
    b = mean_prompt_state(model, codec, prompts_f, device)
    return float(F.cosine_similarity(a, b, dim=0))


def mismatch_estimate(model_proxy, model_original, heldout_batches, device="cpu"):
    """Mismatch E_{μ_s} KL(P_s‖P_s') ≈ ℓ_{D_s}(model trained on D_s') − ℓ_{D_s}(model trained
    on D_s) (THEORY.md §4), an estimate: both models of equal size and training budget,
    scored on the same held-out D_s (a function returning fresh batches), nats per sequence."""
    lp = heldout_nll(model_proxy, heldout_batches(), device)
    lo = heldout_nll(model_original, heldout_batches(), device)
    return {"mismatch": lp - lo, "loss_proxy_model": lp, "loss_original_model": lo,
            "kind": "estimate: difference of held-out D_s losses of two reference models"}


# ---- The estimators by dataset name (THEORY.md §4): registry names or files in, the
# estimates above out, each labelled an estimate.


def prompts_of(name, data_dir=""):
    """The prompts of a registry name (its part of a split, if it has one; 'a+b' both) or of a prompt file."""
    if not os.path.isfile(name) and (name in loaders.REGISTRY or "+" in name):
        return list(dataset_part(name, data_dir).prompts)
    if not os.path.isfile(name):
        raise DataError(f"{name}: neither a registry name (loaders.REGISTRY) nor a file: check the name or path")
    return loaders.load_prompts(name)


def text_model(theta):
    """(model, codec) of a text checkpoint (θ_pre or θ_0), for the representation overlap."""
    ckpt = load_checkpoint(theta)
    codec = codec_of(ckpt)
    if codec is None:
        raise CheckpointError(f"--theta {theta}: a checkpoint of the synthetic world has no text representation: "
                              f"give a θ_pre or θ_0 trained on real text (train.py --data real)")
    return model_from_checkpoint(ckpt), codec


def real_overlap(safety="safety_llamas", task="alpaca_small", data_dir="", lams=(1.0, 10.0), theta0=None,
                 seed=0):
    """Context overlap of D_s and D_f (THEORY.md §4), estimates: the classifier's calibrated TV,
    M = 1 − TV and the (A2) overlap term E_{μ_s} log(1 + μ_f/(λ μ_s')) per λ; the lexical
    n-gram overlap; and, given a text checkpoint path (θ_pre or θ_0), the classifier on its hidden
    states and their cosine similarity. Names are registry names or prompt files."""
    ps, pf = prompts_of(safety, data_dir), prompts_of(task, data_dir)
    out = {"safety": safety, "task": task, "estimate": True,
           "classifier": classifier_overlap(ps, pf, lams=lams, seed=seed),
           "lexical": lexical_overlap(ps, pf, seed=seed)}
    if theta0:
        model, codec = text_model(theta0)
        out["representation"] = representation_overlap(model, codec, ps, pf, lams=lams, seed=seed)
        out["representation_cosine"] = representation_similarity(model, codec, ps, pf)
    return out


def real_mismatch(proxy, original="safety_llamas", heldout="", data_dir="", tokens=None, block_size=None,
                  proxy_ckpt=None, original_ckpt=None):
    """Mismatch E_{μ_s} KL(P_s‖P_s') ≈ ℓ_{D_s}(reference on D_s') − ℓ_{D_s}(reference on D_s)
    (THEORY.md §4), an estimate on the held-out part of D_s (its split's eval part, or its file's
    held-out share; `heldout` names another set). The references are bigram
    models trained on n examples of each set; given two checkpoints of equal size and
    budget (`train.py --stage align --safety_data PROXY` and `--safety_data ORIGINAL`),
    the GPTs themselves are compared instead."""
    if proxy_ckpt is None:
        train, held = train_and_heldout(original, data_dir)
        held = dataset_part(heldout, data_dir) if heldout else held
        proxy_ts = dataset_part(proxy, data_dir)
        if not (train.has_responses and proxy_ts.has_responses):
            raise DataError(f"{original if not train.has_responses else proxy}: has prompts only, and the mismatch "
                            f"compares answers: give (prompt, response) pairs")
        if len(held) == 0:
            raise DataError(f"{original}: no held-out part to score the mismatch on")
        return dict(ngram_mismatch(train, proxy_ts, held, tokens=tokens, block_size=block_size), proxy=proxy,
                    estimate=True)
    cp, co = load_checkpoint(proxy_ckpt), load_checkpoint(original_ckpt)
    if cp["world_config"].get("vocab") != co["world_config"].get("vocab"):
        raise CheckpointError(f"{proxy_ckpt} and {original_ckpt} read text through different vocabularies: "
                              f"align both with the same --data_dir and --restrict_vocab")
    rc = RealDataConfig(**dict(co["world_config"], safety=original, data_dir=data_dir or
                                    co["world_config"]["data_dir"], vocab=tuple(co["world_config"]["vocab"])))
    source = RealData(rc)
    return dict(mismatch_estimate(model_from_checkpoint(cp), model_from_checkpoint(co),
                                           lambda: source.eval_batches("safety")), proxy=proxy, estimate=True)
