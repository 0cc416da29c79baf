"""Case I objective and Case II projection and penalty (THEORY.md §2–§3)."""
import pytest
import torch

from constraints import STRATEGIES, distance, make_strategy, project_
from model import GPT, GPTConfig, flat_params


def params_and_theta0(seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=8))
    params = flat_params(model)
    theta0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))
    return model, params, theta0


def flat(ts):
    return torch.cat([t.detach().reshape(-1) for t in ts])


# both paths: the multi-tensor one (GPU) and the CPU one that forms θ − θ_0 in a small
# buffer, here of 7 elements so that every tensor spans several pieces and a remainder
CHUNKS = [None, 7]


def buf(chunk):
    return None if chunk is None else torch.empty(chunk)


@pytest.fixture(autouse=True)
def mixed_cpu_path(monkeypatch):
    # the CPU path sends tensors of ≤ SMALL elements through multi-tensor calls and the
    # rest through the buffer: at 10, this model's norms and biases (8 elements) take the
    # first road and its matrices the second
    import constraints
    monkeypatch.setattr(constraints, "SMALL", 10)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_distance_is_the_flat_l2_norm(chunk):
    _, params, theta0 = params_and_theta0()
    expected = (flat(params) - flat(theta0)).norm()
    torch.testing.assert_close(distance(params, theta0, buf(chunk)), expected)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("r", [0.0, 0.1, 1.0, 3.0])
def test_projection_lands_on_the_ball_along_the_same_direction(r, chunk):
    _, params, theta0 = params_and_theta0()
    before = flat(params) - flat(theta0)
    project_(params, theta0, r, buf(chunk))
    after = flat(params) - flat(theta0)
    assert after.norm() <= r * (1 + 1e-5) + 1e-7
    assert after.norm() == pytest.approx(min(r, before.norm().item()), rel=1e-5, abs=1e-7)
    if r > 0:
        torch.testing.assert_close(after / after.norm(), before / before.norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_projection_is_idempotent(chunk):
    _, params, theta0 = params_and_theta0()
    project_(params, theta0, 0.5, buf(chunk))
    once = flat(params).clone()
    project_(params, theta0, 0.5, buf(chunk))
    torch.testing.assert_close(flat(params), once, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_projection_is_an_exact_no_op_inside_the_ball(chunk):
    _, params, theta0 = params_and_theta0(scale=1e-3)
    before = [p.detach().clone() for p in params]
    assert distance(params, theta0, buf(chunk)) < 10.0
    project_(params, theta0, 10.0, buf(chunk))
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bit for bit


def test_penalty_gradient_matches_autograd_of_the_soft_constraint():
    model, params, theta0 = params_and_theta0()
    c = make_strategy("penalty", theta0, dict(gamma=0.7))
    for p in params:
        p.grad = torch.zeros_like(p)
    c.before_step(params)
    # autograd of (γ/2)‖θ − θ_0‖²
    pen = 0.35 * sum(((p - t0) ** 2).sum() for p, t0 in zip(params, theta0))
    grads = torch.autograd.grad(pen, params)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)


def test_case_one_objective_and_bad_values():
    c = make_strategy("loss", [torch.zeros(2)], dict(lam=10.0))
    assert c.needs_proxy and c.case == "I"
    assert c.objective(torch.tensor(1.0), torch.tensor(2.0)).item() == pytest.approx(21.0)
    assert make_strategy("none", [torch.zeros(2)], {}).objective(torch.tensor(1.0)).item() == 1.0
    with pytest.raises(ValueError, match="unknown"):
        make_strategy("bogus", [torch.zeros(2)], {})
    with pytest.raises(ValueError, match=r"--radius -1.0 must be a finite number ≥ 0 \(--constraint param\)"):
        make_strategy("param", [torch.zeros(2)], dict(radius=-1.0))
    with pytest.raises(ValueError, match="--gamma nan"):
        make_strategy("penalty", [torch.zeros(2)], dict(gamma=float("nan")))
    with pytest.raises(ValueError, match="--lam None"):  # a hyper-parameter the caller forgot
        make_strategy("loss", [torch.zeros(2)], {})


def test_every_strategy_declares_what_the_project_reads():
    for name, s in STRATEGIES.items():
        assert s.name == name and s.case in (None, "I", "II")
        assert s.sweep_param is None or s.sweep_param in s.hparams
        assert all(s.check({**{k: 1 for k in s.hparams}, s.sweep_param: v}) is None for v in s.grid)
        hp = {k: 1 for k in s.hparams}  # a whole number suits every kind of hyper-parameter
        assert make_strategy(name, [torch.zeros(2)], hp).distance([torch.ones(2)]).item() == pytest.approx(2 ** 0.5)


def test_both_projection_paths_give_the_same_weights():
    _, params, theta0 = params_and_theta0()
    twin = [p.detach().clone() for p in params]
    project_(params, theta0, 0.3)
    project_(twin, theta0, 0.3, buf(7))
    torch.testing.assert_close(flat(params), flat(twin), rtol=1e-6, atol=1e-7)


def fisher_and_model(n=6):
    from data import SyntheticWorld, WorldConfig
    torch.manual_seed(0)
    world = SyntheticWorld(WorldConfig(n_symbols=6, n_harmful=2))
    model = GPT(GPTConfig(block_size=world.block_size, vocab_size=world.vocab_size, n_layer=1, n_head=2, n_embd=16))
    params = flat_params(model)
    c = make_strategy("fisher", params, dict(gamma=0.7, fisher_examples=n))
    x, y, m = world.batch("proxy", n, torch.Generator().manual_seed(1))
    c.setup(model, lambda k: (x[:k], y[:k], m[:k]))
    return model, params, c, (x, y, m)


def test_fisher_is_the_mean_of_per_example_squared_gradients():
    model, params, c, (x, y, m) = fisher_and_model()
    # per-example gradients by torch.func, an independent road to the same F
    from torch.func import functional_call, grad, vmap
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss(ps, xi, yi, mi):
        return functional_call(model, dict(zip(names, ps)), (xi[None], yi[None], mi[None]))[1]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(tuple(params), x, y, m)
    for f, gi in zip(c.fisher, g):
        torch.testing.assert_close(f, (gi ** 2).mean(0), rtol=1e-4, atol=1e-9)
    assert sum(f.sum() for f in c.fisher) > 0


def test_fisher_penalty_gradient_matches_autograd_and_equals_penalty_when_F_is_one():
    model, params, c, _ = fisher_and_model()
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    for p in params:
        p.grad = torch.zeros_like(p)
    c.before_step(params)
    pen = 0.35 * sum((f * (p - t0) ** 2).sum() for f, p, t0 in zip(c.fisher, params, c.theta0))
    for p, g in zip(params, torch.autograd.grad(pen, params)):
        torch.testing.assert_close(p.grad, g)
    # F ≡ 1: the plain soft penalty, bit for bit, over a few AdamW steps
    twins = []
    for kind in ("penalty", "fisher"):
        torch.manual_seed(0)
        m2 = GPT(model.config)
        ps = flat_params(m2)
        s = make_strategy(kind, ps, dict(gamma=0.7, fisher_examples=1))
        if kind == "fisher":
            s.fisher = [torch.ones_like(p) for p in ps]
        opt = torch.optim.AdamW(ps, lr=1e-2)
        for step in range(3):
            torch.manual_seed(step)
            sum((p * torch.randn_like(p)).sum() for p in ps).backward()
            s.before_step(ps)
            opt.step()
            opt.zero_grad()
        twins.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    assert torch.equal(twins[0], twins[1])


def test_fisher_bad_examples():
    with pytest.raises(ValueError, match=r"--fisher_examples 0 must be a whole number ≥ 1"):
        make_strategy("fisher", [torch.zeros(2)], dict(gamma=1.0, fisher_examples=0))
