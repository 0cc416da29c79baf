"""Real-data estimators of THEORY.md §4: context overlap (classifier, lexical,
representation) and mismatch (reference models), on toy sets with known answers and,
when the data folder is there, the rankings the paper's datasets should give."""
import os

import numpy as np
import pytest
import torch

from common import DataError
from lab import estimators
from model import GPT, GPTConfig
from realtext import loaders, textdata

DATA_DIR = os.environ.get("SAFETY_DATA_DIR", "")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR or "/nonexistent"),
                                reason="real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")


def toy_prompts(words, n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, 8)) for _ in range(n)]


A_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
B_WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "gray", "teal"]


def test_lexical_overlap_hand_computed_and_extremes():
    assert estimators.lexical_overlap(["a b"], ["a c"], n_max=1) == pytest.approx(0.5)   # min(.5,.5) on 'a'
    same = toy_prompts(A_WORDS, 50, 0)
    assert estimators.lexical_overlap(same, same) == pytest.approx(1.0)
    assert estimators.lexical_overlap(same, toy_prompts(B_WORDS, 50, 1)) == 0.0


def family(vocab, n, rng):
    """n prompts of 6–15 words drawn Zipf-like from one family's own vocabulary."""
    p = 1 / np.arange(1, len(vocab) + 1) ** 1.1
    return [" ".join(rng.choice(vocab, rng.integers(6, 16), p=p / p.sum())) for _ in range(n)]


def known_tv_sets(tv, n, seed):
    """D_s = (1−tv)·C + tv·A and D_f = (1−tv)·C + tv·B over three families of disjoint vocabularies:
    TV(μ_s, μ_f) = tv exactly (A and B never meet; C is shared in equal measure)."""
    rng = np.random.default_rng(seed)
    c, a, b = ([f"{tag}{i}" for i in range(400)] for tag in "cab")
    k = round(tv * n)
    return family(c, n - k, rng) + family(a, k, rng), family(c, n - k, rng) + family(b, k, rng)


@pytest.fixture(scope="module")
def known_tv():
    """The classifier overlap of five prompt-set pairs of known TV, 2,000 prompts a side."""
    return {tv: estimators.classifier_overlap(*known_tv_sets(tv, 2000, i), lams=(1.0, 10.0))
            for i, tv in enumerate((0.0, 0.25, 0.5, 0.75, 1.0))}


def test_calibrated_tv_is_within_005_of_the_truth_where_raw_scores_are_not(known_tv):
    err = {tv: abs(e["tv"] - tv) for tv, e in known_tv.items()}
    raw = {tv: abs(e["tv_uncalibrated"] - tv) for tv, e in known_tv.items()}
    assert max(err.values()) <= 0.05, err
    assert max(raw.values()) > 0.05, raw                               # the raw scores are under-confident
    for tv, e in known_tv.items():
        assert e["tv_lower_bound"] <= tv + 0.03                        # 2·acc − 1, up to sampling error
        assert e["M"] == pytest.approx(1 - e["tv"]) and e["tv_interval"][0] <= e["tv"] <= e["tv_interval"][1]
        a2 = e["a2_overlap_term"]
        assert a2[1.0] > a2[10.0] > 0                                  # the (A2) term falls as λ grows
    # and the (A2) term falls as overlap does: log 2 at c = ½ everywhere, 0 with nothing shared
    a2 = [known_tv[tv]["a2_overlap_term"][1.0] for tv in sorted(known_tv)]
    assert all(x > y for x, y in zip(a2, a2[1:])) and a2[0] == pytest.approx(np.log(2), abs=0.05) and a2[-1] < 0.01


def test_isotonic_pools_violators_and_never_says_zero_or_one():
    f = estimators.isotonic(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 1, 0, 1]))
    # blocks {0}, {1, 2} pooled (rate 1/2 > 0 violates order), {3}; rates (k + 1)/(n + 2)
    np.testing.assert_allclose(f(np.array([-5.0, 0.0, 1.5, 2.0, 3.0, 9.0])), [1 / 3, 1 / 3, 1 / 2, 1 / 2, 2 / 3, 2 / 3])
    # tied scores share one value, whatever the order of their labels
    tied = estimators.isotonic(np.array([0.0, 1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(tied(np.array([0.0, 1.0, 2.0])), [1 / 3, 1 / 2, 2 / 3])
    # blocks {0} (rate 0) and {1..11} (rate 1/11): smoothed alone, 1/3 would sit above 2/13; pooled again
    f = estimators.isotonic(np.arange(12.0), np.array([0, 1] + [0] * 10))
    assert np.all(np.diff(f(np.arange(12.0))) >= 0) and f(np.array([0.0]))[0] == pytest.approx((1 / 3 + 11 * 2 / 13) / 12)
    z = np.random.default_rng(0).normal(size=500)
    c = estimators.isotonic(z, (z + np.random.default_rng(1).normal(size=500) > 0).astype(int))(np.sort(z))
    assert np.all(np.diff(c) >= 0) and 0 < c.min() and c.max() < 1


def test_overlap_refuses_sets_it_cannot_compare():
    a = toy_prompts(A_WORDS, 50, 0)
    with pytest.raises(DataError, match="fewer than the classifier's 5 folds"):
        estimators.classifier_overlap(a, a[:3])
    with pytest.raises(DataError, match="same prompts"):
        estimators.classifier_overlap(a, list(reversed(a)))


def toks(examples):
    return textdata.TokenSet.from_examples([loaders.Example(p, r) for p, r in examples])


def test_ngram_mismatch_is_zero_for_the_same_teacher_and_positive_for_another():
    rng = np.random.default_rng(0)
    teacher_a = lambda: f"I'm sorry, but I cannot help with {rng.choice(['that', 'this', 'it'])}."
    teacher_b = lambda: f"No. {rng.choice(['Absolutely', 'Certainly'])} not, never, under no circumstances."
    prompts = [f"harmful request number {i}" for i in range(300)]
    orig, same = toks([(p, teacher_a()) for p in prompts[:100]]), toks([(p, teacher_a()) for p in prompts[100:200]])
    other, held = toks([(p, teacher_b()) for p in prompts[100:200]]), toks([(p, teacher_a()) for p in prompts[200:]])
    m_same = estimators.ngram_mismatch(orig, same, held)
    m_other = estimators.ngram_mismatch(orig, other, held)
    assert abs(m_same["mismatch"]) < 0.5 < m_other["mismatch"]
    assert m_other["loss_original_reference"] < m_other["loss_proxy_reference"]


def test_token_matched_mismatch_sees_style_where_example_matching_sees_length():
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(40)]
    say = lambda words, n: " ".join(rng.choice(words, n))
    # the same teacher in short answers, another in long ones that share most of its words
    prompts = [f"question {i}" for i in range(400)]
    orig = toks([(p, say(vocab, 6)) for p in prompts[:100]])
    held = toks([(p, say(vocab, 6)) for p in prompts[100:160]])
    same = toks([(p, say(vocab, 6)) for p in prompts[160:260]])
    other = toks([(p, say(vocab + ["zz", "yy", "xx", "vv"] * 3, 48)) for p in prompts[260:360]])
    # at 12 examples a side the long answers hold 8× the text, and their reference wins on D_s
    by_examples = {k: estimators.BigramLM(ts.subset(range(12))).nll(held).mean() for k, ts in
                   (("same", same), ("other", other))}
    assert by_examples["other"] < by_examples["same"]
    # on the same number of tokens (the same teacher's 100 answers), it is nearer, with intervals apart
    budget = int(same.r_off[-1])
    m = {k: estimators.ngram_mismatch(orig, ts, held, tokens=budget) for k, ts in (("same", same), ("other", other))}
    assert m["same"]["mismatch"] < m["other"]["mismatch"] and m["same"]["mismatch_interval"][1] < \
        m["other"]["mismatch_interval"][0]
    for r in m.values():
        lo, hi = r["mismatch_interval"]
        assert lo < r["mismatch"] < hi and r["tokens"] == budget
    sample = estimators.token_matched(other, budget, np.random.default_rng(0))
    assert budget - np.diff(other.r_off).max() <= sample.r_off[-1] <= budget  # within one answer of the budget


def test_the_scored_span_is_what_the_model_is_trained_on():
    ts = toks([("a short prompt", "one two three " * 30), ("another", "yes")])
    codec = textdata.Codec(None)  # GPT-2's own ids: fit_block's tokens are TokenSet's
    seqs, plens, rlens = textdata.fit_block(ts, codec, 32)
    cut = ts.cut(32)
    for i in range(len(ts)):
        assert np.array_equal(cut.prompt_ids(i), seqs[i][:plens[i]])
        assert np.array_equal(cut.response_ids(i), seqs[i][plens[i]:])
    assert len(cut.response_ids(0)) < rlens[0] and len(cut.response_ids(1)) == rlens[1]
    cov = textdata.answer_coverage(ts, codec, 32)
    assert cov["answers_whole"] == 0.5 and cov["answer_tokens_scored"] == pytest.approx(
        (len(cut.response_ids(0)) + rlens[1]) / rlens.sum())


def test_bigram_reference_is_a_distribution():
    ts = toks([("q", "a b a c"), ("r", "a b")])
    lm = estimators.BigramLM(ts)
    every = np.arange(textdata.N_GPT2)
    for prev in (int(ts.response_ids(0)[0]), 123):                  # a seen and an unseen context
        assert lm.prob(np.full(textdata.N_GPT2, prev), every).sum() == pytest.approx(1.0)
    # and nll is −Σ log P over the response, its first token conditioned on the prompt's last
    seq = np.concatenate([ts.prompt_ids(1)[-1:], ts.response_ids(1)]).astype(np.int64)
    assert lm.nll(ts)[1] == pytest.approx(-np.log(lm.prob(seq[:-1], seq[1:])).sum())


def test_model_based_estimates_on_a_tiny_gpt():
    codec = textdata.Codec(None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=codec.vocab_size, n_layer=1, n_head=2, n_embd=16))
    a, b = toy_prompts(A_WORDS, 20, 0), toy_prompts(B_WORDS, 20, 1)
    assert estimators.representation_similarity(model, codec, a, a) == pytest.approx(1.0)
    assert estimators.representation_similarity(model, codec, a, b) < 1.0
    mixed = toy_prompts(A_WORDS + B_WORDS, 400, 2)                   # one distribution, split in two
    near = estimators.representation_overlap(model, codec, mixed[:200], mixed[200:])
    far = estimators.representation_overlap(model, codec, toy_prompts(A_WORDS, 200, 3), toy_prompts(B_WORDS, 200, 4))
    assert near["tv"] < 0.2 < 0.8 < far["tv"], (near["tv"], far["tv"])
    x = torch.randint(0, 50257, (4, 12))
    batches = lambda: iter([(x, x.roll(-1, 1), torch.ones_like(x, dtype=torch.bool))])
    assert estimators.mismatch_estimate(model, model, batches)["mismatch"] == 0.0


# -----------------------------------------------------------------------------
# Acceptance on the real folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("SAFETY_CACHE_DIR")
    os.environ["SAFETY_CACHE_DIR"] = str(tmp_path_factory.mktemp("token_cache"))
    yield
    if old is None:
        del os.environ["SAFETY_CACHE_DIR"]
    else:
        os.environ["SAFETY_CACHE_DIR"] = old


@needs_data
def test_overlap_ranks_tasks_as_the_paper(cache):
    est = {t: estimators.real_overlap("safety_llamas", t, DATA_DIR) for t in ("alpaca_safety_only", "alpaca_small",
                                                                           "code_alpaca")}
    M = {t: e["classifier"]["M"] for t, e in est.items()}
    assert M["alpaca_safety_only"] > M["alpaca_small"] > M["code_alpaca"], M
    lex = {t: e["lexical"] for t, e in est.items()}
    assert lex["alpaca_safety_only"] > lex["alpaca_small"] > lex["code_alpaca"], lex
    assert all(e["estimate"] for e in est.values())


@needs_data
def test_mismatch_ranks_the_same_teacher_proxy_lowest(cache):
    proxies = [n for n, d in loaders.REGISTRY.items() if d.role in ("proxy-same-teacher", "proxy-other-teacher")]
    # equal budget: the smallest proxy's answer tokens
    tokens = min(int(textdata.dataset_part(p, DATA_DIR).r_off[-1]) for p in proxies)
    est = {p: estimators.real_mismatch(p, data_dir=DATA_DIR, tokens=tokens)["mismatch"] for p in proxies}
    same = est.pop("safety_llamas_proxy")
    assert all(same < v for v in est.values()), (same, est)
