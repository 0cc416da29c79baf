"""The synthetic world: exact densities, a faithful sampler, and exact gaps."""
import numpy as np
import pytest
import torch

from common import DataError
from data import SyntheticWorld, WorldConfig, conditional_entropy, gap
from evaluate import exact_metrics, model_log_table

NAMES = ("safety", "proxy", "task")


@pytest.fixture(scope="module", params=[(0.25, 0.3), (0.0, 0.0), (1.0, 1.0)])
def world(request):
    k, d = request.param
    return SyntheticWorld(WorldConfig(overlap=k, mismatch=d))


def test_densities_sum_to_one(world):
    for name in NAMES:
        assert world.mu[name].sum() == pytest.approx(1.0, abs=1e-12)
        assert (world.mu[name] >= 0).all() and (world.P[name] >= 0).all()
        np.testing.assert_allclose(world.P[name].reshape(len(world.contexts), -1).sum(1), 1.0, atol=1e-12)


def test_world_structure_matches_the_knobs():
    w = SyntheticWorld(WorldConfig(overlap=0.4, mismatch=0.0))
    S = w.harmful.numpy()
    assert w.mu["task"][S].sum() == pytest.approx(0.4)       # κ of the task mass on S
    assert np.array_equal(w.P["proxy"], w.P["safety"])        # δ = 0: the proxy is the original
    assert gap(w.mu["safety"], w.P["safety"], w.P["proxy"]) == pytest.approx(0.0, abs=1e-12)
    w1 = SyntheticWorld(WorldConfig(overlap=0.4, mismatch=0.5))
    assert gap(w1.mu["safety"], w1.P["safety"], w1.P["proxy"]) > 0.05


def cell_counts(world, name, n, seed=0):
    """Samples of one dataset counted in every (context, opener, content) cell, with each
    cell's exact probability μ(x)·P(o, c|x) beside it."""
    x, y, m = world.batch(name, n, torch.Generator().manual_seed(seed))
    L, n_sym = world.wc.ctx_len, world.wc.n_symbols
    assert m.sum(1).eq(2).all() and m[:, L:].all()
    ctx = sum(x[:, i] * n_sym ** (L - 1 - i) for i in range(L))   # the row of world.contexts
    o = torch.searchsorted(world.open_ids, y[:, L].contiguous())
    c = torch.searchsorted(world.content_ids, y[:, L + 1].contiguous())
    n_open, n_content = world.P[name].shape[1:]
    counts = torch.bincount((ctx * n_open + o) * n_content + c, minlength=world.P[name].size).numpy()
    return counts, (world.mu[name][:, None, None] * world.P[name]).ravel()


def chi_square_z(counts, exact, min_expected=5.0):
    """Pearson's χ² of the counts against n·exact, cells with an expected count under
    min_expected pooled into one, as a z-score by the Wilson–Hilferty approximation
    (χ²_k/k)^(1/3) ≈ N(1 − 2/(9k), 2/(9k)): large when the sampler is wrong."""
    n = counts.sum()
    expected = n * exact
    big, small = expected >= min_expected, (expected > 0) & (expected < min_expected)
    obs, exp = counts[big], expected[big]
    if small.any():
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    stat, k = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    return ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))


SMALL = WorldConfig(n_symbols=6, n_harmful=2, overlap=0.5, mismatch=0.5)  # 216 contexts, 10,368 cells


@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_the_density_in_every_cell(name):
    world = SyntheticWorld(SMALL)
    counts, exact = cell_counts(world, name, 200_000)
    assert counts[exact == 0].sum() == 0        # nothing outside the support
    assert chi_square_z(counts, exact) < 4.0    # χ² over every (context, response) cell


@pytest.mark.parametrize("ignored", [1, 2])     # the 2nd or the 3rd symbol of the context
def test_the_cell_test_rejects_a_sampler_that_ignores_a_symbol(ignored):
    world = SyntheticWorld(SMALL)
    ctx = world.contexts.clone()
    ctx[:, ignored] = 0  # answer every context as if that symbol were 0
    rows = sum(ctx[:, i] * SMALL.n_symbols ** (SMALL.ctx_len - 1 - i) for i in range(SMALL.ctx_len))
    world._cdf["task"] = world._cdf["task"][rows]
    counts, exact = cell_counts(world, "task", 200_000)
    assert chi_square_z(counts, exact) > 100.0


class Oracle(torch.nn.Module):
    """A 'model' whose next-token distributions are the true conditionals of one dataset:
    p(o|x) at SEP and p(c|x,o) at o, read from the world's tables."""

    def __init__(self, world, name):
        super().__init__()
        self.w, P = world, torch.from_numpy(world.P[name])
        self.p_open = P.sum(2)                                           # (n_ctx, n_open)
        self.p_content = P / self.p_open.clamp(min=1e-300).unsqueeze(2)  # (n_ctx, n_open, n_content)

    def forward(self, idx):
        n, L = self.w.wc.n_symbols, self.w.wc.ctx_len
        ctx = sum(idx[:, i] * n ** (L - 1 - i) for i in range(L))
        logits = torch.full((*idx.shape, self.w.vocab_size), -1e9, dtype=torch.float64)
        logits[:, L, self.w.open_ids] = self.p_open[ctx].log()
        o = torch.searchsorted(self.w.open_ids, idx[:, L + 1])
        logits[:, L + 1, self.w.content_ids] = self.p_content[ctx, o].log()
        return logits, None


def test_oracle_model_has_zero_gap(world):
    m_s = exact_metrics(model_log_table(Oracle(world, "safety"), world), world)
    assert m_s["safety_gap"] == pytest.approx(0.0, abs=1e-9)
    assert m_s["safety_loss"] == pytest.approx(world.entropy("safety"), abs=1e-9)
    m_f = exact_metrics(model_log_table(Oracle(world, "task"), world), world)
    assert m_f["capability_gap"] == pytest.approx(0.0, abs=1e-9)
    # and a wrong model has a positive gap: the task oracle on safety data
    assert m_f["safety_gap"] > 1.0 or world.wc.overlap == 1.0 and m_f["safety_gap"] > 0


def test_gap_equals_expected_kl_for_any_model_table(world):
    rng = np.random.default_rng(0)
    q = rng.random(world.P["safety"].shape) + 1e-3
    q /= q.reshape(len(q), -1).sum(1)[:, None, None]
    met = exact_metrics(np.log(q), world)
    assert met["safety_gap"] == pytest.approx(gap(world.mu["safety"], world.P["safety"], q), rel=1e-10)
    assert met["safety_gap"] >= 0 and met["capability_gap"] >= 0


def test_entropy_is_exact_for_a_known_case():
    mu = np.array([0.5, 0.5])
    P = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])
    assert conditional_entropy(mu, P) == pytest.approx(0.5 * np.log(2))


@pytest.mark.parametrize("kw", [{"overlap": -0.1}, {"overlap": 1.5}, {"mismatch": 2.0}, {"n_harmful": 0}])
def test_bad_world_config_is_refused(kw):
    with pytest.raises(DataError):
        SyntheticWorld(WorldConfig(**kw))
