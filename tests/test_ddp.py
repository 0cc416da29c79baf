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


def launch(tmp_path, name, nproc, inductor_cache):
    out, dump = tmp_path / name, tmp_path / f"{name}_dump"
    cmd = [sys.executable, HELPER, str(dump), "--out_dir", str(out), *FLAGS]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd[1:]]
    # one thread per process, as torchrun sets for its workers: 2 ranks on 2 cores; torch's
    # inductor cache in a folder that does not exist yet, as on a machine that never ran torch
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(inductor_cache))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    return out, ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp, cache = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("caches")
    return (launch(tmp, "one", 1, cache / "inductor_one"),
            launch(tmp, "two", 2, cache / "inductor_two"))


def same(a, b):
    """Equal to 1e-4, where a missing value (the step-0 record's train_loss) is equal only to
    a missing value."""
    if a is None or b is None:
        return a is None and b is None
    return b == pytest.approx(a, rel=1e-4, abs=1e-4)


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
            assert same(v, m2[row][k]), (row, k, v, m2[row][k])
    # the logged training loss is all-reduced: the global batch's, not rank 0's slice's
    log1 = [json.loads(s) for s in (out1 / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(s) for s in (out2 / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log1] == [(r["stage"], r["step"]) for r in log2]
    assert log1[0]["train_loss"] is None  # step 0 has no training loss yet
    for a, b in zip(log1, log2):
        assert same(a["train_loss"], b["train_loss"]), (a, b)


def project_writes(rank, out_dir):
    """The writes that are the project's: into its run folder or the repository. A library's
    own cache (torch's inductor folder, wherever $TORCHINDUCTOR_CACHE_DIR points) is not."""
    roots = (str(out_dir) + os.sep, ROOT + os.sep)
    return [(what, path) for what, path in rank["writes"] if (path + os.sep).startswith(roots)]


def test_only_rank_zero_writes(runs):
    (out1, [one]), (out2, [r0, r1]) = runs
    assert project_writes(r1, out2) == []
    assert any("metrics.json" in p for _, p in project_writes(r0, out2))  # the spy sees writes
    assert sorted(os.listdir(out2)) == sorted(os.listdir(out1))
    assert not [f for f in os.listdir(out2.parent) if f not in ("one", "two", "one_dump", "two_dump")]
