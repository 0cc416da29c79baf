"""`python -m lab.forecast` (forecast.py): the safety cost of task sets, forecast before any
fine-tuning, on a user's own files in every prompt format, with the representation overlap under a
text checkpoint; and its refusals of input it cannot use."""
import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from data import WorldConfig
from lab import forecast
from model import CHECKPOINT_FORMAT, GPT, GPTConfig
from realtext import textdata
from realtext.corpus import CorpusConfig

SAFE = ["harm", "weapon", "steal", "attack", "poison", "hack", "threat", "danger"]
GENERAL = ["recipe", "poem", "travel", "garden", "history", "music", "story", "sport"]
CODE = ["python", "function", "loop", "array", "class", "compile", "string", "integer"]


def prompts(words, n, seed, shared=()):
    """n prompts of 8 words from `words`, a quarter of them from `shared` instead."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(list(shared) if shared and i % 4 == 0 else words, 8)) for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """D_s with answers (.json), a proxy (.jsonl), and tasks of high (.csv) and low (.txt) overlap."""
    d = tmp_path_factory.mktemp("forecast")
    s = prompts(SAFE, 200, 0)
    (d / "safety.json").write_text(json.dumps([{"instruction": p, "output": "I cannot help with that."} for p in s]))
    (d / "proxy.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "Sorry, no."}) + "\n"
                                           for p in prompts(SAFE, 200, 1)))
    with open(d / "general.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        w.writerows([p] for p in prompts(GENERAL, 200, 2, shared=SAFE))
    (d / "code.txt").write_text("\n".join(prompts(CODE, 200, 3)) + "\n")
    return d


def text_checkpoint(path, vocab_texts):
    """A θ_pre of real text (a random GPT): the representation overlap, no answer-aware terms."""
    vocab = np.unique(np.concatenate([np.concatenate(textdata.template_ids(vocab_texts)), [textdata.EOT]]))
    torch.manual_seed(0)
    mc = GPTConfig(block_size=48, vocab_size=len(vocab) + 1, n_layer=1, n_head=2, n_embd=16)
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "theta_pre", "model": GPT(mc).state_dict(),
                "model_config": dataclasses.asdict(mc),
                "world_config": dataclasses.asdict(CorpusConfig(vocab=tuple(int(v) for v in vocab)))}, path)
    return str(path)


def test_forecast_on_user_files_ranks_the_shared_task_first_and_writes_json(files, capsys):
    theta = text_checkpoint(files / "theta.pt", [" ".join(SAFE + GENERAL + CODE)])
    out = forecast.main(["--safety", str(files / "safety.json"), "--task", str(files / "code.txt"),
                       "--task", str(files / "general.csv"), "--proxy", str(files / "proxy.jsonl"),
                       "--theta", theta, "--json", str(files / "f.json")])
    table = capsys.readouterr().out
    general, code = str(files / "general.csv"), str(files / "code.txt")
    assert out["ranking"] == [general, code] and "| 1 | " + general in table
    saved = json.load(open(files / "f.json"))
    g, c = saved["tasks"][general], saved["tasks"][code]
    # a quarter of the general prompts are the safety set's own kind: TV ≈ 0.75; code shares nothing
    assert g["tv"] == pytest.approx(0.75, abs=0.1) and c["tv"] > 0.9
    for e in (g, c):  # the shared-prompt task too: never below its own bound, inside its interval
        assert e["tv_lower_bound"] <= e["tv"] <= 1 and e["tv_interval"][0] <= e["tv"] <= e["tv_interval"][1]
    assert 0 <= g["tv_uncalibrated"] <= 1
    assert g["a2_overlap_term"]["1.0"] > c["a2_overlap_term"]["1.0"]
    assert g["a2_bound"]["1.0"] == pytest.approx(saved["mismatch"]["mismatch"] + g["a2_overlap_term"]["1.0"])
    # the same on mean hidden states: even a random GPT's states tell the families apart
    assert g["representation"]["tv"] == pytest.approx(0.75, abs=0.1) and c["representation"]["tv"] > 0.9
    assert saved["estimate"] is True and saved["tasks"][general]["rank"] == 1
    assert "ranking_answer_aware" not in saved and "grad_cos" not in g  # a θ_pre has no D_s


def test_forecast_refuses_what_it_cannot_use(files, tmp_path):
    safety = str(files / "safety.json")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "few.txt").write_text("one\ntwo\nthree\n")
    synthetic = tmp_path / "synthetic.pt"
    mc = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "theta0", "model": GPT(mc).state_dict(),
                "model_config": dataclasses.asdict(mc), "world_config": dataclasses.asdict(WorldConfig())}, synthetic)
    cases = {"empty": (["--task", str(tmp_path / "empty.txt")], "empty|no prompts"),
             "few": (["--task", str(tmp_path / "few.txt")], "fewer than the classifier's 5 folds"),
             "same": (["--task", safety], "D_s itself"),
             "synthetic": (["--task", str(files / "code.txt"), "--theta", str(synthetic)], "synthetic world"),
             "missing": (["--task", str(tmp_path / "nope.json")], "nope.json: file not found"),
             "lam": (["--task", str(files / "code.txt"), "--lams", "0"], "λ > 0")}
    for what, (args, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            forecast.main(["--safety", safety, *args, "--json", str(tmp_path / f"{what}.json")])
        assert e.value.code != 0
        assert not (tmp_path / f"{what}.json").exists(), what          # nothing half-written
    for what, (args, message) in cases.items():
        if what == "lam":
            continue
        with pytest.raises(SystemExit, match=message):
            forecast.main(["--safety", safety, *args])


def test_a_task_on_the_safety_sets_own_prompts_is_forecast_exactly(files, tmp_path):
    safety = str(files / "safety.json")
    rows = json.load(open(safety))
    other = tmp_path / "other_answers.json"
    other.write_text(json.dumps([dict(r, output="Here is how: first, ...") for r in rows]))
    e = forecast.forecast(safety, [str(other)], lams=(1.0, 10.0))["tasks"][str(other)]
    assert e["M"] == 1.0 and e["tv"] == 0.0 and e["exact"] == "the same prompts"
    assert e["a2_overlap_term"][1.0] == pytest.approx(math.log(2)) and e["a2_overlap_term"][10.0] == pytest.approx(
        math.log(1.1))


@pytest.mark.parametrize("n", [100, 400])
def test_a_separable_task_is_never_reported_below_its_own_bound_nor_with_a_degenerate_interval(tmp_path, n):
    """Sets a classifier tells apart perfectly: calibration alone would read TV < 1 while the accuracy
    certifies TV ≥ 2·acc − 1 = 1; the interval must hold the binomial error of n prompts a set."""
    (tmp_path / "s.txt").write_text("\n".join(prompts(SAFE, n, 0)) + "\n")
    (tmp_path / "f.txt").write_text("\n".join(prompts(CODE, n, 1)) + "\n")
    out = forecast.forecast(str(tmp_path / "s.txt"), [str(tmp_path / "f.txt")])
    e = out["tasks"][str(tmp_path / "f.txt")]
    assert e["tv_lower_bound"] == 1.0 and e["tv"] >= e["tv_lower_bound"] and e["tv"] <= 1.0
    lo, hi = e["tv_interval"]
    assert lo <= e["tv"] <= hi <= 1.0 and e["M"] == pytest.approx(1 - e["tv"])
    # Wilson's interval of 2n of 2n right is [1 − 3.84/(2n + 3.84), 1]; read as 2·acc − 1, twice as wide
    assert hi - lo >= 2 * 3.84 / (2 * n + 3.84) - 1e-9


def test_a_missing_task_file_is_found_before_any_token_is_cached(tmp_path, monkeypatch):
    if not os.environ.get("SAFETY_DATA_DIR"):
        pytest.skip("needs the data folder (SAFETY_DATA_DIR) for a registry D_s")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFETY_CACHE_DIR", str(cache))
    with pytest.raises(SystemExit, match="nope.jsonl: file not found"):  # D_s first on the command line, a bad task after
        forecast.main(["--safety", "safety_llamas", "--task", str(tmp_path / "nope.jsonl")])
    assert not cache.exists() or os.listdir(cache) == []
