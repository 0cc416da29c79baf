"""Real-data estimators of THEORY.md §4: context overlap (classifier, lexical,
representation) and mismatch (reference models), on toy sets with known answers and,
when the data folder is there, the rankings the paper's datasets should give."""
import os

import numpy as np
import pytest
import torch

import estimators
import loaders
import textdata
from model import GPT, GPTConfig

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


def test_classifier_overlap_separates_disjoint_sets_and_not_identical_ones():
    a, b = toy_prompts(A_WORDS, 200, 0), toy_prompts(B_WORDS, 200, 1)
    far = estimators.classifier_overlap(a, b, lams=(1.0, 10.0, 100.0))
    assert far["accuracy"] == 1.0 and far["tv"] > 0.8 and far["M"] == pytest.approx(1 - far["tv"])
    a2 = far["a2_overlap_term"]
    assert a2[1.0] > a2[10.0] > a2[100.0] > 0                      # the (A2) term falls as λ grows
    mixed = toy_prompts(A_WORDS + B_WORDS, 400, 2)                   # one distribution, split in two
    near = estimators.classifier_overlap(mixed[:200], mixed[200:])
    assert near["tv"] < 0.35 and near["M"] > far["M"] + 0.5 and abs(near["accuracy"] - 0.5) < 0.12


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
    n = min(len(textdata.dataset_part(p, DATA_DIR)) for p in proxies)  # equal budget: the smallest proxy's size
    est = {p: estimators.real_mismatch(p, data_dir=DATA_DIR, n=n)["mismatch"] for p in proxies}
    same = est.pop("safety_llamas_proxy")
    assert all(same < v for v in est.values()), (same, est)
