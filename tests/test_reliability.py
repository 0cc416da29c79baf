"""Reliability: exact resume after SIGKILL, safe checkpoint loading, NaN stops."""
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_train
from model import CheckpointError, load_checkpoint

FT = ["--stage", "finetune", *TINY, "--max_iters", "200", "--eval_interval", "20",
      "--constraint", "param", "--radius", "0.5"]


def finetune_steps(out):
    p = out / "log.jsonl"
    if not p.exists():
        return []
    steps = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("stage") == "finetune":
            steps.append(rec["step"])
    return steps


def test_killed_finetune_resumes_to_the_same_weights_bit_for_bit(tmp_path, tiny_theta0):
    full = tmp_path / "full"
    run_train("--out_dir", str(full), "--theta0", tiny_theta0, *FT)

    killed = tmp_path / "killed"
    rng = random.Random(os.getpid())
    kill_after = rng.choice([20, 40, 60, 80, 100, 120])  # a checkpoint exists, the run is mid-way
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(killed),
                             "--theta0", tiny_theta0, *FT], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (not finetune_steps(killed) or max(finetune_steps(killed)) < kill_after) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(rng.random() * 0.3)  # land anywhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"

    run_train("--out_dir", str(killed), "--theta0", tiny_theta0, *FT, "--resume")
    a = torch.load(full / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 200
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (full / "metrics.json").read_text() == (killed / "metrics.json").read_text()
    # the log was cut back to the checkpoint and continued: no duplicated or missing lines
    assert (full / "log.jsonl").read_text() == (killed / "log.jsonl").read_text()
    assert not [f for f in os.listdir(killed) if ".tmp." in f]


def test_resume_with_other_settings_is_refused(tmp_path, tiny_theta0):
    out = tmp_path / "r"
    run_train("--out_dir", str(out), "--theta0", tiny_theta0, *FT, "--max_iters", "20")
    proc = run_train("--out_dir", str(out), "--theta0", tiny_theta0, *FT, "--max_iters", "20",
                     "--radius", "0.2", "--resume", check=False)
    assert proc.returncode != 0 and "radius" in proc.stderr and "Traceback" not in proc.stderr


class RunsCode:
    """Unpickling this would create a file: the attack a weights_only load must stop."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("via_torch_save", [True, False])
def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, via_torch_save):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"format": "safety-tradeoff-ckpt-v1", "model": RunsCode(str(marker))}
    if via_torch_save:
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(evil))
    assert not marker.exists()
    # and through the command line
    proc = run_train("--out_dir", str(tmp_path / "o"), "--stage", "finetune", "--theta0", str(evil), *TINY,
                     check=False)
    assert proc.returncode != 0 and str(evil) in proc.stderr and not marker.exists()


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path, tiny_theta0):
    data = open(tiny_theta0, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(cut))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_theta0):
    out = tmp_path / "nan"
    proc = run_train("--out_dir", str(out), "--theta0", tiny_theta0, "--stage", "finetune", *TINY,
                     "--lr", "1e30", "--log_interval", "1",
                     check=False)
    assert proc.returncode != 0 and "NaN or inf" in proc.stderr and "step" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (out / "metrics.json").exists()


def same_value(a, b):
    """Two CSV cells hold the same value (a number may be written '1' or '1.0')."""
    try:
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    except ValueError:
        return a == b


def test_a_sweep_killed_midway_resumes_with_no_missing_or_duplicated_rows(tmp_path):
    import csv

    from lab import plan, sweep

    out = tmp_path / "sweep"
    results = out / "results.csv"

    def rows():
        if not results.exists():
            return []
        with open(results, newline="") as f:
            return list(csv.DictReader(f))

    rng = random.Random(os.getpid())
    kill_after = rng.choice([1, 2, 3])
    # its own session, so that SIGKILL reaches the sweep and every worker it started
    proc = subprocess.Popen([sys.executable, "-m", "lab.sweep", "--preset", "smoke",
                             "--out_dir", str(out), "--jobs", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(rows()) < kill_after and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(rng.random())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.md").exists(), "the sweep finished before it was killed"
    killed_rows = rows()

    sweep.main(["--preset", "smoke", "--out_dir", str(out), "--jobs", "1"])
    sc, recipe = sweep.make_config("smoke", out_dir=str(out))
    planned = sorted(t["id"] for t in plan.plan(sc, recipe).values() if t["kind"] == "finetune")
    final = rows()
    assert sorted(r["run_id"] for r in final) == planned           # none missing, none twice
    done_before = {r["run_id"]: r for r in killed_rows}
    for r in final:
        if r["run_id"] in done_before:                             # finished rows were kept as they were
            for k, v in done_before[r["run_id"]].items():
                assert same_value(r[k], v), (r["run_id"], k, r[k], v)
        m = json.loads((out / "runs" / r["run_id"] / "metrics.json").read_text())
        assert float(r["safety_gap"]) == pytest.approx(m["finetuned"]["safety_gap"], rel=1e-9)
    assert not [p for p in out.rglob("*.tmp.*")]


def test_temporaries_of_a_killed_writer_are_removed_when_a_run_starts_again(tmp_path):
    """A SIGKILL between torch.save and the rename leaves CKPT.tmp.PID beside a whole
    CKPT; the next start in that folder removes it and nothing else."""
    from common import remove_stale_temporaries
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    keep = ["ckpt.pt", "log.jsonl", "notes.tmp.txt", "a.tmp.", "x.tmp.12ab"]
    stale = ["ckpt.pt.tmp.4242", "metrics.json.tmp.7", "sub/theory.json.tmp.99"]
    for name in keep + stale:
        (run / name).write_text("x")
    remove_stale_temporaries(str(run))                   # one folder: the sub-folder's stays
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == sorted(keep)
    assert (run / "sub" / "theory.json.tmp.99").exists()
    remove_stale_temporaries(str(run), recursive=True)   # a sweep's whole out_dir
    assert not (run / "sub" / "theory.json.tmp.99").exists()
