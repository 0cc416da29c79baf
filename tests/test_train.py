"""train.py end to end, through subprocess, at a tiny scale (issue acceptance 2–5)."""
import json
import os
import subprocess
import sys

import pytest

import system
from conftest import ROOT, TINY, run_train


def finetune(tmp_path, name, theta0, *args):
    out = tmp_path / name
    run_train("--out_dir", str(out), "--stage", "finetune", "--theta0", theta0, *TINY, *args)
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return metrics, log


def test_param_constraint_keeps_the_distance_at_every_logged_step(tmp_path, tiny_theta0):
    metrics, log = finetune(tmp_path, "param", tiny_theta0, "--constraint", "param", "--radius=0.1")
    steps = [r for r in log if r["stage"] == "finetune"]
    assert len(steps) >= 3
    assert all(r["distance"] <= 0.1 + 1e-5 for r in steps)
    assert metrics["finetuned"]["distance"] <= 0.1 + 1e-5
    assert metrics["finetuned"]["distance"] > 0.09  # the task gradient pushes to the boundary


def test_larger_lambda_keeps_more_safety(tmp_path, tiny_theta0):
    hi, _ = finetune(tmp_path, "lam10", tiny_theta0, "--constraint", "loss", "--lam", "10")
    lo, _ = finetune(tmp_path, "lam01", tiny_theta0, "--constraint", "loss", "--lam", "0.1")
    assert hi["finetuned"]["safety_gap"] < lo["finetuned"]["safety_gap"]
    assert hi["finetuned"]["capability_gap"] > lo["finetuned"]["capability_gap"]


def test_lambda_zero_is_no_constraint_exactly_and_runs_are_deterministic(tmp_path, tiny_theta0):
    none1, log1 = finetune(tmp_path, "none1", tiny_theta0)
    none2, log2 = finetune(tmp_path, "none2", tiny_theta0)
    lam0, log0 = finetune(tmp_path, "lam0", tiny_theta0, "--constraint", "loss", "--lam", "0")
    assert none1 == none2 and log1 == log2                      # same command, same seed
    for key in ("aligned", "finetuned"):
        assert lam0[key] == none1[key]                          # bit for bit
    # and fine-tuning did something: the task was learned, safety was lost (κ > 0)
    assert none1["finetuned"]["capability_gap"] < none1["aligned"]["capability_gap"] / 4
    assert none1["finetuned"]["safety_gap"] > none1["aligned"]["safety_gap"]


def test_no_overlap_no_mismatch_case_one_learns_the_task_and_keeps_safety(tmp_path, tiny_theta0):
    m, _ = finetune(tmp_path, "k0d0", tiny_theta0, "--constraint", "loss", "--overlap", "0",
                    "--mismatch", "0", "--max_iters", "300")
    assert m["finetuned"]["capability_gap"] < 0.1
    assert m["finetuned"]["safety_gap"] < 0.1


def test_stage_all_reuses_a_matching_theta0(tmp_path, tiny_theta0):
    out = tmp_path / "reuse"
    out.mkdir()
    (out / "theta0.pt").write_bytes(open(tiny_theta0, "rb").read())
    run_train("--out_dir", str(out), *TINY)
    stages = {json.loads(line)["stage"] for line in (out / "log.jsonl").read_text().splitlines()}
    assert stages == {"finetune"}  # no align stage ran


@pytest.mark.parametrize("args, words", [
    (["--constraint", "bogus"], "invalid choice"),
    (["--radius", "-0.1"], "--radius"),
    (["--lam=-1"], "--lam"),
    (["--overlap", "1.5"], "--overlap"),
    (["--mismatch", "-0.2"], "--mismatch"),
    (["--batch_tokens", "1000"], "--batch_tokens"),
])
def test_bad_flags_fail_with_one_clear_message_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "never"
    proc = run_train("--out_dir", str(out), *TINY, *args, check=False)
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unwritable_out_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_train("--out_dir", str(blocker / "sub"), *TINY, check=False)
    assert proc.returncode != 0 and "--out_dir" in proc.stderr and "Traceback" not in proc.stderr


def test_theta0_of_another_config_is_refused(tmp_path, tiny_theta0):
    out = tmp_path / "other"
    proc = run_train("--out_dir", str(out), "--stage", "finetune", "--theta0", tiny_theta0, *TINY,
                     "--n_embd", "32", check=False)
    assert proc.returncode != 0 and "n_embd" in proc.stderr and tiny_theta0 in proc.stderr
    assert not out.exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "theta0.pt"
    bad.write_bytes(b"\x00garbage")
    proc = run_train("--out_dir", str(tmp_path / "o"), "--stage", "finetune", "--theta0", str(bad), *TINY,
                     check=False)
    assert proc.returncode != 0 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_theta0_keys_of_the_synthetic_recipes_stay_what_they_were():
    # a saved θ_0 is reused only under the same key: fields added or defaults moved for real text
    # must not change the key of a synthetic recipe (these are the keys of θ_0s saved before them)
    import train
    assert train.align_key(train.TrainConfig()) == "b3c921af2bc56054"
    paper = {"align_iters": 800, "max_iters": 1200, "warmup_iters": 50, "lr": 2e-3, "batch_tokens": 640,
             "micro_batch": 128, "seed": 1}
    assert train.align_key(train.TrainConfig(**paper)) == "f5ae92f2408318f1"
    real = train.parse_args(["--data", "real"])  # --data real changes its own defaults only
    assert (real.block_size, real.vocab_cap, real.batch_tokens) == (64, 4096, 2048)
    assert train.parse_args(["--data", "real", "--block_size=96"]).block_size == 96  # a given flag wins


def test_a_checkpoint_written_before_a_field_existed_still_resumes(tmp_path):
    import dataclasses

    import train
    from model import CHECKPOINT_FORMAT, atomic_torch_save
    cfg = train.TrainConfig(out_dir=str(tmp_path), resume=True)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "fisher_examples"}  # a field added later
    path = str(tmp_path / "ckpt.pt")
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "finetune-resume", "config": old}, path)
    assert system.resume_checkpoint(path, cfg, "finetune")["config"] == old
    with pytest.raises(train.CheckpointError, match=r"other settings \(lam\)"):
        system.resume_checkpoint(path, dataclasses.replace(cfg, lam=3.0), "finetune")


def test_a_flag_several_strategies_share_is_named_with_the_chosen_one(tmp_path):
    proc = run_train("--out_dir", str(tmp_path / "never"), "--constraint", "fisher", "--gamma", "-1", check=False)
    assert proc.returncode != 0 and "(--constraint fisher)" in proc.stderr and "Traceback" not in proc.stderr


QUICK = ["--no-progress", "--align_iters", "30", "--max_iters", "10", "--eval_interval", "10"]


def test_runs_without_an_out_dir_get_folders_of_their_own_and_share_theta0(tmp_path):
    first = run_train(*QUICK, cwd=tmp_path)
    second = run_train(*QUICK, "--constraint", "param", "--radius", "0.1", cwd=tmp_path)
    folders = sorted(os.listdir(tmp_path / "out"))
    runs = [f for f in folders if not f.startswith("theta0-")]
    assert len([f for f in folders if f.startswith("theta0-")]) == 1 and len(runs) == 2
    assert runs[0].startswith("none-") and runs[1].startswith("param-radius0.1-")
    for run in runs:
        assert os.path.exists(tmp_path / "out" / run / "metrics.json")
    # each says where it writes, the second that it reuses the first's θ_0, and the table names the run
    assert f"run folder out/{runs[0]}" in first.stdout and f"out/{runs[1]}: param, r = 0.1" in second.stdout
    assert "θ_0: out/theta0-" in second.stdout and "reused" in second.stdout
    cfg = json.load(open(tmp_path / "out" / runs[1] / "config.json"))["config"]
    assert cfg["out_dir"] == f"out/{runs[1]}" and cfg["theta0"].startswith("out/theta0-")
    # theory.py finds that θ_0 from any folder: the relative path is the run's own folder's
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "theory.py"), "--run_dir", str(tmp_path / "out" / runs[1])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "param, r = 0.1" in proc.stdout, proc.stderr
    # the folder a run printed resumes as the README says, with the θ_0 that run recorded
    again = run_train(*QUICK, "--constraint", "param", "--radius", "0.1", "--out_dir", f"out/{runs[1]}", "--resume",
                      cwd=tmp_path)
    assert "resuming finetune" in again.stdout


def test_resume_with_nothing_to_resume_or_a_corrupt_checkpoint_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train("--out_dir", str(empty), *QUICK, "--resume", check=False)
    assert proc.returncode != 0 and "holds nothing to resume" in proc.stderr and proc.stderr.count("\n") == 1
    assert os.listdir(empty) == []
    proc = run_train("--resume", *QUICK, check=False)
    assert proc.returncode != 0 and "pass --out_dir" in proc.stderr
    run = tmp_path / "run"
    run_train("--out_dir", str(run), *QUICK)
    before = (run / "config.json").read_bytes()
    (run / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:1000])  # cut mid-file, as by a full disk
    proc = run_train("--out_dir", str(run), *QUICK, "--resume", check=False)
    assert proc.returncode != 0 and "ckpt.pt" in proc.stderr and proc.stderr.count("\n") == 1
    assert (run / "config.json").read_bytes() == before
    # a θ_0 of the same recipe but other weights, put in its place since: refused before config.json is written
    from model import atomic_torch_save, load_checkpoint
    (run / "ckpt.pt").unlink()
    run_train("--out_dir", str(run), *QUICK, "--stage", "finetune")
    before = (run / "config.json").read_bytes()
    theta0 = load_checkpoint(str(run / "theta0.pt"))
    theta0["model"] = {k: v + 0.01 for k, v in theta0["model"].items()}
    theta0["theta0_hash"] = "0" * 16
    atomic_torch_save(theta0, str(run / "theta0.pt"))
    proc = run_train("--out_dir", str(run), *QUICK, "--stage", "finetune", "--resume", check=False)
    assert proc.returncode != 0 and "fine-tuned from another θ_0" in proc.stderr
    assert (run / "config.json").read_bytes() == before


def test_a_config_file_sets_flags_and_the_flags_given_win(tmp_path, capsys):
    import train
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"max_iters": 7, "constraint": "param", "radius": 1, "data": "real"}))
    cfg = train.parse_args(["--config", str(good), "--radius", "0.5"])
    assert (cfg.max_iters, cfg.constraint, cfg.radius) == (7, "param", 0.5) and isinstance(cfg.radius, float)
    assert cfg.block_size == 64  # --data real from the file: configs/real.json for what neither file nor flag sets
    assert train.parse_args(["--config", str(good), "--block_size", "96"]).block_size == 96
    (tmp_path / "broken.json").write_text("{")
    for values, expect in (({"radius": "0.1"}, "radius is '0.1', not a float"), ({"n_embd": 64.0}, "not a int"),
                           ({"progress": "false"}, "not a bool"), ({"max_iter": 7}, "max_iter are not flags"),
                           (None, "is not valid JSON (line 1")):
        bad = tmp_path / "broken.json" if values is None else tmp_path / "bad.json"
        if values is not None:
            bad.write_text(json.dumps(values))
        with pytest.raises(SystemExit) as e:  # as on the command line: argparse's exit, the error first
            train.parse_args(["--config", str(bad), "--out_dir", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err and err.startswith("error: ")
    assert not (tmp_path / "never").exists()
