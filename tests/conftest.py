"""Shared test set-up: the project root on sys.path, offline tokenizer files and the real
data folder from ../shared when it is there, and one tiny aligned θ_0 per session."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)
# subprocesses (`python -m lab.sweep`, a user's command) import the project from any folder
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
if os.path.isdir(os.path.join(SHARED, "data")):
    os.environ.setdefault("SAFETY_DATA_DIR", os.path.join(SHARED, "data"))

def pytest_addoption(parser):
    parser.addoption("--commands", action="store_true",
                     help="also run every documented command at a tiny size (tests/test_commands_run.py, ~12 min)")


def pytest_configure(config):
    config.addinivalue_line("markers", "commands: runs a documented command (opt-in: --commands)")


def pytest_collection_modifyitems(config, items):
    """The documented commands run only when asked (--commands): the suite parses them instead."""
    if config.getoption("--commands"):
        return
    chosen = [item for item in items if not item.get_closest_marker("commands")]
    config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("commands")])
    items[:] = chosen


# a small but real alignment: enough for a safety gap well under 0.1 nats
TINY = ["--no-progress", "--align_iters", "300", "--eval_interval", "100", "--max_iters", "150"]


def run_train(*args, check=True, cwd=ROOT):
    """Run train.py in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_theta0(tmp_path_factory):
    """Path of a θ_0 aligned with the TINY recipe, shared by the end-to-end tests."""
    d = tmp_path_factory.mktemp("theta0")
    run_train("--out_dir", str(d), "--stage", "align", *TINY)
    return str(d / "theta0.pt")
