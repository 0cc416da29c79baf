"""Every sample output of the README and docs/, marked `<!-- sample: COMMAND -->` before it, is run
again and compared with what the page shows, line by line: the same words, and every number within the
tolerance stated beside the sample. A page whose numbers drift from what its command prints fails."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
PAGES = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]


def marked_samples():
    """(page, command, the sample's lines) of every marked sample: a fenced block or a table after the marker."""
    out = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for m in re.finditer(r"<!-- sample: ([^\n]+?) -->\n(```\n(.*?)```|((?:\|[^\n]*\n)+))", text, flags=re.S):
            out.append((page, m.group(1), (m.group(3) or m.group(4)).strip("\n").splitlines()))
    return out


def train_tolerance(line, column):
    """README's `python train.py`: the aligned row and the fine-tuned capability to 1% (0.002 nats on a
    gap near 0, 0.01 on the fine-tuned capability gap); the fine-tuned safety loss, safety gap and
    distance of an unconstrained run to 30%, as the README says why."""
    if line.startswith("finetuned") and column in (0, 2, 4):
        return 0.30, 0.0
    return 0.01, 0.01 if line.startswith("finetuned") else 0.002


TOLERANCE = {"python train.py": train_tolerance}  # (relative, absolute) per (line, column); default below


def run(command, cwd):
    words = shlex.split(command)
    assert words[0] == "python", command
    words = [sys.executable] + [os.path.join(ROOT, w) if w.endswith(".py") and os.path.exists(os.path.join(ROOT, w))
                                else w for w in words[1:]]
    words = [os.path.join(ROOT, w) if os.path.exists(os.path.join(ROOT, w)) and "/" in w else w for w in words]
    proc = subprocess.run(words, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def compare(expected, printed, tolerance):
    """The sample's lines against the last lines printed: the same words, numbers within tolerance."""
    got = [line for line in printed if line.strip()][-len(expected):]
    assert len(got) == len(expected)
    problems = []
    for want, have in zip(expected, got):
        if re.sub(r"out/\S+:", "RUN:", NUMBER.sub("#", want)) != re.sub(r"out/\S+:", "RUN:", NUMBER.sub("#", have)):
            problems.append(f"text differs:\n  page:    {want}\n  printed: {have}")
            continue
        if re.search(r"\(\d+ s\)", want):  # a duration is the machine's, not the command's result
            want, have = re.sub(r"\(\d+ s\)", "", want), re.sub(r"\(\d+ s\)", "", have)
        numbers = [(float(a), float(b)) for a, b in zip(NUMBER.findall(re.sub(r"out/\S+:", "", want)),
                                                       NUMBER.findall(re.sub(r"out/\S+:", "", have)))]
        for column, (a, b) in enumerate(numbers):
            rel, ab = tolerance(want, column)
            if abs(a - b) > max(rel * abs(a), ab):
                problems.append(f"{a} on the page, {b} printed (tolerance {rel:.0%} or {ab}): {want}")
    assert problems == []


@pytest.mark.parametrize("page,command,expected", marked_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_sample_output_reproduces(page, command, expected, tmp_path):
    if "--safety" in command and not os.environ.get("SAFETY_DATA_DIR"):
        pytest.skip("needs the data folder (SAFETY_DATA_DIR)")
    tolerance = TOLERANCE.get(command, lambda line, column: (0.0, 0.02))  # 3-decimal tables: 0.02
    compare(expected, run(command, tmp_path), tolerance)


def test_the_pages_mark_their_samples():
    commands = [c for _, c, _ in marked_samples()]
    assert "python train.py" in commands and any("lab.forecast --synthetic" in c for c in commands)


def test_a_drifted_sample_fails():
    printed = ["aligned                1.5866          29.1766", "finetuned             25.4878           0.8607"]
    compare(["aligned                1.5866          29.1766", "finetuned             25.4878           0.8607"],
            printed, train_tolerance)
    with pytest.raises(AssertionError):  # the README's old first table, against what the code prints now
        compare(["aligned                1.5866          29.4421", "finetuned             25.5909           0.8656"],
                ["aligned                1.5866          31.9000", "finetuned             25.4878           0.8607"],
                train_tolerance)
    with pytest.raises(AssertionError):
        compare(["aligned safety 1.5866"], ["aligned danger 1.5866"], train_tolerance)
