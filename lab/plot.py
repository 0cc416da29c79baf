"""
The training curves of one run folder, from its log.jsonl: the safety and capability losses (or, on
the synthetic world, the gaps G_s and G_f, log scale) at every evaluation, and ‖θ − θ_0‖ during the
fine-tune, the stages one after the other.

    python -m lab.plot --run_dir out/none-20261203-101500          # writes out/none-.../curves.png
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from common import DataError, HelpFormatter, Parser, first_paragraph  # noqa: E402


STYLE = {"pretrain": ":", "align": "--", "finetune": "-"}


def read_log(run_dir):
    """The log.jsonl records of a run folder, in order (a line cut by a kill is skipped)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: pass the --out_dir of a train.py run (it prints its run folder)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not records:
        raise DataError(f"{path} holds no evaluation yet: plot the run after its first evaluation")
    return records


def plot_run(run_dir, out=""):
    """Draw the curves into out (default run_dir/curves.png); returns the path."""
    records = read_log(run_dir)
    gaps = all(r.get("safety_gap") is not None for r in records if "safety_gap" in r) and \
        any("safety_gap" in r for r in records)
    keys = (("safety_gap", "G_s (safety gap)"), ("capability_gap", "G_f (capability gap)")) if gaps else \
        (("safety_loss", "ℓ_s (held-out safety loss)"), ("capability_loss", "ℓ_f (held-out task loss)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    offset, ticks = 0, []
    for stage in dict.fromkeys(r["stage"] for r in records):
        rs = [r for r in records if r["stage"] == stage]
        steps = [offset + r["step"] for r in rs]
        for (k, label), color in zip(keys, ("tab:red", "tab:blue")):
            if k in rs[0]:  # a gap ≥ 0 up to float error: drawn from 1e-4 up on the log scale
                ys = [max(r[k], 1e-4) if gaps else r[k] for r in rs]
                axes[0].plot(steps, ys, marker=".", color=color, ls=STYLE.get(stage, "-"), label=f"{label}, {stage}")
        if "general_loss" in rs[0]:
            axes[0].plot(steps, [r["general_loss"] for r in rs], marker=".", label=f"held-out general text, {stage}")
        if stage == "finetune":
            axes[1].plot(steps, [r["distance"] for r in rs], marker=".", color="k")
        ticks.append((offset, stage))
        offset = steps[-1]
    for x, stage in ticks[1:]:
        axes[0].axvline(x, color="grey", lw=0.5)
    if gaps:
        axes[0].set_yscale("log")
    axes[0].set(xlabel="step (stages one after the other)",
                ylabel="nats per sequence" + (" (log scale, from 1e-4)" if gaps else ""), title=run_dir)
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="‖θ − θ_0‖₂", title="distance from θ_0 (fine-tune)")
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def parser():
    ap = Parser(prog="python -m lab.plot", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--run_dir", required=True, help="the --out_dir of a train.py run (any stage)")
    ap.add_argument("--out", default="", help="the PNG to write ('': RUN_DIR/curves.png)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"curves: {path}")
    return path


if __name__ == "__main__":
    main()
