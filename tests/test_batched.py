"""batched.py: K fine-tunes trained as one stacked model equal their single runs of train.py
(same seed, same batches: the same weights to float tolerance, the same files), and runs that
cannot share a model are refused with the difference named."""
import dataclasses
import json
import os

import pytest
import torch

import constraints
import train
from common import ConfigError
from lab import batched
from model import load_checkpoint

STEPS = 60  # enough for the runs to part ways: the projection binds, λ matters, the task is being learned
# the smoke preset's world and model: every code path in seconds
SMALL = ["--no-progress", "--n_symbols", "6", "--n_harmful", "2", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
         "--align_iters", "150", "--lr", "4e-3", "--warmup_iters", "10", "--batch_tokens", "640", "--micro_batch", "64",
         "--max_iters", str(STEPS), "--eval_interval", "25", "--seed", "7"]


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    out = tmp_path_factory.mktemp("theta0")
    train.main(train.parse_args(SMALL + ["--out_dir", str(out), "--stage", "align"]), argv=[])
    return str(out / "theta0.pt")


def config(out_dir, theta0, **knobs):
    base = train.parse_args(SMALL)
    return train.TrainConfig(**{**vars(base), "out_dir": str(out_dir), "stage": "finetune", "theta0": theta0,
                                **knobs})


GROUPS = (  # Case I runs in one group, the others in another, as sweep.py groups them
    ({"constraint": "loss", "lam": 0.3}, {"constraint": "loss", "lam": 3.0, "overlap": 0.5, "mismatch": 0.0}),
    ({"constraint": "none"}, {"constraint": "param", "radius": 0.2}, {"constraint": "param", "radius": 1e3, "overlap": 0}),
)


def comparable(state):
    """The weights, less the key bias: its true gradient is 0 (adding one vector to every key shifts
    all of a query's scores alike, and softmax ignores a shift), so AdamW's normalised step turns the
    float noise of that 0 into steps of the size of lr, different in any two runs of different
    arithmetic, and with no effect on any output."""
    out = dict(state)
    for name, t in state.items():
        if name.endswith("attn.c_attn.bias"):
            c = t.numel() // 3
            out[name] = torch.cat([t[:c], t[2 * c:]])
    return out


@pytest.mark.parametrize("group", GROUPS, ids=["case-I", "none-and-case-II"])
def test_a_batched_group_equals_its_single_runs(tmp_path, theta0, group):
    singles = [config(tmp_path / f"single{i}", theta0, **k) for i, k in enumerate(group)]
    members = [config(tmp_path / f"batched{i}", theta0, **k) for i, k in enumerate(group)]
    for cfg in singles:
        train.main(cfg, argv=[])
    batched.finetune_group(members)
    start = load_checkpoint(theta0)["model"]
    for s, b in zip(singles, members):
        a, c = (load_checkpoint(os.path.join(x.out_dir, "ckpt.pt")) for x in (s, b))
        assert a["step"] == c["step"] == STEPS and c["kind"] == "finetune-resume"
        wa, wc, w0 = comparable(a["model"]), comparable(c["model"]), comparable(start)
        moved = sum((wa[k] - w0[k]).square().sum() for k in wa).sqrt()
        assert moved > 0.15  # the runs did move: equality is not that of two copies of θ_0
        for k in wa:
            torch.testing.assert_close(wc[k], wa[k], rtol=0, atol=2e-5, msg=f"{b.out_dir} {k}")
        assert c["optimizer"]["param_groups"] == a["optimizer"]["param_groups"]
        for j, st in a["optimizer"]["state"].items():  # the member's AdamW state is its single run's
            assert torch.equal(c["optimizer"]["state"][j]["step"], st["step"])
            torch.testing.assert_close(c["optimizer"]["state"][j]["exp_avg"], st["exp_avg"], rtol=0, atol=1e-6)
            torch.testing.assert_close(c["optimizer"]["state"][j]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-12)
        assert all(torch.equal(a["generators"][n], c["generators"][n]) for n in a["generators"])  # same batches
        ma, mc = (json.load(open(os.path.join(x.out_dir, "metrics.json"))) for x in (s, b))
        assert ma.keys() == mc.keys() and ma["aligned"] == mc["aligned"]  # θ_0's exact metrics, bit for bit
        for key, v in ma["finetuned"].items():
            assert mc["finetuned"][key] == pytest.approx(v, abs=1e-5), key
        la, lc = ([json.loads(line) for line in open(os.path.join(x.out_dir, "log.jsonl"))] for x in (s, b))
        assert [(r["stage"], r["step"]) for r in la] == [(r["stage"], r["step"]) for r in lc] == [
            ("finetune", 0), ("finetune", 25), ("finetune", 50), ("finetune", STEPS)]
        for ra, rc in zip(la, lc):  # every logged number: exact metrics, distance, the step's loss
            assert ra.keys() == rc.keys()
            for key, v in ra.items():
                if isinstance(v, float):
                    assert rc[key] == pytest.approx(v, rel=1e-5, abs=1e-6), (key, ra["step"])
        if s.constraint == "param":
            assert mc["finetuned"]["distance"] <= s.radius * (1 + 1e-6)
    # a member's folder is a finished train.py run: --resume loads its checkpoint (AdamW state and
    # all) and finds nothing left to do, with the same result
    before = json.load(open(os.path.join(members[0].out_dir, "metrics.json")))
    train.main(dataclasses.replace(members[0], resume=True), argv=[])
    assert json.load(open(os.path.join(members[0].out_dir, "metrics.json"))) == before
    binding = [json.load(open(os.path.join(m.out_dir, "metrics.json")))["finetuned"]["distance"] for m in members]
    if group is GROUPS[1]:
        assert binding[1] == pytest.approx(0.2, rel=1e-5) and binding[2] > 0.2  # one ball binds, one does not


def test_runs_that_cannot_share_a_model_are_refused_naming_why(tmp_path, theta0):
    a = config(tmp_path / "a", theta0, constraint="loss", lam=1.0)
    with pytest.raises(ConfigError, match="n_embd"):
        batched.check_group([a, config(tmp_path / "b", theta0, constraint="loss", n_embd=16)])
    with pytest.raises(ConfigError, match="proxy batches"):
        batched.check_group([a, config(tmp_path / "c", theta0, constraint="param", radius=1.0)])
    with pytest.raises(ConfigError, match="a penalty run"):
        batched.check_group([a, config(tmp_path / "d", theta0, constraint="penalty", gamma=1.0)])
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before anything was written


def test_clipping_and_the_projection_are_each_members_own():
    """batched's clipping and projection against torch's clip_grad_norm_ and constraints.project_ run on
    each member alone: members of very different norms, a clip that binds for some, balls that bind for
    some (and r = ∞)."""
    g = torch.Generator().manual_seed(0)
    shapes, scales = [(3, 4), (5,), (2, 2, 2)], torch.tensor([0.01, 1.0, 30.0])
    stacked = [torch.randn(3, *s, generator=g) * scales.view(-1, *[1] * len(s)) for s in shapes]
    theta0 = [torch.randn(*s, generator=g) for s in shapes]
    params = [t.clone().requires_grad_() for t in stacked]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scales.view(-1, *[1] * (p.dim() - 1))
    singles = [[p[k].detach().clone().requires_grad_() for p in params] for k in range(3)]
    for k, ps in enumerate(singles):
        for p, q in zip(ps, params):
            p.grad = q.grad[k].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
    batched.clip_grad_norms_(params, 1.0)
    for k, ps in enumerate(singles):
        for p, q in zip(ps, params):
            torch.testing.assert_close(q.grad[k], p.grad)
    assert singles[0][0].grad.abs().max() < 1.0 and params[2].grad[2].norm() < 1.0 + 1e-5  # one kept, one clipped
    radii = torch.tensor([float("inf"), 0.5, 1e3])
    with torch.no_grad():
        batched.project_(params, theta0, radii)
    for k, r in enumerate((float("inf"), 0.5, 1e3)):
        single = [t[k].clone() for t in stacked]
        constraints.project_(single, theta0, r)
        for p, q in zip(single, params):
            torch.testing.assert_close(q[k].detach(), p, rtol=0, atol=1e-6)
    assert batched.distances(params, theta0)[1] == pytest.approx(0.5, rel=1e-6)
    assert torch.equal(params[0][0].detach(), stacked[0][0])  # r = ∞: untouched, bit for bit
