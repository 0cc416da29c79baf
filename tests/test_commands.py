"""Every command the README, docs/, the results' READMEs and scripts/gpu_check.sh show a user names an
entry point that exists and flags it accepts; every entry point starts from the command line; every
flag of every command says what it is. (What each command computes is tested beside its code: these
tests catch a command left behind when a file moves or a flag is renamed.)"""
import ast
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

# entry point → the module whose parser() reads its flags (train.py: parse_args, which adds --config)
ENTRY = {"train.py": "train", "evaluate.py": "evaluate", "theory.py": "theory"}
MODULES = ("train", "evaluate", "theory", "lab.sweep", "lab.forecast", "lab.landscape", "lab.bench", "lab.refusals",
           "lab.sample", "lab.plot",
           "lab.export", "realtext.fetch")
DOCS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)), *sorted(glob.glob("results/*/README.md",
                                                                                     root_dir=ROOT))]


def shell_lines(text):
    """The lines of a shell text with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def documented_commands():
    """(where, the command's words) of every `python ...` command shown to a user."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
        inline = re.findall(r"`((?:python|torchrun) [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        found += [(doc, line) for block in blocks for line in shell_lines(block)] + [(doc, c) for c in inline]
    script = open(os.path.join(ROOT, "scripts", "gpu_check.sh"), encoding="utf-8").read()
    found += [("scripts/gpu_check.sh", line) for line in shell_lines(script) if not line.lstrip().startswith("#")]
    out = []
    for where, text in found:
        text = re.sub(r'"\$\{\w+\[@\]\}"', "", text)  # "${ARGS[@]}": flags that vary
        text = re.sub(r"\$\{?(\w+)\}?", "X", text)  # $OUT, ${DATA}: a value
        for line in re.split(r"\s(?:&&|\|\||;|&|\|)\s|\s&$", text):  # one command at a time
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            words = words[:next((i for i, w in enumerate(words) if w.startswith((">", "2>"))), len(words))]
            while words and (re.fullmatch(r"\w+=.*", words[0]) or words[0] == "timeout" or words[0].isdigit()):
                words = words[1:]  # VAR=value, timeout N
            if words[:1] == ["torchrun"]:  # torchrun's own flags, then the script and its flags
                words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
            words = [w for w in words if w != "..."]  # "and more flags"
            if words[:1] in (["python"], ["python3"]) and words[1:3] not in (["-m", "pytest"], ["-m", "venv"]):
                out.append((where, words[1:]))
    return out


def parse(words):
    """Parse a command's words with its entry point's own parser (SystemExit on a bad flag)."""
    if words[0] == "-c":  # a one-liner: its imports must resolve
        for node in ast.walk(ast.parse(words[1])):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), "<doc>", "exec"), {})
        return
    module, args = (words[1], words[2:]) if words[0] == "-m" else (ENTRY[words[0]], words[1:])
    args = ["smoke" if a in ("NAME", "X") and i and args[i - 1] == "--preset" else a for i, a in enumerate(args)]
    mod = importlib.import_module(module)
    if module == "train":
        mod.parse_args(args)
    elif module == "lab.bench":
        mod.parse_args(args)
    else:
        mod.parser().parse_args(args)


def test_the_docs_show_commands_of_every_kind():
    commands = documented_commands()
    entries = {w[0] if w[0] != "-m" else w[1] for _, w in commands}
    gpu = [w for where, w in commands if where == "scripts/gpu_check.sh" and w[0] == "train.py"]
    assert gpu and "--constraint" in gpu[0] and not any(">" in w for w in gpu[0])  # flags parsed one by one
    assert {"train.py", "evaluate.py", "theory.py", "lab.sweep", "lab.forecast", "lab.bench", "realtext.fetch"} <= entries


@pytest.mark.parametrize("where,words", documented_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_documented_command_names_a_real_entry_point_and_flags_it_takes(where, words, capsys):
    assert words[0] in ENTRY or words[0] in ("-m", "-c"), f"{where}: `python {' '.join(words)}`: no such entry point"
    if "stepclip" in words:
        pytest.skip("docs/extending.md's example strategy, which exists once a reader adds it")
    try:
        parse(words)
    except SystemExit as e:
        if e.code == 0:  # --help
            return
        pytest.fail(f"{where}: `python {' '.join(words)}` is refused: {capsys.readouterr().err.strip()} ({e.code})")


@pytest.mark.parametrize("module", MODULES)
def test_every_flag_of_every_command_says_what_it_is(module):
    mod = importlib.import_module(module)
    ap = mod.parser()
    if module == "train":
        ap.add_argument("--config", help="(parse_args adds it)")
    silent = [a.option_strings[0] for a in ap._actions if a.dest != "help" and not (a.help or "").strip()]
    assert silent == []
    assert ap.description and ap.description.strip()[-1] in ".)", "the description ends its sentence"


@pytest.mark.parametrize("command", [["train.py"], ["-m", "lab.sweep"], ["-m", "realtext.fetch"]])  # one of each kind
def test_every_entry_point_starts_from_the_command_line(command):
    proc = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--help" in proc.stdout, proc.stderr
