"""sweep.py and report.py: the smoke preset end to end, interrupted and resumed without repeats or
duplicate rows; bad grids refused; the F1–F6 checks agree with the exact theory."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import theory
from constraints import STRATEGIES
from data import SyntheticWorld, WorldConfig
from lab import analysis, ledger, plan, presets, report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ["fig1_gap_vs_lambda.png", "fig2_overlap_tradeoff.png", "fig3_case1_vs_case2.png", "fig4_limit_C.png",
         "fig5_radius_second_order.png"]


def run_sweep_cli(*args):
    return subprocess.run([sys.executable, "-m", "lab.sweep", *args], capture_output=True, text=True,
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
    planned = [t for t in plan.plan(sc, recipe).values() if t["kind"] == "finetune"]
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
    # the wall time of both invocations (the one cut by --max_runs and the one that finished) is in the report
    assert json.load(open(os.path.join(out, "sweep.json")))["invocations"] == 2 and "over 2 invocation(s)" in md


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
    ledger.write_rows(os.path.join(out, "results.csv"), [r for r in ledger.read_rows(os.path.join(out, "results.csv"))
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
    (["--batch_runs", "-2"], "--batch_runs: -2 is not a valid value (an integer ≥ 0)"),
    (["--strategies", "bogus"], "--strategies: 'bogus'"),
    (["--grid", "none=1"], "--grid: 'none' is not a valid value (a strategy with a parameter to sweep)"),
    (["--grid", "penalty=1,-2"], "--grid penalty: --gamma -2.0 must be a finite number ≥ 0"),
    (["--grid", "fisher"], "invalid parse_grid value"),
    (["--grid", "loss=1"], "other than loss and param (those take --lams, --radii)"),
    (["--strategies", "penalty", "--grid", "fisher=1"], "--grid: 'fisher' is not a valid value (a strategy of --strategies"),
    (["--grid", "penalty=1,1"], "at least one value, each once"),
])
def test_a_bad_grid_value_fails_with_one_clear_message_and_writes_nothing(tmp_path, args, words):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--out_dir", str(out), *args])
    if e.value.code == 2:  # argparse's own message, on stderr
        assert words.startswith("invalid")
    else:
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


def exact_rows(sc, answer_overlap=0.0):
    """Rows as if every Case I run had reached the exact optimum P*_λ."""
    rows = []
    for k, d in {(sc.overlap, d) for d in sc.mismatches} | {(k, sc.mismatch) for k in sc.overlaps}:
        world = SyntheticWorld(WorldConfig(overlap=k, mismatch=d, answer_overlap=answer_overlap))
        for lam in sc.lams:
            c = theory.world_case_one(world, lam)
            rows.append({**c, "run_id": f"k{k}-d{d}-lam{lam}", "constraint": "loss", "overlap": k,
                         "mismatch_delta": d, "lam": lam, "radius": 0.0, "safety_gap": c["optimum_safety_gap"],
                         "capability_gap": c["optimum_capability_gap"], "proxy_gap": c["optimum_proxy_gap"],
                         "C_lhs": theory.limit_C_lhs(c["optimum_safety_gap"], c["optimum_capability_gap"])})
    return rows


def test_the_finding_checks_pass_on_the_exact_optimum_and_fail_when_disturbed():
    sc, _ = sweep.make_config("paper")
    rows = exact_rows(sc)
    verdicts = {name: ok for name, _, ok, _ in report.check_findings(sc, rows)}
    assert verdicts["F1"] and verdicts["F2"] and verdicts["F4"] and verdicts["F4 (G_s)"] and verdicts["F5"]
    # shared answer support: G_s(P*_λ) rises with λ on the δ = 0.3 curve, where F4's condition fails,
    # so it is not judged there; the proxy gap still falls (the theorem); at δ = 0 (P_s' = P_s) the
    # condition holds and G_s falls
    rows = exact_rows(sc, answer_overlap=0.3)
    gs = [r["safety_gap"] for r in sorted(rows, key=lambda r: r["lam"]) if (r["overlap"], r["mismatch_delta"]) == (0.25, 0.3)]
    assert any(a < b for a, b in zip(gs, gs[1:]))
    shared = {name: (ok, nums) for name, _, ok, nums in report.check_findings(sc, rows)}
    assert shared["F4"][0] is True and shared["F4 (G_s)"][0] is True
    assert "κ=0.25, δ=0.3: G_s" in shared["F4 (G_s)"][1] and "not judged" in shared["F4 (G_s)"][1]
    assert "κ=0.25, δ=0: G_s" in shared["F4 (G_s)"][1].split("<br>")[0] and "not judged" not in shared["F4 (G_s)"][1].split("<br>")[0]
    # G_f of one run falls with λ instead of rising: F4 must say no
    bumped = [dict(r, capability_gap=10.0) if r["lam"] == min(sc.lams) and r["overlap"] == sc.overlap
              and r["mismatch_delta"] == sc.mismatch else r for r in rows]
    assert not {n: ok for n, _, ok, _ in report.check_findings(sc, bumped)}["F4"]
    # a higher-overlap curve below the lower-overlap one: F2 must say no
    k_hi = max(sc.overlaps)
    better = [dict(r, safety_gap=r["safety_gap"] / 10) if r["overlap"] == k_hi else r for r in rows]
    assert not {n: ok for n, _, ok, _ in report.check_findings(sc, better)}["F2"]


# -----------------------------------------------------------------------------
# Real data presets (real-cpu, real-gpu) at a tiny scale

DATA_DIR = os.environ.get("SAFETY_DATA_DIR", "")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR or "/nonexistent"),
                                reason="real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")
TINY_REAL = dict(presets.REAL_CPU_TRAIN, n_layer=1, n_head=2, n_embd=32, vocab_cap=512, batch_tokens=256,
                 micro_batch=4, align_iters=20, max_iters=10, warmup_iters=2, eval_examples=16)


@needs_data
def test_real_sweep_runs_every_planned_run_once_and_resumes_without_repeats(tmp_path, capsys):
    sc, _ = sweep.make_config("real-cpu", out_dir=str(tmp_path / "real"), seeds=(1,), jobs=1, refusal_limit=8, inits=("scratch",),
                              refusal_tokens=8, tasks=("alpaca_small", "code_alpaca"), lams=(1.0, 10.0))
    rows = sweep.run_sweep(sc, TINY_REAL)
    planned = {t["id"] for t in plan.plan(sc, TINY_REAL).values() if t["kind"] == "finetune"}
    # 2 plain, 2 λ with the same-teacher proxy, 1 other-teacher proxy, 2 radii
    assert len(planned) == 7 and sorted(r["run_id"] for r in rows) == sorted(planned)
    for r in rows:
        for k in analysis.REFUSAL_SETS:
            assert 0 <= r[f"refusal_{k}_low"] <= r[f"refusal_{k}"] <= r[f"refusal_{k}_high"] <= 1
            assert r[f"refusal_{k}_n"] == 8
        assert r["safety_increase"] == pytest.approx(r["safety_loss"] - r["aligned_safety_loss"])
        if r["constraint"] == "param":
            assert r["distance"] <= r["radius"] + 1e-4
    md = open(tmp_path / "real" / "results.md").read()
    for name in ("θ_0", "F1", "F2", "F3", "F4"):
        assert f"| {name} |" in md
    assert all((tmp_path / "real" / p).exists() for p in
               ("fig1_real_tradeoff.png", "fig2_real_overlap.png", "fig3_real_refusals.png"))
    est = json.load(open(tmp_path / "real" / "estimates" / "estimates.json"))
    assert est["estimate"] is True and set(est["mismatch"]) == set(sc.proxies)
    # a second call finds everything done: nothing trained, the same rows
    stamps = {r["run_id"]: os.path.getmtime(tmp_path / "real" / "runs" / r["run_id"] / "ckpt.pt") for r in rows}
    capsys.readouterr()
    again = sweep.run_sweep(sc, TINY_REAL)
    assert "(7 already done)" in capsys.readouterr().out
    assert [r["run_id"] for r in again] == [r["run_id"] for r in rows]
    assert all(os.path.getmtime(tmp_path / "real" / "runs" / k / "ckpt.pt") == v for k, v in stamps.items())


def test_real_grid_names_are_checked_before_anything_runs(tmp_path):
    out = tmp_path / "never"
    for d in ("a", "b"):   # two files of one name
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.json").write_text("[]")
    for args, words in ((["--tasks", "alpaca_small,no_such_set"], "--tasks"), (["--proxies", "x/y.json"], "--proxies"),
                        (["--task", "nope"], "--task"), (["--refusal_limit", "0"], "--refusal_limit"),
                        (["--refusal_tokens", "200"], "block_size − 8"),
                        (["--tasks", f"{tmp_path}/a/x.json,{tmp_path}/b/x.json"], "share a run id")):
        with pytest.raises(SystemExit) as e:
            sweep.main(["--preset", "real-cpu", "--out_dir", str(out), "--inits", "scratch", *args])
        assert str(e.value.code).startswith("error:") and words in str(e.value.code)
    assert not out.exists()


def fake_real_rows(ls, lf=None, inc=None):
    """Rows of a one-seed real sweep with chosen ℓ_s (and ℓ_f) per run name."""
    rows = []
    for name, s in ls.items():
        c = name.split("-")[0]
        rows.append({"run_id": f"{name}-s1", "constraint": c, "task": "alpaca_small", "proxy": "", "lam": 1.0,
                     "radius": 0.0, "safety_loss": float(s), "capability_loss": float((lf or {}).get(name, 100.0)),
                     "safety_increase": float((inc or {}).get(name, s - 100.0))})
    return rows


def test_real_finding_checks_follow_the_numbers(tmp_path, monkeypatch):
    """F1–F3 verdicts flip when the measurements that decide them are swapped."""
    sc = sweep.SweepConfig(preset="real-cpu", out_dir=str(tmp_path), tasks=("alpaca_small", "code_alpaca"),
                           proxies=("safety_llamas_proxy", "xstest_gpt4"), radii=(1.0, 4.0), lams=(1.0,))
    monkeypatch.setattr(analysis, "theta0_means", lambda sc, *arm: analysis.seed_means(
        [{f"refusal_{k}": 0.9 if kind == "harmful" else 0.1 for k, kind in analysis.REFUSAL_SETS.items()}]))
    est = {"overlap": {"alpaca_small": {"M": 0.6}, "code_alpaca": {"M": 0.4}},
           "mismatch": {"safety_llamas_proxy": {"mismatch": 0.5}, "xstest_gpt4": {"mismatch": 100.0}}}
    names = ["none-alpaca_small", "none-code_alpaca", "loss-alpaca_small-safety_llamas_proxy-lam1",
             "loss-alpaca_small-xstest_gpt4-lam1", "param-alpaca_small-r1", "param-alpaca_small-r4"]

    def verdicts(ls, lf, inc):
        rows = fake_real_rows(dict(zip(names, ls)), dict(zip(names, lf)), dict(zip(names, inc)))
        return {n: ok for n, _, ok, _ in report.check_findings_real(sc, rows, est)}
    # paper-like: same proxy safest; alpaca raises ℓ_s more than code; Case II less capable at equal ℓ_s
    good = verdicts([150, 160, 105, 160, 110, 130], [130, 120, 136, 137, 170, 150], [40, 30, -5, 50, 0, 20])
    assert good == {"θ_0": True, "F1": True, "F2": True, "F3": True, "F4": None}   # one λ: F4 not checkable
    bad = verdicts([150, 160, 165, 160, 110, 130], [130, 120, 136, 137, 120, 110], [30, 40, 55, 50, 0, 20])
    # Case I less safe AND less capable than the nearest Case II run: no
    assert bad == {"θ_0": True, "F1": False, "F2": False, "F3": False, "F4": None}
    # outside the radii's ℓ_s range with neither run better on both losses: not judged, and
    # not called a failure (safer but less capable; less safe but more capable)
    assert verdicts([150, 160, 105, 160, 110, 130], [130, 120, 180, 137, 170, 150], [40, 30, -5, 50, 0, 20])["F3"] is None
    assert verdicts([150, 160, 165, 160, 110, 130], [130, 120, 100, 137, 120, 110], [40, 30, -5, 50, 0, 20])["F3"] is None
    # Case I inside the Case II range: compared with the interpolated Case II ℓ_f (166.7 at ℓ_s 105)
    inside = [150, 160, 105, 160, 100, 130]
    assert verdicts(inside, [130, 120, 136, 137, 170, 150], [40, 30, -5, 50, 0, 20])["F3"] is True
    assert verdicts(inside, [130, 120, 168, 137, 170, 150], [40, 30, -5, 50, 0, 20])["F3"] is False


def test_a_published_report_replaces_only_its_block_of_its_readme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("top\n<!-- sweep:paper:begin -->\nold table\n<!-- sweep:paper:end -->\n")
    sc, _ = sweep.make_config("paper")   # report_dir results/paper, relative to the working directory
    os.makedirs(sc.report_dir)
    readme = tmp_path / "results" / "paper" / "README.md"
    readme.write_text("intro\n<!-- sweep:paper:begin -->\nold table\n<!-- sweep:paper:end -->\noutro\n")
    home = sweep.PRESETS["paper"]["report_dir"]   # what sweep.run_sweep hands the report
    report.publish(sc, "<!-- generated -->\nnew table\nrow", home)
    assert readme.read_text() == "intro\n<!-- sweep:paper:begin -->\nnew table\nrow\n<!-- sweep:paper:end -->\noutro\n"
    assert (tmp_path / "results" / "paper" / "results.md").read_text() == "<!-- generated -->\nnew table\nrow"
    assert "old table" in (tmp_path / "README.md").read_text()  # the top-level README is never written
    # any other report directory leaves the preset's README alone
    other, _ = sweep.make_config("paper", out_dir=str(tmp_path / "elsewhere"))
    os.makedirs(other.report_dir)
    report.publish(other, "<!-- generated -->\nother", home)
    assert "other" not in readme.read_text()


def test_real_preset_without_a_data_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFETY_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "real-cpu", "--out_dir", str(tmp_path / "never")])
    assert "SAFETY_DATA_DIR" in str(e.value.code) and "--data_dir" in str(e.value.code)
    assert not (tmp_path / "never").exists()


def test_pareto_comparison_is_made_only_where_the_lower_curve_was_measured():
    curve = [(0.1, 2.0), (0.5, 1.0), (1.0, 0.5)]
    assert report.pareto_dominated((0.3, 1.6), curve) is True     # above the chord at G_f 0.3 (1.5)
    assert report.pareto_dominated((0.3, 1.4), curve) is False    # below it
    assert report.pareto_dominated((2.0, 0.5), curve) is True     # right of the end: the curve goes on flat
    assert report.pareto_dominated((2.0, 0.4), curve) is False
    assert report.pareto_dominated((0.05, 9.0), curve) is None    # left of the first point: not comparable


def test_every_registered_strategy_is_planned_with_its_own_grid_and_run_id():
    sc, recipe = sweep.make_config("smoke", out_dir="never", grids={"penalty": (2.0, 20.0)})
    ids = [t["id"] for t in plan.plan(sc, recipe).values() if t["kind"] == "finetune"]
    for name, s in STRATEGIES.items():  # the smoke preset sweeps every strategy of the registry
        assert any(i.startswith(f"{name}-") for i in ids), name
    assert "penalty-k0.25-d0.3-gamma2-s1" in ids and "penalty-k0.25-d0.3-gamma20-s1" in ids
    assert all(f"fisher-k0.25-d0.3-gamma{v:g}-s1" in ids for v in STRATEGIES["fisher"].grid)
    task = plan.plan(sc, recipe)["penalty-k0.25-d0.3-gamma20-s1"]
    assert task["train"]["gamma"] == 20.0 and task["reference"]  # a Case II run gets the unconstrained one


def test_capability_at_equal_safety_interpolates_inside_the_measured_range_only():
    def row(c, v, G_s, G_f):
        return {"run_id": f"{c}{v}", "constraint": c, "overlap": 0.25, "mismatch_delta": 0.3, "lam": 0.0,
                "radius": 0.0, STRATEGIES[c].sweep_param: v, "safety_gap": G_s, "capability_gap": G_f}
    rows = [row("param", 0.5, 0.1, 10.0), row("param", 1.0, 1.1, 4.0), row("penalty", 1.0, 2.0, 1.0),
            row("penalty", 10.0, 0.5, 3.0)]
    g = analysis.groups(rows, "param", overlap=0.25)
    assert report.at_equal_safety(g, 0.6) == pytest.approx(7.0)    # halfway from (0.1, 10) to (1.1, 4)
    assert report.at_equal_safety(g, 0.05) is None and report.at_equal_safety(g, 2.0) is None
    sc, _ = sweep.make_config("smoke", out_dir="never")
    table = report.equal_safety_table(sc, rows, levels=(0.6, 1.0))
    assert "| 0.6 | 7.000 | 2.867 |" in table and "| 1 | 4.600 | 2.333 |" in table


# -----------------------------------------------------------------------------
# Starting points (--inits) and arm P (presets paper-real-cpu, paper-real-gpu)


@needs_data
@pytest.mark.parametrize("args, words", [
    (["--inits", "scratch,bogus"], "--inits: 'bogus'"),
    (["--inits", "pretrain", "--scratch_seeds", "1"], "--scratch_seeds"),
    (["--theta_pre", "/no/such/theta_pre.pt"], "--theta_pre /no/such/theta_pre.pt does not exist"),
    (["--proxy_lam", "-1"], "--proxy_lam"),
    (["--case_tasks", "alpaca_small,no_such_set"], "--case_tasks"),
])
def test_bad_starting_point_flags_fail_with_one_clear_message(tmp_path, args, words):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "paper-real-cpu", "--out_dir", str(out), *args])
    assert str(e.value.code).startswith("error:") and words in str(e.value.code)
    assert not out.exists()


def test_a_pretrained_arm_needs_real_text():
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--inits", "scratch,pretrain", "--out_dir", "/nonexistent/never"])
    assert "pretrains on real general text" in str(e.value.code)


def paper_real_rows(cost, gain, lf, proxy_loss):
    """One seed of arm P rows (scratch arm): per run name, its ℓ_s increase, ℓ_f gain, ℓ_s, ℓ_f, proxy loss."""
    rows = []
    for n in cost:
        c = n.split("-")[0]
        rows.append({"run_id": f"{n}-s1", "seed": 1.0, "constraint": c, "safety_increase": float(cost[n]),
                     "capability_gain": float(gain[n]), "safety_loss": 100.0 + cost[n], "capability_loss": float(lf[n]),
                     "aligned_safety_loss": 100.0, "aligned_capability_loss": float(lf[n] + gain[n]),
                     "proxy_train_loss": float(proxy_loss[n]), "proxy_heldout_loss": None, "proxy_epochs": 1.0})
    return rows


def test_forecast_validation_ranks_tasks_by_their_cost_at_matched_gain():
    est = {"overlap": {t: {"a2_overlap_term": {"1.0": v}} for t, v in (("a", 0.3), ("b", 0.2), ("c", 0.1), ("z", 0.5))}}

    def row(t, seed, cost, gain):
        return {"run_id": f"none-{t}-s{seed}", "constraint": "none", "seed": float(seed), "safety_increase": float(cost),
                "capability_gain": float(gain)}
    # seed 1: a pays 0.5 nats of ℓ_s per nat gained, b 0.3, c 0.1; seed 2: a 0.5, b 0.1, c 0.2; z gains nothing
    rows = [row("a", 1, 10, 20), row("b", 1, 9, 30), row("c", 1, 4, 40), row("z", 1, 50, -1),
            row("a", 2, 10, 20), row("b", 2, 3, 30), row("c", 2, 8, 40), row("z", 2, 50, -2)]
    v = analysis.forecast_validation(rows + [row("q", 1, -1, -1), row("q", 2, -2, -1)], est, ("a", "b", "c", "z", "q"), "")
    # z paid safety for nothing: the costliest per nat (+∞); q neither gained nor paid: left out
    assert v["no_gain"] == ["z"] and v["left_out"] == ["q"] and set(v["tasks"]) == {"a", "b", "c", "z"}
    assert v["g_star"] == 20.0 and v["tasks"]["z"]["matched"] == np.inf
    # matched cost: g* × the seeds' mean ratio, so a task that only gained more does not look costlier
    assert v["tasks"]["a"]["matched"] == pytest.approx(10.0) and v["tasks"]["b"]["matched"] == pytest.approx(4.0)
    assert v["tasks"]["c"]["matched"] == pytest.approx(20 * (0.1 + 0.2) / 2)
    assert v["rho"] == pytest.approx(1.0) and v["rho_seeds"] == {1: pytest.approx(1.0), 2: pytest.approx(0.8)}
    est["overlap"]["q"] = {"a2_overlap_term": {"1.0": 0.0}}
    est["overlap"]["a"]["a2_overlap_term"]["1.0"] = 0.0            # the forecast now puts a last
    assert analysis.forecast_validation(rows, est, ("a", "b", "c"), "")["rho"] == pytest.approx(-0.5)
    assert analysis.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


def test_paper_real_checks_follow_the_trade_off_curves():
    """F2 compares safety costs at matched capability gain along each task's Case I curve; swap the
    curves and the verdict flips; F4 fails when the proxy loss rises with λ."""
    from lab import report_paper_real as rp
    sc = sweep.SweepConfig(preset="paper-real-cpu", case_tasks=("hi", "lo"), task="hi", proxies=("same", "other"),
                           lams=(1.0, 10.0), radii=(2.0,), proxy_lam=1.0, inits=("scratch",))
    est = {"overlap": {"hi": {"M": 0.9}, "lo": {"M": 0.6}}, "mismatch": {"same": {"mismatch": 0.1}, "other": {"mismatch": 9.0}}}

    def runs(t, costs, gains):  # plain, λ = 1, λ = 10, the other proxy, one radius
        names = [f"none-{t}", f"loss-{t}-same-lam1", f"loss-{t}-same-lam10", f"loss-{t}-other-lam1", f"param-{t}-r2"]
        return dict(zip(names, costs)), dict(zip(names, gains))

    def verdicts(hi_cost, lo_cost, proxy=(5.0, 4.0, 3.0, 6.0, 5.0)):
        (c1, g1), (c2, g2) = runs("hi", hi_cost, (30, 20, 10, 20, 5)), runs("lo", lo_cost, (30, 20, 10, 20, 5))
        cost, gain = {**c1, **c2}, {**g1, **g2}
        lf = {n: 100.0 - gain[n] for n in cost}
        rows = paper_real_rows(cost, gain, lf, {n: proxy[i % 5] for i, n in enumerate(cost)})
        return {f"{n}:{claim.split(':')[0]}": ok for n, claim, ok, _ in rp.check_arm(sc, rows, est, "")}
    steep, flat = (30, 15, 6, 20, 4), (10, 5, 2, 8, 1)
    v = verdicts(steep, flat)
    assert v["F2:at matched capability gain, the task of higher overlap (hi) pays the larger safety cost ℓ_s − "
             "ℓ_s(θ_0) than lo"] is True
    assert v["F1:hi, λ=1"] is True and v["F4:hi"] is True
    v = verdicts(flat, steep, proxy=(5.0, 4.0, 4.5, 6.0, 5.0))  # the proxy loss rises from λ 1 to 10
    assert v["F2:at matched capability gain, the task of higher overlap (hi) pays the larger safety cost ℓ_s − "
             "ℓ_s(θ_0) than lo"] is False
    assert v["F4:hi"] is False
    assert rp.cost_at_gain([(1.0, 10.0, 4.0, None), (0.0, 20.0, 10.0, None)], 15.0) == pytest.approx(7.0)


@needs_data
def test_paper_real_sweep_with_both_starting_points_end_to_end(tmp_path, capsys):
    sc, _ = sweep.make_config("paper-real-cpu", out_dir=str(tmp_path / "p"), seeds=(1,), scratch_seeds=(1,),
                              jobs=1, lams=(1.0,), radii=(1.0,), proxies=("alpaca_gpt4_proxy",),
                              tasks=("alpaca_small_task", "code_alpaca"), case_tasks=("alpaca_small_task", "code_alpaca"))
    recipe = dict(TINY_REAL, safety_data="alpaca_gpt4_align", align_helpful="", pretrain_iters=10,
                  pretrain_data="wiki_demo+alpaca_seed", align_patience=2, align_eval_interval=5)  # θ_0 early-stopped
    rows = sweep.run_sweep(sc, recipe)
    assert sorted(r["run_id"] for r in rows) == sorted(
        p + f"{c}-{t}{k}-s1" for p in ("", "pre-") for t in sc.case_tasks
        for c, k in (("none", ""), ("loss", "-alpaca_gpt4_proxy-lam1"), ("param", "-r1")))
    for r in rows:
        assert r["proxy_examples"] > 0 and r["proxy_train_loss"] > 0 and r["proxy_heldout_loss"] > 0
        assert (r["proxy_epochs"] > 0) == (r["constraint"] == "loss")
        assert r["init"] == ("pretrain" if r["run_id"].startswith("pre-") else "scratch")
    md = open(tmp_path / "p" / "results.md").read()
    for f in ("F1, scratch", "F2, θ_pre", "F3, θ_pre", "F4, scratch", "F4 (ℓ_s), θ_pre"):
        assert f"| {f} |" in md
    assert "**θ_pre**" in md and (tmp_path / "p" / "fig1_paper_real_tradeoff.png").exists()
    # the checks of the theory's assumptions come first: θ_0, answers scored, mismatch, forecasts
    for section in ("**θ_0 at its optimum?**", "**Answers scored**", "**Mismatch**", "**Both forecasts"):
        assert section in md
    for arm in ("s1", "pre-s1"):  # each θ_0's answer-aware forecast of every task, before its fine-tunes
        grads = json.load(open(tmp_path / "p" / "theta0" / arm / "answer_forecast.json"))
        assert set(grads["tasks"]) == set(sc.tasks) and all("grad_cos" in g for g in grads["tasks"].values())
    mm = json.load(open(tmp_path / "p" / "mismatch" / "alpaca_gpt4_proxy" / "refusals.json"))
    assert mm["loss_on_original"] > 0 and "grad_dot_halves" in mm
    capsys.readouterr()
    sweep.run_sweep(sc, recipe)  # resumed: every run and θ_pre already done
    assert f"({len(rows)} already done)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Shards: --shard i/n on one folder, at once, one of them killed and started again


TIMING = ("seconds",)  # train_seconds, cpu_seconds, theory_seconds, ...: the schedule's, not the runs'


def test_two_concurrent_shards_one_killed_give_the_one_process_rows_and_report(smoke, tmp_path):
    import signal
    import time
    out = str(tmp_path / "sharded")
    cmd = lambda i: [sys.executable, "-m", "lab.sweep", "--preset", "smoke", "--out_dir", out,
                     "--jobs", "1", "--shard", f"{i}/2"]
    procs = {i: subprocess.Popen(cmd(i), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)}
    csv_path = os.path.join(out, "results.csv")
    deadline = time.time() + 300
    while (not os.path.exists(csv_path) or len(csv_rows(csv_path)) < 2) and procs[1].poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    assert procs[1].poll() is None, "shard 1 finished before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    procs[1] = subprocess.Popen(cmd(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {i: p.communicate(timeout=600)[0] for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    ref, got = csv_rows(os.path.join(smoke["out"], "results.csv")), csv_rows(csv_path)
    assert [r["run_id"] for r in got] == [r["run_id"] for r in ref]     # every run once, in plan order
    for a, b in zip(ref, got):
        for k in a:
            x, y = a[k].replace(smoke["out"], "OUT"), b[k].replace(out, "OUT")  # run folders' paths
            if not k.endswith(TIMING) and x != y:
                assert float(x) == pytest.approx(float(y), rel=1e-6, abs=1e-9), (a["run_id"], k, x, y)
    findings = lambda path: [line for line in open(path) if line.startswith("| F")]
    assert findings(os.path.join(out, "results.md")) == findings(os.path.join(smoke["out"], "results.md"))
    assert any("its share is done" in log for log in logs.values())    # the first to finish left the report
    ran = {i: {line.split("] ")[1].split(":")[0] for line in log.splitlines() if line.strip().startswith("[")}
           for i, log in logs.items()}
    assert ran[1] and ran[2] and not ran[1] & ran[2]                    # no run trained by both shards


def test_a_batched_sweep_gives_the_single_run_rows_and_report(smoke, tmp_path, capsys):
    out = str(tmp_path / "batched")
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1", "--batch_runs", "8"])
    said = capsys.readouterr().out
    # penalty and fisher prepare per-run state at θ_0: said once, then run singly
    assert said.count("cannot be batched") == 1 and "4 runs (fisher, penalty)" in said
    ref, got = csv_rows(os.path.join(smoke["out"], "results.csv")), csv_rows(os.path.join(out, "results.csv"))
    assert [r["run_id"] for r in got] == [r["run_id"] for r in ref]     # every run once, in plan order
    for a, b in zip(ref, got):  # batched arithmetic (tests/test_batched.py): equal to float tolerance
        for k in a:
            x, y = a[k].replace(smoke["out"], "OUT"), b[k].replace(out, "OUT")
            if not k.endswith(TIMING) and x != y:
                assert float(x) == pytest.approx(float(y), rel=1e-4, abs=1e-6), (a["run_id"], k, x, y)
    findings = lambda path: [line for line in open(path) if line.startswith("| F")]
    assert findings(os.path.join(out, "results.md")) == findings(os.path.join(smoke["out"], "results.md"))
    logs = lambda: {r: open(os.path.join(out, "runs", r, "sweep_train.out")).read() for r in os.listdir(
        os.path.join(out, "runs"))}
    before = logs()
    assert before["loss-k0.25-d0-lam1-s1"].count("losses and gaps in nats per sequence") == 6  # the Case I group, in its first run's log
    assert "batched group with loss-k0.25-d0-lam1-s1" in before["loss-k0-d0.3-lam10-s1"]
    # --refresh reports theory again and trains nothing: every training log stays as it was
    sweep.main(["--preset", "smoke", "--out_dir", out, "--jobs", "1", "--batch_runs", "8", "--refresh"])
    assert logs() == before


@pytest.mark.parametrize("shard", ["3/2", "0/2", "1-2", "a/b", "2/0"])
def test_a_bad_shard_is_one_clear_message(tmp_path, shard):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--out_dir", str(tmp_path / "never"), "--shard", shard])
    assert "--shard" in str(e.value.code) and "1 ≤ i ≤ n" in str(e.value.code)
    assert not (tmp_path / "never").exists()


def test_an_ablation_sweeps_one_strategy_with_no_baselines_and_its_own_steps(tmp_path, capsys):
    out = str(tmp_path / "ablation")
    sweep.main(["--preset", "smoke", "--strategies", "penalty", "--no-baselines", "--train", "max_iters=7",
                "--out_dir", out, "--jobs", "1"])
    printed = capsys.readouterr().out
    rows = csv_rows(os.path.join(out, "results.csv"))
    assert {r["constraint"] for r in rows} == {"penalty"} and len(rows) == len(STRATEGIES["penalty"].grid)
    for r in rows:  # every run trained the steps asked for, and no reference run was planned for (E)
        cfg = json.load(open(os.path.join(out, "runs", r["run_id"], "config.json")))["config"]
        assert cfg["max_iters"] == 7 and not r.get("d_unconstrained")
    assert "plan: 2 fine-tunes, 1 θ_0" in printed and "ms a plain step measured now" in printed
    assert "| F5 |" in open(os.path.join(out, "results.md")).read()


@pytest.mark.parametrize("args,expect", [
    (["--strategies", "", "--no-baselines"], "--no-baselines leaves nothing to run"),
    (["--train", "max_iter=7"], "is not KEY=VALUE with KEY a train.py flag"),
    (["--train", "max_iters=seven"], "'seven' is not a int"),
    (["--train", "lr=-1"], "--train: --lr -1.0 must be a finite number ≥ 0"),
    (["--train", "seed=5"], "the sweep sets seed run by run"),
])
def test_bad_ablation_flags_are_one_message(tmp_path, capsys, args, expect):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "smoke", "--out_dir", str(tmp_path / "never"), *args])
    assert expect in capsys.readouterr().err + str(e.value.code)  # argparse's message, or the sweep's
    assert not (tmp_path / "never").exists()
