"""lab/plan.py on the real-text presets: which θ_pre and θ_0s a plan trains, from where, and which
θ_pre it shares with another preset (the plan alone: nothing is trained here)."""
import os

import pytest

from lab import plan, sweep

DATA_DIR = os.environ.get("SAFETY_DATA_DIR", "")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR or "/nonexistent"),
                                reason="needs the real data folder (SAFETY_DATA_DIR)")


@needs_data
def test_the_paper_real_plan_pretrains_once_and_aligns_each_arm_from_its_start(tmp_path):
    sc, recipe = sweep.make_config("paper-real-cpu", out_dir=str(tmp_path / "p"))
    tasks = plan.plan(sc, recipe)
    kinds = [t["kind"] for t in tasks.values()]
    # per arm and seed, per case task: 3 λ, 2 other proxies, 2 radii, plain; and plain fine-tunes on 8 more
    # tasks; 3 pretrained seeds, 1 scratch one (a control); θ_pre aligned on each of 3 proxies (the
    # model-based mismatch); each θ_0's answer-aware forecast
    assert kinds.count("pretrain") == 1 and kinds.count("align") == 4 + 3 and kinds.count("gradients") == 4
    assert kinds.count("finetune") == 4 * (2 * 8 + 8)
    assert "pre-none-alpaca_gpt4_refusals-s3" in tasks and "none-orca_llama2-s1" in tasks
    assert {t["train"]["safety_data"] for t in tasks.values() if t["id"].startswith("mismatch-")} == set(sc.proxies)
    pre = os.path.join(sc.out_dir, "pretrain", "theta_pre.pt")
    for t in tasks.values():
        if t["kind"] in ("align", "finetune"):
            pretrained = t["id"].startswith(("pre-", "align-pre-", "mismatch-"))
            assert t["train"].get("init_from", "scratch") == (pre if pretrained else "scratch"), t["id"]
            assert ("pretrain" in t["deps"]) == (pretrained and t["kind"] == "align")
    assert not any(t["id"].endswith(("-s2", "-s3")) and not t["id"].startswith(("pre-", "align-pre-", "gradients-pre-"))
                   for t in tasks.values())  # the scratch arm, a control: one seed
    # an existing θ_pre instead: nothing to pretrain, the θ_0s start from it
    (tmp_path / "pre.pt").write_bytes(b"")
    sc2, _ = sweep.make_config("paper-real-cpu", out_dir=str(tmp_path / "q"), theta_pre=str(tmp_path / "pre.pt"))
    t2 = plan.plan(sc2, recipe)
    assert "pretrain" not in t2 and t2["align-pre-s1"]["deps"] == [] and \
        t2["align-pre-s1"]["train"]["init_from"] == str(tmp_path / "pre.pt")


@needs_data
def test_real_cpu_pretrains_the_theta_pre_it_shares_with_paper_real_cpu_when_it_is_not_there(tmp_path):
    pre = tmp_path / "shared" / "theta_pre.pt"
    sc, recipe = sweep.make_config("real-cpu", out_dir=str(tmp_path / "r"), theta_pre=str(pre))
    tasks = plan.plan(sc, recipe)
    owner = sweep.make_config("paper-real-cpu", out_dir=str(tmp_path / "p"))[1]
    train_pre = tasks["pretrain"]["train"]
    assert tasks["pretrain"]["dir"] == str(pre.parent)
    for key in ("pretrain_data", "pretrain_lr", "pretrain_iters", "n_embd", "block_size", "vocab_cap"):
        assert train_pre[key] == owner[key], key  # paper-real-cpu's θ_pre, exactly
    assert "pretrain" in tasks["align-pre-s1"]["deps"] and tasks["align-pre-s1"]["train"]["init_from"] == str(pre)
    # a pretraining value of this sweep's own (--train): its θ_pre in its own folder, never the shared one
    sc7, recipe7 = sweep.make_config("real-cpu", {"pretrain_iters": 7}, out_dir=str(tmp_path / "r7"), theta_pre=str(pre))
    t7 = plan.plan(sc7, recipe7)
    own = os.path.join(sc7.out_dir, "pretrain")
    assert t7["pretrain"]["dir"] == own and t7["pretrain"]["train"]["pretrain_iters"] == 7
    assert t7["pretrain"]["train"]["pretrain_data"] == owner["pretrain_data"]
    assert t7["align-pre-s1"]["train"]["init_from"] == os.path.join(own, "theta_pre.pt")
    # --theta_pre '': this sweep pretrains its own, with its own recipe
    sc0, recipe0 = sweep.make_config("real-cpu", out_dir=str(tmp_path / "r0"), theta_pre="")
    t0 = plan.plan(sc0, recipe0)
    assert t0["pretrain"]["dir"] == os.path.join(sc0.out_dir, "pretrain")
    assert t0["pretrain"]["train"].get("pretrain_data") == recipe0.get("pretrain_data") != owner["pretrain_data"]
    pre.parent.mkdir()
    pre.write_bytes(b"")  # there now: used as it is, never trained over
    assert "pretrain" not in plan.plan(sc, recipe)
