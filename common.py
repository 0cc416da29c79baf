"""
Small pieces every part of the project shares: the error a user can fix in their data or
flags, atomic writes (a crash or a kill never leaves half a file behind), the clean-up of a
killed writer's temporaries, and file checksums.
"""

import hashlib
import json
import os
import time


class DataError(ValueError):
    """A problem with a data source or a data flag that the user can fix."""


class ConfigError(ValueError):
    """A bad flag value; the message names the flag and the fix."""


class SweepError(ValueError):
    """A bad grid value, an out_dir of another sweep or a failed task; the message names the fix."""


def atomic_write(path, write, mode="w"):
    """Call write(f) on a temporary file beside path, then rename it over path."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder, recursive=False, min_age=0.0):
    """Delete the temporaries (NAME.tmp.PID) a killed writer left in folder: the file they
    were for is still whole (the rename never happened), so nothing is lost. Called when a
    run or sweep starts in folder. With min_age > 0 (other shards may be writing there, on this
    machine or another), a temporary is left alone while its PID runs here or it is younger."""
    if not os.path.isdir(folder):
        return
    walk = os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]
    for root, _, files in walk:
        for name in files:
            stem, _, pid = name.rpartition(".tmp.")
            path = os.path.join(root, name)
            if not (stem and pid.isdigit()):
                continue
            if min_age > 0:
                try:
                    if time.time() - os.path.getmtime(path) < min_age or _alive(int(pid)):
                        continue
                except FileNotFoundError:  # renamed by its writer meanwhile
                    continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
