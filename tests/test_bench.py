"""bench.py runs and writes its rows (issue 5). No timing is asserted: speed is shown by
bench.py itself, on a machine one can name, never by a test."""
import json
import subprocess
import sys

from conftest import ROOT
from constraints import STRATEGIES


def test_bench_writes_every_variant_with_the_documented_keys(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--config", "synthetic", "--steps", "10", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    steps = [r for r in rows if r["table"] == "step"]
    assert {r["variant"] for r in steps} == {"baseline", *STRATEGIES}  # none ×2 is reported as `none`
    for r in steps:
        assert r["config"] == "synthetic"
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["steps"] == 10 and len(r["times_ms"]) == 10
        assert 0 < r["matmul_peak_fraction"] and r["run"]["device"]
    # `loss` is judged against `none` on the same tokens: twice the batch, in the same micro-batches
    loss = next(r for r in steps if r["variant"] == "loss")
    none2 = next(r for r in steps if r["label"] == "none ×2")
    assert none2["tokens_per_step"] == loss["tokens_per_step"] and none2["accum"] == 2
    assert {r["ratio"] for r in rows if r["table"] == "acceptance"} >= {
        "none tokens/s ÷ baseline tokens/s", "param time ÷ none time", "loss time ÷ none×2 time (same tokens)"}
    assert "ms/step" in proc.stdout and "load average" in proc.stdout


def test_bench_refuses_too_few_steps_and_unknown_configs():
    for args in (["--steps", "3"], ["--config", "bogus"], ["--variants", "bogus"], ["--batched", "0"],
                 ["--batched", "two"]):
        proc = subprocess.run([sys.executable, "-m", "lab.bench", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
