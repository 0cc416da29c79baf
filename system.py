"""
Where a run runs: the device and dtype, the process group under torchrun (DDP), and the run
folder with its log. train.py and lab/bench.py set up through here; nothing in it knows about
the theory or the data; run_info and print_table are what a run records and prints about itself.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from common import ConfigError, remove_stale_temporaries
from model import CheckpointError, load_checkpoint


@dataclass
class System:
    device: str
    device_type: str
    ptdtype: torch.dtype
    ddp: bool
    rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.ptdtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)


def all_reduce_mean(t, sys_):
    """The mean over ranks of a per-rank value, for logging (each rank holds its slice's)."""
    if sys_.ddp:
        t = t.clone()
        torch.distributed.all_reduce(t)  # SUM: gloo has no AVG
        t /= sys_.world_size
    return t


def setup_system(cfg):
    """Pick device and dtype; join the process group when launched by torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size, local_rank = 0, 1, 0
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible: use --device cpu")
        if ddp:
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device).index or 0)  # set_device refuses a bare "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: 2.5× on fp32 work
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    dtype = cfg.dtype
    if dtype == "auto":
        # fp32 on CPU: autocast to bf16 pays only where the CPU has bf16 matmul units, and adds casts
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return System(device, device_type, ptdtype, ddp, rank, world_size)


# -----------------------------------------------------------------------------
# Output folder


def prepare_out_dir(cfg):
    """Create out_dir and make sure it is writable, with a clear message otherwise."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        remove_stale_temporaries(cfg.out_dir)  # a killed run's half-written checkpoint
        probe = os.path.join(cfg.out_dir, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--out_dir {cfg.out_dir} is not writable ({e.strerror}): "
                          f"choose a folder you can write to") from None


class Log:
    """log.jsonl: one JSON object per evaluation, each appended whole and flushed. keep_steps
    (resuming: {stage: step of its checkpoint}) keeps the lines up to each stage's checkpoint
    and drops what was logged after it, which will be logged again; None starts a new log."""

    def __init__(self, path, enabled, keep_steps=None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = []
        if keep_steps is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= keep_steps.get(rec.get("stage"), -1):
                        lines.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(lines)

    def write(self, rec):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


def record_metrics(record):
    """The metrics of a log.jsonl record (train.evaluate_and_save's), as metrics.json holds them."""
    return {k: v for k, v in record.items() if k not in ("stage", "step", "train_loss")}


def print_table(metrics, title=""):
    """The run's table: θ_0 and the fine-tuned model, nats per sequence (real data: no gaps, n/a)."""
    keys = ["safety_loss", "capability_loss", "safety_gap", "capability_gap", "distance"]
    print((title + "; " if title else "") + "losses and gaps in nats per sequence, distance ‖θ − θ_0‖₂")
    print(f"{'':<12}" + "".join(f"{k:>17}" for k in keys))
    for row in ("aligned", "finetuned"):
        # gaps are None on real data (the entropies H_D are unknown)
        print(f"{row:<12}" + "".join(f"{'n/a' if metrics[row][k] is None else format(metrics[row][k], '.4f'):>17}"
                                     for k in keys))


def run_info(argv):
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {"argv": list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
            "git": git or None, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def new_run_folder(stem):
    """stem-YYYYmmdd-HHMMSS, a folder no other run has (a second run in the same second gets -2)."""
    path = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    n, unique = 1, path
    while os.path.exists(unique):
        n += 1
        unique = f"{path}-{n}"
    return unique


def resume_points(cfg, files, also=()):
    """Under --resume, {stage: its resume checkpoint} in cfg.out_dir (files: stage → file name), each
    checked against this run's config now, before anything is written; also: other files whose presence
    counts as something to resume (a θ_0 aligned before the fine-tune started). Nothing there: an error."""
    if not cfg.resume:
        return {}
    points = {stage: resume_checkpoint(os.path.join(cfg.out_dir, name), cfg, stage) for stage, name in files.items()}
    points = {stage: ckpt for stage, ckpt in points.items() if ckpt is not None}
    if not points and not any(os.path.exists(p) for p in also):
        raise ConfigError(f"--resume: {cfg.out_dir} holds nothing to resume (no {', '.join(files.values())}): "
                          f"drop --resume to start the run, or pass the --out_dir of the run to continue")
    return points


def resume_checkpoint(path, cfg, stage):
    """The resume checkpoint of this stage at path, if --resume and it was written by this run:
    the same config (a field added since it was written takes its default there)."""
    if not cfg.resume or not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != f"{stage}-resume":
        raise CheckpointError(f"{path} is not a {stage} checkpoint: remove it or drop --resume")
    saved = {**dataclasses.asdict(type(cfg)()), **ckpt["config"], "resume": cfg.resume, "progress": cfg.progress}
    if saved != dataclasses.asdict(cfg):
        diff = [k for k in saved if saved[k] != getattr(cfg, k, None)]
        raise CheckpointError(f"{path} was written with other settings ({', '.join(diff)}): "
                              f"resume with the same flags or start a new --out_dir")
    return ckpt
