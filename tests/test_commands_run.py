"""Every command the docs show a user (test_commands.documented_commands: README, docs/, the results'
READMEs, scripts/gpu_check.sh), run at a tiny size from a clean clone of this repository. Opt-in,
because its 72 commands took 12 minutes on 2 cores (2026-12-03); the suite proper parses each:

    python -m pytest -q tests/test_commands_run.py --commands

The clone is `git clone` of the committed HEAD, so what runs is what a user gets. Each command runs in
a fresh copy of it, with
- its entry point's TINY flags appended (the last flag wins: a documented --max_iters 5000 runs 2
  steps; a sweep stops after --max_runs 1, which is how a user checks a preset before its hours);
- its placeholders (RUN_DIR, CKPT, DIR, FILE, NAME, $VAR) bound to artifacts the fixture made with
  tiny runs first (RUN_DIR: a Case II run; CKPT: a real-text fine-tune; DIR after --hf_dir: that
  fine-tune exported as a GPT-2 folder, ...), and the literal paths the docs use (out_real/theta0.pt,
  out/pre/theta_pre.pt, my_tasks.jsonl) made the same way;
- on a machine without CUDA, --device cpu for --device cuda and --no-compile for --compile.
A command docs/reliability.md shows being refused must end in one `error:` message and no traceback.
What cannot run here is skipped with its reason (downloads: no network; a CUDA-only query)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED
from test_commands import documented_commands

pytestmark = pytest.mark.commands
DATA = os.environ.get("SAFETY_DATA_DIR", os.path.join(SHARED, "data"))
CUDA = torch.cuda.is_available()

SYNTHETIC = ["--align_iters", "4", "--max_iters", "2", "--eval_interval", "2", "--pretrain_iters", "2",
             "--no-progress"]
SHAPE = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32"]
REAL = ["--eval_examples", "16"]
SWEEP = ["--max_runs", "1", "--jobs", "1", "--refusal_limit", "4", "--power_iters", "2",
         *[w for kv in ("align_iters=4", "max_iters=2", "pretrain_iters=2") for w in ("--train", kv)]]
SWEEP_REAL = [w for kv in ("n_layer=1", "n_head=2", "n_embd=32", "eval_examples=16", "block_size=64", "vocab_cap=4096",
                            "batch_tokens=2048", "micro_batch=32") for w in ("--train", kv)]  # the GPU presets' too
TINY = {  # entry point → flags appended to each of its commands
    "lab.landscape": ["--jobs", "1", "--seeds", "1", "--radii", "0.5", "--power_iters", "2",
                      "--train", "align_iters=4", "--train", "max_iters=2"],
    "lab.bench": ["--steps", "10", "--warmup", "1", "--batch", "1", "--seq_len", "16"],
    "lab.refusals": ["--limit", "4", "--max_new_tokens", "4"],
    "lab.sample": ["--max_new_tokens", "4"],
    "lab.forecast": ["--max_n", "48"],
}
MENTIONS = (["-m", "lab.forecast"],)  # named in prose, not run bare: it needs --safety and --task; runs --help
SKIP = {
    "stepclip": "docs/extending.md's example strategy, which exists once a reader adds it",
    "get_device_name": "asks CUDA for its device name" if not CUDA else None,
    "armp-check/theta0": "reads the θ_0 of the sweep command before it in docs/forecast.md (its own test runs that one)",
}


def train_words(words):
    """train.py's tiny flags: the synthetic ones, and for real text a tiny shape (unless the shape comes
    from a GPT-2 folder) and few evaluation examples."""
    extra = list(SYNTHETIC)
    if "real" in words:
        extra += REAL + ([] if "gpt2" in words else SHAPE)
    return words + extra


def bind(words):
    """The command with its placeholders bound, CUDA swapped for the CPU where there is none, and its
    tiny flags; or a reason it cannot run here."""
    for key, why in SKIP.items():
        if why and any(key in w for w in words):
            return None, why
    if words[:2] == ["-m", "realtext.fetch"] and "--out" in words and "--from" not in words:
        return None, "downloads from the internet (this machine reaches only package registries)"
    if words in MENTIONS:
        return words + ["--help"], None
    entry = words[1] if words[0] == "-m" else words[0]
    out = []
    for i, w in enumerate(words):
        out.append(value(entry, words[i - 1] if i else "", w))
    if not CUDA:
        out = ["cpu" if (prev == "--device" and w.startswith("cuda")) else w for prev, w in zip([""] + out, out)]
        out = ["--no-compile" if w == "--compile" else w for w in out]
    if entry == "train.py":
        out = train_words(out)
    elif entry == "lab.sweep":
        real = any("real" in w for w in out)
        out = out + SWEEP + (SWEEP_REAL if real else [])
    else:
        out = out + TINY.get(entry, [])
    if entry == "lab.bench" and "--variants" not in out:  # two of the variants (GPT-2 small takes minutes on a CPU)
        out += ["--variants", "none,param"]
    return out, None


def value(entry, flag, w):
    """One word with its placeholder bound, by the flag it follows."""
    if w.startswith("/tmp/"):  # a documented scratch folder: inside the copy instead
        return "tmp/" + w[len("/tmp/"):]
    if w.startswith("X/"):  # $OUT/... of gpu_check.sh
        return "gpu/" + w[2:]
    named = {"--preset": {"NAME": "smoke", "X": "paper-real-gpu"}, "--safety": {"NAME": "safety_llamas"},
             "--task": {"NAME": "code_alpaca", "FILE": "art/task.jsonl"}, "--prompts": {"FILE": "art/prompts.csv",
                                                                                      "F": "art/prompts.csv"},
             "--data_dir": {"X": DATA}, "--check": {"DIR": DATA}, "--from": {"MIRROR": DATA},
             "--hf_dir": {"DIR": "art/hf"}, "--out": {"DIR": "exported"},
             "--ckpt": {"CKPT": "art/real_ft/ckpt.pt", "X": "art/run/ckpt.pt"}}
    if w in named.get(flag, {}):
        return named[flag][w]
    for name, path in (("RUN_DIR", "art/run"), ("RUN_R", "art/run"), ("RUN", "art/ref")):
        if w == name or w.startswith(name + "/"):
            return path + w[len(name):]
    return w


def refused(where, words):
    """Whether the docs show this command being refused (a row of docs/reliability.md's table)."""
    if where != "docs/reliability.md":
        return False
    text = open(os.path.join(ROOT, where), encoding="utf-8").read()
    return any("error:" in row and f"`python {' '.join(words)}`" in row for row in text.splitlines()
               if row.startswith("|"))


def run(cwd, words, timeout=600):
    env = dict(os.environ, PYTHONPATH=cwd)  # the copy's modules, not the working tree's
    return subprocess.run([sys.executable, *words], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def prepare(clone):
    """The artifacts the documented commands name, made in the clone by tiny runs of train.py and export."""
    os.makedirs(os.path.join(clone, "art"))
    rows = [f'{{"instruction": "Write item {i} of a list of fruit.", "output": "Item {i}: an apple."}}'
            for i in range(40)]
    for name in ("art/task.jsonl", "my_tasks.jsonl"):
        open(os.path.join(clone, name), "w").write("\n".join(rows) + "\n")
    prompts = "prompt\n" + "".join(f"How do I bake bread number {i}?\n" for i in range(8))
    for name in ("art/prompts.csv", "my_prompts.csv"):
        open(os.path.join(clone, name), "w").write(prompts)
    steps = [["train.py", "--constraint", "param", "--radius", "0.1", "--out_dir", "art/run"],
             ["train.py", "--stage", "finetune", "--theta0", "art/run/theta0.pt", "--out_dir", "art/ref"]]
    if os.path.isdir(DATA):
        steps += [["train.py", "--data", "real", "--stage", "pretrain", "--out_dir", "out/pre"],
                  ["train.py", "--data", "real", "--stage", "align", "--out_dir", "out_real"],
                  ["train.py", "--data", "real", "--stage", "finetune", "--theta0", "out_real/theta0.pt",
                   "--task_data", "code_alpaca", "--out_dir", "art/real_ft"]]
    for words in steps:
        proc = run(clone, train_words(words))
        assert proc.returncode == 0, f"{' '.join(words)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    if os.path.isdir(DATA):
        proc = run(clone, ["-m", "lab.export", "--ckpt", "art/real_ft/ckpt.pt", "--out", "art/hf", "--vocab", "gpt2"])
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def clone(tmp_path_factory):
    """A clean clone of HEAD with the artifacts the docs' commands name, and a token cache of its own."""
    path = str(tmp_path_factory.mktemp("commands") / "clone")
    subprocess.run(["git", "clone", "-q", ROOT, path], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETY_CACHE_DIR", os.path.join(os.path.dirname(path), "token_cache"))
        prepare(path)
        yield path


def distinct_commands():
    """Each documented command once, where it is first shown."""
    seen, out = set(), []
    for where, words in documented_commands():
        if tuple(words) not in seen:
            seen.add(tuple(words))
            out.append((where, words))
    return out


@pytest.mark.parametrize("where,words", distinct_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:70])
def test_every_documented_command_runs_at_a_tiny_size(where, words, clone, tmp_path):
    bound, why = bind(words)
    if why:
        pytest.skip(why)
    if any("real" in w for w in bound) and not os.path.isdir(DATA):
        pytest.skip(f"needs the real data folder ({DATA}): set SAFETY_DATA_DIR")
    cwd = str(tmp_path / "work")
    shutil.copytree(clone, cwd, ignore=shutil.ignore_patterns(".git"))
    os.makedirs(os.path.join(cwd, "gpu"))  # $OUT of gpu_check.sh, which makes it first
    out_dir = bound[bound.index("--out_dir") + 1] if "--out_dir" in bound else ""
    if out_dir and not os.path.isabs(out_dir) and "--resume" not in bound:  # the command makes it: not there before
        shutil.rmtree(os.path.join(cwd, out_dir), ignore_errors=True)
    proc = run(cwd, bound)
    shown = f"{where}: `python {' '.join(words)}` ran as `python {' '.join(bound)}`"
    if refused(where, words):
        assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr, \
            f"{shown}: should be refused in one message:\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, f"{shown}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
