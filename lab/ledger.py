"""
results.csv, the memory of a sweep, and the shards that share one: a sweep's rows are read and
written whole (atomic rename); each finished run's row is merged in under a lock on the folder,
so that several processes (`sweep.py --shard i/n`, on one machine or on many over shared
storage) can fill one results.csv without losing a row. A shard runs a fixed share of the plan:
θ_pre and the estimates on shard 1, each seed's θ_0 on one shard, the fine-tunes dealt round
the shards in plan order; a task whose dependency belongs to another shard waits for it on disk.
"""

import csv
import fcntl
import io
import os
import re
from contextlib import contextmanager

from common import SweepError, atomic_write_text

FIRST_COLUMNS = ["run_id", "constraint", "overlap", "mismatch_delta", "lam", "radius", "seed", "safety_gap",
                 "capability_gap", "optimum_safety_gap", "optimum_capability_gap", "mismatch", "overlap_term",
                 "A1_safety_bound", "A2_safety_bound", "B1_capability_bound", "B2_capability_bound", "C_lhs",
                 "C_limit", "C_holds", "measured_safety_increase", "second_order_prediction"]


def read_rows(path):
    """The rows of results.csv with numbers as floats ('' → None, 'True' → True)."""
    if not os.path.exists(path):
        return []

    def parse(v):  # '' → None, 'True' or 'False' → a bool, a number → a float, anything else as it is
        try:
            return None if v == "" else (v == "True") if v in ("True", "False") else float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: (v if k == "run_id" else parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def write_rows(path, rows):
    """All rows, one per run, written whole to a temporary file and renamed."""
    keys = {k for r in rows for k in r}
    columns = [c for c in FIRST_COLUMNS if c in keys] + sorted(keys - set(FIRST_COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


@contextmanager
def locked(out_dir):
    """Hold the folder's lock (an flock on out_dir/.lock; POSIX, NFSv4 included) for a read-modify-write
    of results.csv or sweep.json, so that concurrent shards never lose each other's updates."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_row(csv_path, row, order):
    """Put one run's row into results.csv (replacing any older row of that run) under the lock, rows in
    plan order (`order`: run id → position; unplanned, stale rows last). Returns every row."""
    with locked(os.path.dirname(csv_path) or "."):
        rows = [r for r in read_rows(csv_path) if r["run_id"] != row["run_id"]] + [row]
        rows.sort(key=lambda r: order.get(r["run_id"], len(order)))
        write_rows(csv_path, rows)
    return rows


def parse_shard(text):
    """'i/n' → (i, n) with 1 ≤ i ≤ n; '' → (1, 1), the whole plan."""
    if not text:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SweepError(f"--shard {text!r}: give i/n with 1 ≤ i ≤ n (e.g. --shard 1/4 ... --shard 4/4)")
    return int(m.group(1)), int(m.group(2))


def shard_ids(tasks, shard):
    """The ids of the plan's tasks that belong to shard (i, n)."""
    i, n = shard
    seeds = sorted({t["id"].rsplit("-s", 1)[-1] for t in tasks.values() if t["kind"] == "align"})
    mine, k, groups = set(), 0, {}
    for t in tasks.values():
        if t["kind"] in ("pretrain", "estimate"):
            owner = 1
        elif t["kind"] == "align":
            owner = seeds.index(t["id"].rsplit("-s", 1)[-1]) % n + 1
        elif t.get("group") in groups:  # a batched group (sweep.py --batch_runs) has one owner
            owner = groups[t["group"]]
        else:
            owner, k = k % n + 1, k + 1
            if t.get("group"):
                groups[t["group"]] = owner
        if owner == i:
            mine.add(t["id"])
    return mine
