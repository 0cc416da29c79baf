"""Run train.py's CLI with a recorder attached, for tests/test_ddp.py.

    python tests/ddp_helper.py DUMP_DIR [train.py flags]                            # 1 rank
    torchrun --standalone --nproc_per_node=2 tests/ddp_helper.py DUMP_DIR [flags]   # 2 ranks

The training code runs unchanged; on every rank this records
  - the gradients the optimizer sees at the first step of each stage (after the DDP all-reduce),
  - a hash of the parameters before every optimizer step (after the previous projection),
  - the parameters at the last evaluate() call (the fine-tuned model, after every projection),
  - every path this rank tried to write (open for writing, torch.save, os.replace, ...),
    whoever asked: the test decides which of them are the project's (its run folder),
and saves them to DUMP_DIR/rank{R}.pt when the run ends.
"""
import builtins
import hashlib
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

dump_dir, argv = sys.argv[1], sys.argv[2:]
rank = int(os.environ.get("RANK", 0))
rec = {"grads": [], "param_hashes": [], "final": None, "writes": []}


def flat(ts):
    return torch.cat([t.detach().reshape(-1) for t in ts]).clone()


# gradients and parameters, seen from the optimizer
seen = set()


def before_optimizer_step(opt, args, kwargs):
    params = [p for g in opt.param_groups for p in g["params"]]
    rec["param_hashes"].append(hashlib.sha256(flat(params).numpy().tobytes()).hexdigest())
    if id(opt) not in seen:  # the first step of a stage: a new optimizer
        seen.add(id(opt))
        rec["grads"].append(flat([p.grad for p in params]))


register_optimizer_step_pre_hook(before_optimizer_step)

# the final weights: finetune() evaluates the raw model on every rank at the end
real_evaluate = train.evaluate


def evaluate_spy(model, *args, **kwargs):
    rec["final"] = flat(model.parameters())
    return real_evaluate(model, *args, **kwargs)


train.evaluate = evaluate_spy

# every write this rank attempts
real = {"open": builtins.open, "save": torch.save, "replace": os.replace, "makedirs": os.makedirs,
        "remove": os.remove}


def record(what, path):
    if isinstance(path, (str, bytes, os.PathLike)):  # not a file object or descriptor
        rec["writes"].append((what, os.path.abspath(os.fsdecode(path))))


def spy_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        record("open", file)
    return real["open"](file, mode, *args, **kwargs)


def spy_save(obj, f, *args, **kwargs):
    record("torch.save", f)
    return real["save"](obj, f, *args, **kwargs)


def spy(name):
    def f(path, *args, **kwargs):
        record(name, path)
        return real[name](path, *args, **kwargs)
    return f


builtins.open, torch.save = spy_open, spy_save
os.replace, os.makedirs, os.remove = spy("replace"), spy("makedirs"), spy("remove")
try:
    train.cli(argv)
finally:
    builtins.open, torch.save = real["open"], real["save"]
    os.replace, os.makedirs, os.remove = real["replace"], real["makedirs"], real["remove"]
    os.makedirs(dump_dir, exist_ok=True)
    torch.save(rec, os.path.join(dump_dir, f"rank{rank}.pt"))
