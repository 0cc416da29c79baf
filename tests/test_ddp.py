"""DDP on CPU: train.py under `torchrun --nproc_per_node=2` (gloo) against one process
(issue 5, acceptance 2). One 1-rank and one 2-rank run of align + fine-tune under the param
constraint, both through tests/ddp_helper.py, which records gradients, parameters and the
files each rank writes while train.py runs unchanged."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

HELPER = os.path.join(ROOT, "tests", "ddp_helper.py")
RADIUS = 0.05
# 64 sequences per step in micro-batches of 16: 1 rank accumulates 4, each of 2 ranks 2;
# no clipping, so the recorded gradients are the raw ones
FLAGS = ["--device", "cpu", "--no-progress", "--batch_tokens", "320", "--micro_batch", "16",
         "--align_iters", "30", "--max_iters", "10", "--eval_interval", "10", "--grad_clip", "0",
         "--constraint", "param", f"--radius={RADIUS}"]


def launch(tmp_path, name, nproc):
    out, dump = tmp_path / name, tmp_path / f"{name}_dump"
    cmd = [sys.executable, HELPER, str(dump), "--out_dir", str(out), *FLAGS]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd[1:]]
    # one thread per process, as torchrun sets for its workers: 2 ranks on 2 cores
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    return out, ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return launch(tmp, "one", 1), launch(tmp, "two", 2)


def test_two_ranks_with_half_batches_give_the_one_rank_gradients(runs):
    (_, [one]), (_, two) = runs
    assert len(one["grads"]) == 2  # the first step of align and of finetune
    for stage in range(2):
        g1 = one["grads"][stage]
        assert g1.abs().max() > 1e-3  # a real gradient, not zeros
        for r in range(2):
            torch.testing.assert_close(two[r]["grads"][stage], g1, rtol=0, atol=1e-6)


def test_parameters_stay_identical_across_ranks_under_the_projection(runs):
    _, (_, [r0, r1]) = runs
    assert len(r0["param_hashes"]) == 30 + 10
    assert r0["param_hashes"] == r1["param_hashes"]  # bit for bit before every step
    assert torch.equal(r0["final"], r1["final"])     # and after the last projection


def test_two_rank_metrics_equal_one_rank_metrics(runs):
    (out1, _), (out2, _) = runs
    m1 = json.loads((out1 / "metrics.json").read_text())
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["finetuned"]["distance"] == pytest.approx(RADIUS, rel=1e-4)  # the ball binds
    for row in ("aligned", "finetuned"):
        for k, v in m1[row].items():
            assert m2[row][k] == pytest.approx(v, rel=1e-4, abs=1e-4), (row, k)
    # the logged training loss is all-reduced: the global batch's, not rank 0's slice's
    log1 = [json.loads(s) for s in (out1 / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(s) for s in (out2 / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log1] == [(r["stage"], r["step"]) for r in log2]
    for a, b in zip(log1, log2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-4)


def test_only_rank_zero_writes(runs):
    (out1, [one]), (out2, [r0, r1]) = runs
    assert r1["writes"] == []
    assert any("metrics.json" in path for _, path, _ in r0["writes"])  # the spy sees writes
    assert sorted(os.listdir(out2)) == sorted(os.listdir(out1))
    assert not [f for f in os.listdir(out2.parent) if f not in ("one", "two", "one_dump", "two_dump")]
