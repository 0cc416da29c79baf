"""sweep.py: the smoke preset end to end, interrupted and resumed without repeats or
duplicate rows; bad grids refused; the F1–F6 checks agree with the exact theory."""
import csv
import json
import os
import subprocess
import sys

import pytest

import sweep
import theory
from data import SyntheticWorld, WorldConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ["fig1_gap_vs_lambda.png", "fig2_overlap_tradeoff.png", "fig3_case1_vs_case2.png", "fig4_limit_C.png",
         "fig5_radius_second_order.png"]


def run_sweep_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset, stopped after 3 runs (two worker processes), then resumed to the
    end (in this process). Returns the out_dir and what each step left behind."""
    out = str(tmp_path_factory.mktemp("sweep") / "smoke")
    first = run_sweep_cli("--preset", "smoke", "--out_dir", out, "--max_runs", "3", "--jobs", "2")
    assert first.returncode == 0, first.stderr
    early = csv_rows(os.path.join(out, "results.csv"))
    stamps = {r["run_id"]: os.path.getmtime(os.path.join(out, "runs", r["run_id"], "metrics.json")) for r in early}
    report_after_first = os.path.exists(os.path.join(out, "results.md"))
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1"])
    return {"out": out, "first": first, "early": early, "stamps": stamps, "report_after_first": report_after_first}


def test_smoke_runs_end_to_end_and_writes_every_output(smoke):
    out = smoke["out"]
    sc, recipe = sweep.make_config("smoke", out_dir=out)
    planned = [t for t in sweep.plan(sc, recipe).values() if t["kind"] == "finetune"]
    rows = csv_rows(os.path.join(out, "results.csv"))
    assert sorted(r["run_id"] for r in rows) == sorted(t["id"] for t in planned)   # one row per run
    for name in PLOTS + ["results.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 1000
    for r in rows:  # every metric and bound is in the row, and the limit C holds for every run
        for k in ["safety_gap", "capability_gap", "A2_safety_bound", "B2_capability_bound", "C_lhs", "C_limit",
                  "optimum_safety_gap", "optimum_capability_gap", "mismatch", "overlap_mass",
                  "measured_safety_increase", "aligned_safety_gap", "train_seconds"]:
            assert r[k] != "", (r["run_id"], k)
        assert r["C_holds"] == "True"
        assert os.path.exists(os.path.join(out, "runs", r["run_id"], "theory.json"))
    for r in rows:
        if r["constraint"] == "param":
            assert all(r[k] != "" for k in ("grad_norm_s", "hessian_top_eig_s", "second_order_prediction",
                                            "D_bound", "d_unconstrained"))
        if r["constraint"] == "loss":
            assert float(r["case1_objective_excess"]) >= -1e-9   # nobody beats the exact optimum
    md = open(os.path.join(out, "results.md")).read()
    for f in ("F1", "F2", "F3", "F4", "F5", "F6"):
        assert f"| {f} |" in md


def test_an_interrupted_sweep_resumes_without_repeats_or_duplicates(smoke, capsys):
    out = smoke["out"]
    assert "stopped after --max_runs 3" in smoke["first"].stdout
    assert len(smoke["early"]) == 3 and not smoke["report_after_first"]   # no report from a partial sweep
    rows = csv_rows(os.path.join(out, "results.csv"))
    assert len({r["run_id"] for r in rows}) == len(rows)
    for rid, stamp in smoke["stamps"].items():   # the first three runs were not trained again
        assert os.path.getmtime(os.path.join(out, "runs", rid, "metrics.json")) == stamp
    before = open(os.path.join(out, "results.csv")).read()
    # run again: nothing left to do, nothing changes
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1"])
    assert f"({len(rows)} already done)" in capsys.readouterr().out
    assert open(os.path.join(out, "results.csv")).read() == before
    # a run killed after training but before its row: it is finished, reported, and not duplicated
    victim = rows[-1]["run_id"]
    sweep.write_rows(os.path.join(out, "results.csv"), [r for r in sweep.read_rows(os.path.join(out, "results.csv"))
                                                        if r["run_id"] != victim])
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1"])
    after = csv_rows(os.path.join(out, "results.csv"))
    assert sorted(r["run_id"] for r in after) == sorted(r["run_id"] for r in rows)
    # --refresh reports theory.py again on every run, trains none, duplicates nothing
    stamps = {r["run_id"]: os.path.getmtime(os.path.join(out, "runs", r["run_id"], "ckpt.pt")) for r in after}
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1", "--refresh"])
    refreshed = csv_rows(os.path.join(out, "results.csv"))
    assert sorted(r["run_id"] for r in refreshed) == sorted(stamps)
    assert all(os.path.getmtime(os.path.join(out, "runs", rid, "ckpt.pt")) == s for rid, s in stamps.items())
    by_id = {r["run_id"]: r for r in after}
    assert all(r["safety_gap"] == by_id[r["run_id"]]["safety_gap"] for r in refreshed)


@pytest.mark.parametrize("args, words", [
    (["--lams", "1,-1"], "--lams"),
    (["--radii", "0"], "--radii"),
    (["--overlaps", "0,1.5"], "--overlaps"),
    (["--mismatches", "nan"], "--mismatches"),
    (["--lams", "1,1"], "repeats"),
    (["--seeds", ""], "--seeds is empty"),
    (["--jobs", "0"], "--jobs"),
])
def test_a_bad_grid_value_fails_with_one_clear_message_and_writes_nothing(tmp_path, args, words):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--out_dir", str(out), *args])
    assert str(e.value.code).startswith("error:") and words in str(e.value.code)
    assert not out.exists()


def test_bad_grid_from_the_command_line_has_no_traceback(tmp_path):
    proc = run_sweep_cli("--out_dir", str(tmp_path / "never"), "--overlap", "2")
    assert proc.returncode != 0 and "error: --overlap" in proc.stderr and "Traceback" not in proc.stderr
    for args in (["--lams", "a,b"], ["--preset", "bogus"]):   # argparse's own one-line errors
        with pytest.raises(SystemExit) as e:
            sweep.main(["--out_dir", str(tmp_path / "never"), *args])
        assert e.value.code == 2
    assert not (tmp_path / "never").exists()


def test_an_out_dir_of_another_recipe_is_refused(smoke, tmp_path):
    state = json.load(open(os.path.join(smoke["out"], "sweep.json")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps(dict(state, recipe=dict(state["recipe"], max_iters=1))))
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--out_dir", str(other)])
    assert "another train recipe (max_iters)" in str(e.value.code)


# -----------------------------------------------------------------------------
# The checks of F1, F2, F4 say yes to the exact optimum, and no when it is disturbed


def exact_rows(sc):
    """Rows as if every Case I run had reached the exact optimum P*_λ."""
    rows = []
    for k, d in {(sc.overlap, d) for d in sc.mismatches} | {(k, sc.mismatch) for k in sc.overlaps}:
        world = SyntheticWorld(WorldConfig(overlap=k, mismatch=d))
        for lam in sc.lams:
            c = theory.world_case_one(world, lam)
            rows.append({**c, "run_id": f"k{k}-d{d}-lam{lam}", "constraint": "loss", "overlap": k,
                         "mismatch_delta": d, "lam": lam, "radius": 0.0, "safety_gap": c["optimum_safety_gap"],
                         "capability_gap": c["optimum_capability_gap"],
                         "C_lhs": theory.limit_C_lhs(c["optimum_safety_gap"], c["optimum_capability_gap"])})
    return rows


def test_the_finding_checks_pass_on_the_exact_optimum_and_fail_when_disturbed():
    sc, _ = sweep.make_config("paper")
    rows = exact_rows(sc)
    verdicts = {name: ok for name, _, ok, _ in sweep.check_findings(sc, rows)}
    assert verdicts["F1"] and verdicts["F2"] and verdicts["F4"] and verdicts["F5"]
    # G_f of one run falls with λ instead of rising: F4 must say no
    bumped = [dict(r, capability_gap=10.0) if r["lam"] == min(sc.lams) and r["overlap"] == sc.overlap
              and r["mismatch_delta"] == sc.mismatch else r for r in rows]
    assert not {n: ok for n, _, ok, _ in sweep.check_findings(sc, bumped)}["F4"]
    # a higher-overlap curve below the lower-overlap one: F2 must say no
    k_hi = max(sc.overlaps)
    better = [dict(r, safety_gap=r["safety_gap"] / 10) if r["overlap"] == k_hi else r for r in rows]
    assert not {n: ok for n, _, ok, _ in sweep.check_findings(sc, better)}["F2"]
