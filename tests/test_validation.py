"""θ_0 at its alignment optimum (realtext/validation.py): alignment stopped at the least ℓ_s on D_s's
validation part, a part no other part shares, resumed exactly, and its bad input."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import train
from evaluate import heldout_nll
from realtext import textdata

WORDS = "the of and to in is you that it for are with as be this on your can or have".split()  # in the capped vocabulary


def write_pairs(path, n, seed, length):
    """n (prompt, response) pairs whose responses are random words: nothing to learn past their
    frequencies, so that training on them soon stops lowering the validation loss."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Describe item {i} of set {seed}",
                                "response": " ".join(rng.choice(WORDS) for _ in range(length)) + "."}) + "\n")
    return str(path)


def config(tmp_path, **kw):
    ds = write_pairs(tmp_path / "ds.jsonl", 160, 0, 14)
    other = write_pairs(tmp_path / "other.jsonl", 60, 1, 6)
    return train.TrainConfig(**{**dict(
        data="real", stage="align", safety_data=ds, proxy_data=other, task_data=other, block_size=48, n_layer=1,
        n_embd=32, align_iters=300, align_lr=1e-2, warmup_iters=1, align_eval_interval=10, align_patience=3,
        batch_tokens=384, micro_batch=8, eval_examples=32, vocab_cap=512, out_dir=str(tmp_path / "run"),
        progress=False), **kw})


def test_the_validation_part_is_its_own_prompts(tmp_path):
    cfg = config(tmp_path)
    world = train.make_world(cfg)
    assert len(world.keys["validation"]) > 0 and "validation" in world.eval_sets
    for part, keys in world.keys.items():
        assert part == "validation" or not np.isin(world.keys["validation"], keys).any(), part
    # a split's D_s: its val part, a tenth of the prompts, where the alignment part was
    keys = np.random.default_rng(0).integers(0, 2 ** 63, size=20000, dtype=np.uint64) * np.uint64(2)
    val, u = textdata.split_part(keys, "val"), textdata.key_fraction(keys)
    assert abs(val.mean() - 0.10) < 0.01 and (u[val] >= 0.5).all() and (u[val] < 0.6).all()


def test_theta0_is_the_weights_of_least_validation_loss_and_alignment_stops_after_patience(tmp_path):
    cfg = config(tmp_path)
    train.main(cfg, argv=[])
    ckpt = torch.load(tmp_path / "run" / "theta0.pt", weights_only=True)
    rec = ckpt["early_stop"]
    steps, losses = zip(*rec["validation_curve"])
    assert rec["stop_step"] == steps[int(np.argmin(losses))] and rec["validation_loss"] == min(losses)
    # stopped after `patience` evaluations without a new least, well before align_iters
    assert rec["last_step"] == rec["stop_step"] + cfg.align_patience * cfg.align_eval_interval < cfg.align_iters
    assert list(steps) == list(range(0, rec["last_step"] + 1, cfg.align_eval_interval))
    # θ_0 holds those weights, not the last step's: its validation loss, measured again, is the least
    world = train.make_world(cfg, ckpt["world_config"]["vocab"])
    model = train.new_model(cfg, world, train.setup_system(cfg))
    model.load_state_dict(ckpt["model"])
    assert heldout_nll(model, world.eval_batches("validation")) == pytest.approx(rec["validation_loss"], rel=1e-6)
    assert rec["validation_loss"] < losses[-1]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["validation_loss"] for r in log] == list(losses)


@pytest.mark.parametrize("where", ["mid-way", "at the θ_0 write"])
def test_an_interrupted_early_stopped_alignment_resumes_to_the_same_theta0(tmp_path, monkeypatch, where):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train.main(config(tmp_path / "a"), argv=[])
    cut = config(tmp_path / "b")
    step_fn, save_fn, calls = train.train_step, train.atomic_torch_save, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 45:  # past the checkpoints of steps 10..40, before the stop
            raise KeyboardInterrupt
        return step_fn(*a, **kw)

    def no_theta0(obj, path):  # killed after the checkpoint that decided the stop, before θ_0 is written
        if obj.get("kind") == "theta0":
            raise KeyboardInterrupt
        return save_fn(obj, path)

    monkeypatch.setattr(train, *(("train_step", interrupted) if where == "mid-way" else ("atomic_torch_save", no_theta0)))
    with pytest.raises(KeyboardInterrupt):
        train.main(cut, argv=[])
    monkeypatch.setattr(train, "train_step", step_fn)
    monkeypatch.setattr(train, "atomic_torch_save", save_fn)
    train.main(dataclasses.replace(cut, resume=True), argv=[])
    a = torch.load(tmp_path / "a" / "run" / "theta0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "theta0.pt", weights_only=True)
    assert a["early_stop"] == b["early_stop"] and a["theta0_hash"] == b["theta0_hash"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_patience_is_part_of_theta0s_identity_only_when_set():
    real = train.TrainConfig(data="real")
    assert train.align_key(real) == train.align_key(dataclasses.replace(real, align_eval_interval=7, eval_examples=9))
    stopped = dataclasses.replace(real, align_patience=3)
    assert train.align_key(stopped) != train.align_key(real)
    for k, v in (("align_eval_interval", 7), ("eval_examples", 9)):  # what decides the stop
        assert train.align_key(stopped) != train.align_key(dataclasses.replace(stopped, **{k: v}))
    # a fine-tune evaluates at its own interval and finds its θ_0 (the sweep's fine-tunes do)
    assert train.align_key(stopped) == train.align_key(dataclasses.replace(stopped, eval_interval=150))


@pytest.mark.parametrize("kw,expect", [
    (dict(align_patience=-1), "--align_patience -1"),
    (dict(data="synthetic"), "for --data real only"),
])
def test_bad_patience_is_one_message_and_writes_nothing(tmp_path, kw, expect):
    with pytest.raises(SystemExit) as e:
        train.cli(["--data", kw.get("data", "real"), "--stage", "align", "--out_dir", str(tmp_path / "run"),
                   "--align_patience", str(kw.get("align_patience", 3)), "--no-progress"])
    assert str(e.value.code).startswith("error: ") and expect in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_a_safety_set_too_small_for_a_validation_part_is_one_message(tmp_path):
    cfg = config(tmp_path)
    # prompts whose hash never falls in the validation share (held-out ones do)
    rows = [{"prompt": p, "response": "the of and"} for p in (f"Name {i}" for i in range(200))
            if not 0.75 <= textdata.key_fraction([textdata.prompt_key(p)])[0] < 0.85][:40]
    tiny = str(tmp_path / "tiny.jsonl")
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(textdata.validation_part(tiny)) == 0
    with pytest.raises(SystemExit) as e:
        train.cli(["--data", "real", "--stage", "align", "--out_dir", str(tmp_path / "tiny_run"),
                   "--safety_data", tiny, "--proxy_data", cfg.proxy_data, "--task_data", cfg.task_data,
                   "--align_patience", "2", "--vocab_cap", "512", "--no-progress"])
    assert "has none" in str(e.value.code) and "--align_patience 0" in str(e.value.code)
    assert not (tmp_path / "tiny_run").exists()
