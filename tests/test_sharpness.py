"""θ_0s of different sharpness (THEORY.md §5 F6): the SAM aligner and the adaptive sharpness that
a function-preserving rescaling cannot change."""
import json

import pytest
import torch

import theory
import train
from conftest import run_train
from constraints import PlainAlign, SharpnessAware, make_aligner
from data import Streams, SyntheticWorld


def tiny_setup(seed=3, micro_batch=32):
    """A 1-layer model on the world; batches of 32 sequences, in 32 / micro_batch micro-batches."""
    cfg = train.TrainConfig(n_layer=1, n_head=2, n_embd=8, device="cpu", dtype="float32", seed=seed,
                            batch_tokens=160, micro_batch=micro_batch)
    world = SyntheticWorld(train.world_config(cfg))
    sys_ = train.setup_system(cfg)
    model = train.new_model(cfg, world, sys_).double()  # float64: Adam's m/√v magnifies round-off in small gradients
    return cfg, world, sys_, model


def steps(aligner, n=3, micro_batch=32):
    """n align steps of a tiny model through train.train_step; the weights after them."""
    cfg, world, sys_, model = tiny_setup(micro_batch=micro_batch)
    streams = Streams("align", world, cfg, sys_, False)
    optimizer = train.make_optimizer(model, cfg, 1e-2, sys_)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(n):
        train.train_step(model, optimizer, scaler, params, None, sys_, streams.batch(streams.main), None,
                         streams.accum, cfg.grad_clip, 0.0, aligner)
    return [p.detach().clone() for p in params]


def hand_sam(n=3, rho=0.1):
    """The same n steps written out as Foret et al. (2021) state SAM: g = ∇ℓ(θ), ε = ρ g/‖g‖,
    step from θ with ∇ℓ(θ + ε), clipped like every step."""
    cfg, world, sys_, model = tiny_setup()
    streams = Streams("align", world, cfg, sys_, False)
    optimizer = train.make_optimizer(model, cfg, 1e-2, sys_)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(n):
        x, y, m, _ = streams.batch(streams.main)
        g = torch.autograd.grad(model(x, y, m)[1], params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(rho * t / norm)
        g_eps = torch.autograd.grad(model(x, y, m)[1], params)
        with torch.no_grad():
            for p, t, ge in zip(params, theta, g_eps):
                p.copy_(t)
                p.grad = ge.clone()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("micro_batch", [32, 8])  # one micro-batch a step, and four accumulated
def test_a_sam_step_is_the_hand_written_one_and_not_a_plain_step(micro_batch):
    sam, hand = steps(SharpnessAware(sam_rho=0.1), micro_batch=micro_batch), hand_sam(rho=0.1)
    plain = steps(PlainAlign(), micro_batch=micro_batch)
    for a, b in zip(sam, hand):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert max(float((a - b).abs().max()) for a, b in zip(sam, plain)) > 1e-4  # the ascent mattered


def test_sam_at_radius_zero_aligns_exactly_like_plain_alignment(tmp_path):
    common = ["--stage", "align", "--no-progress", "--align_iters", "60", "--eval_interval", "30",
              "--n_embd", "16", "--n_head", "2", "--n_layer", "1"]
    thetas = {}
    for name, extra in {"plain": [], "sam0": ["--align_method", "sam", "--sam_rho", "0"],
                        "sam": ["--align_method", "sam", "--sam_rho", "0.05"]}.items():
        run_train("--out_dir", str(tmp_path / name), *common, *extra)
        thetas[name] = torch.load(tmp_path / name / "theta0.pt", weights_only=True)
    plain, sam0, sam = (thetas[k]["model"] for k in ("plain", "sam0", "sam"))
    assert plain.keys() == sam0.keys() and all(torch.equal(plain[k], sam0[k]) for k in plain)
    assert any(not torch.equal(plain[k], sam[k]) for k in plain)        # the flag reaches the align stage
    keys = {k: json.loads((tmp_path / k / "config.json").read_text()) for k in thetas}
    assert keys["sam"]["config"]["align_method"] == "sam" and keys["sam"]["config"]["sam_rho"] == 0.05


def test_the_aligner_is_part_of_theta0s_key_only_when_set(monkeypatch):
    base = train.TrainConfig()
    assert train.align_key(train.TrainConfig(sam_rho=0.2)) == train.align_key(base)   # plain reads no ρ
    cfg = train.TrainConfig(align_method="sam", sam_rho=0.05)
    sam = train.align_key(cfg)
    assert sam != train.align_key(base) and sam != train.align_key(train.TrainConfig(align_method="sam", sam_rho=0.1))
    monkeypatch.setattr(train.TrainConfig, "sam_rho", 0.1)  # a later default never renames a saved SAM θ_0
    assert train.align_key(cfg) == sam


@pytest.mark.parametrize("args, words", [
    (["--align_method", "sam", "--sam_rho=-0.1"], "--sam_rho"),
    (["--align_method", "sam", "--sam_rho", "nan"], "--sam_rho"),
    (["--align_method", "adam"], "invalid choice"),
    (["--sam_rho", "0.1"], "--align_method sam"),
])
def test_bad_sharpness_flags_fail_with_one_message_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "never"
    proc = run_train("--out_dir", str(out), "--stage", "align", "--no-progress", *args, check=False)
    assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and not out.exists()


def test_make_aligner_names_the_unknown_method():
    with pytest.raises(ValueError, match="--align_method 'adam'"):
        make_aligner({"align_method": "adam"})


# -----------------------------------------------------------------------------
# Adaptive sharpness: λ_max and trace of T H T, T = diag(|θ|)


def rescale(model, alpha, beta, gamma):
    """A rescaling θ' = Dθ (D positive diagonal) that keeps the model's function: in every block,
    queries × α and keys ÷ α (q·k unchanged), values × β and the output projection's input columns
    ÷ β, and each LayerNorm's gain and bias × γ with the input columns of the layer it feeds ÷ γ."""
    with torch.no_grad():
        for block in model.transformer.h:
            C = block.attn.c_proj.weight.shape[0]
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            for part, s in ((slice(0, C), alpha), (slice(C, 2 * C), 1 / alpha), (slice(2 * C, 3 * C), beta)):
                w[part] *= s
                b[part] *= s
            block.attn.c_proj.weight[:, :] /= beta
            for ln, nxt in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                ln.weight *= gamma
                ln.bias *= gamma
                nxt.weight[:, :] /= gamma


def full_matrix(op, n):
    return torch.stack([op(col) for col in torch.eye(n, dtype=torch.float64)], 1)


def test_adaptive_sharpness_ignores_a_function_preserving_rescaling_that_moves_raw_lambda_max():
    cfg = train.TrainConfig(n_layer=1, n_head=2, n_embd=4, n_symbols=4, ctx_len=2, n_harmful=2, seed=3)
    world = SyntheticWorld(train.world_config(cfg))   # 528 weights: the whole Hessian in seconds
    model = train.new_model(cfg, world, train.setup_system(cfg)).double().eval()
    pop = theory.population_batch(world, "safety")

    def measured():
        land = theory.LossLandscape(model, lambda m: theory.population_loss(m, pop))
        H = full_matrix(land.hvp, land.n)
        A = full_matrix(theory.adaptive_hvp(lambda v: H @ v, theory.flat_weights(model)), land.n)
        return land, H, A

    before, H0, A0 = measured()
    rescale(model, alpha=128.0, beta=128.0, gamma=0.0625)  # powers of 2: exact
    after, H1, A1 = measured()
    assert float(after.loss.detach()) == pytest.approx(float(before.loss.detach()), rel=1e-9)  # the same function
    raw0, raw1 = float(torch.linalg.eigvalsh(H0)[-1]), float(torch.linalg.eigvalsh(H1)[-1])
    assert max(raw1 / raw0, raw0 / raw1) > 2                                            # raw λ_max moved
    assert float(H1.trace()) != pytest.approx(float(H0.trace()), rel=0.1)              # and so did tr H
    ad0, ad1 = float(torch.linalg.eigvalsh(A0)[-1]), float(torch.linalg.eigvalsh(A1)[-1])
    assert ad1 == pytest.approx(ad0, rel=1e-6)                                          # adaptive did not
    assert float(A1.trace()) == pytest.approx(float(A0.trace()), rel=1e-6)
    # the power iteration the experiment runs, on the autograd HVP, finds the same adaptive λ_max
    lam, _, _ = theory.power_iteration(theory.adaptive_hvp(after.hvp, theory.flat_weights(model)), after.n,
                                       iters=500, tol=1e-7)
    assert lam == pytest.approx(ad0, rel=1e-4)
