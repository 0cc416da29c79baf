"""lab/report_checks.py and lab/report.py: the real-text reports' checks before any finding (the 2×2, θ_0's control, θ_0's refusals)."""

from lab import report_checks
from lab.report import theta0_behaves

CELLS = {("high", "agree"): ("same_teacher",), ("high", "conflict"): ("refusals", "other_teacher"),
         ("low", "agree"): ("code",), ("low", "conflict"): ("code_refusals",)}
M = {"same_teacher": (0.96, 0.9, 1.0), "refusals": (1.0, 1.0, 1.0), "other_teacher": (0.31, 0.29, 0.41),
     "code": (0.28, 0.2, 0.3), "code_refusals": (0.28, 0.2, 0.3)}


def judge(monkeypatch, cost, overlap=M):
    v = {"tasks": {t: {"matched": c} for t, c in cost.items()}}
    monkeypatch.setattr(report_checks, "cost_table", lambda *a: (v, {}))
    est = {"overlap": {t: {"M": m, "M_interval": [lo, hi]} for t, (m, lo, hi) in overlap.items()}}
    return "\n".join(report_checks.cells_table(None, [], est, [("θ_pre", "pre-", (1,))], CELLS))


def test_the_2x2_places_a_task_by_its_measured_overlap_not_the_cell_it_was_built_for(monkeypatch):
    # other_teacher was built as high overlap but measures M 0.31: it joins the low-overlap conflict cell,
    # so high + conflict is refusals alone (+4) and low + conflict averages +3 and +9 (+6): the most
    text = judge(monkeypatch, {"same_teacher": -1.0, "refusals": 4.0, "other_teacher": 9.0, "code": 0.5,
                               "code_refusals": 3.0})
    assert "| θ_pre | high | low: 0.310 [0.290, 0.410] | conflict | other_teacher |" in text
    built, measured = (line for line in text.splitlines() if line.startswith("- θ_pre, by"))
    assert "high overlap + conflict +6.5" in built and "costs the most: **yes**" in built   # (+4 + 9) / 2
    assert "high overlap + conflict +4.0" in measured and "low overlap + conflict +6.0" in measured
    assert "costs the most: **no** (the most: low overlap + conflict)" in measured
    assert "other_teacher (built as high overlap, M 0.310)" in text


def test_a_task_whose_overlap_interval_straddles_the_line_keeps_its_cell(monkeypatch):
    text = judge(monkeypatch, {"same_teacher": -1.0, "refusals": 4.0, "other_teacher": 9.0, "code": 0.5,
                               "code_refusals": 3.0}, dict(M, other_teacher=(0.45, 0.38, 0.55)))
    assert "| high | high: 0.450 [0.380, 0.550] | conflict | other_teacher |" in text
    assert "by measured overlap" not in text and "placed by their measured overlap" not in text


def test_the_2x2_says_yes_when_high_overlap_with_conflicting_answers_costs_the_most(monkeypatch):
    text = judge(monkeypatch, {"same_teacher": -1.0, "refusals": 8.0, "other_teacher": 0.2, "code": 0.5,
                               "code_refusals": 3.0})
    assert "costs the most: **yes**" in text


def test_a_missing_cell_is_not_judged(monkeypatch):
    text = judge(monkeypatch, {"same_teacher": -1.0, "code": 0.5, "code_refusals": 3.0})
    assert "3 of 4 cells measured: not judged" in text


def test_the_control_calls_theta0_data_limited_only_beyond_its_seed_spread():
    assert report_checks.control_verdict([-5.0, -6.0, -4.0]).startswith("**data-limited**")
    assert report_checks.control_verdict([-0.8, 1.1, -2.7]).startswith("at its optimum within noise")
    assert "one seed" in report_checks.control_verdict([-2.1]) and report_checks.control_verdict([]) == "no control run"


def test_theta0_must_answer_harmless_prompts_readably():
    """A θ_0 that refuses harmful prompts and says nothing readable to harmless ones (all UNK) does not
    'answer most harmless ones': unreadable responses count as neither refusal nor answer."""
    sets = {"harm": "harmful", "safe": "harmless"}
    assert theta0_behaves({"harm": 0.9, "safe": 0.2}, {"harm": 0.05, "safe": 0.1}, sets)
    assert not theta0_behaves({"harm": 0.9, "safe": 0.2}, {"harm": 0.05, "safe": 0.7}, sets)
    assert not theta0_behaves({"harm": 0.4, "safe": 0.0}, {"harm": 0.0, "safe": 0.0}, sets)
