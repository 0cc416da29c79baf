"""
Small pieces every part of the project shares: the error a user can fix in their data or
flags, atomic writes (a crash or a kill never leaves half a file behind), the clean-up of a
killed writer's temporaries, and file checksums.
"""

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
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


# -----------------------------------------------------------------------------
# A command line from a config dataclass. The class's source is the documentation: each field's
# trailing comment is its --help line, and a comment on a line of its own starts a group of flags
# (nanoGPT's config block, made a real CLI: `--radius 0.1` and `--radius=0.1`, --flag/--no-flag).


def field_docs(cls):
    """{field: (group, help)} from the comments of a dataclass's source."""
    docs, group = {}, None
    for line in inspect.getsource(cls).splitlines()[1:]:
        own = re.match(r"\s+#\s*(.+)$", line)
        field = re.match(r"\s+(\w+)\s*:[^=]+=.*?(?:#\s*(.+))?$", line)
        if own:
            group = own.group(1).strip()
        elif field:
            docs[field.group(1)] = (group, (field.group(2) or "").strip())
    return docs


def first_paragraph(doc):
    """The first paragraph of a docstring, on one line: a command's --help description."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown and the description's own line breaks kept."""


class Parser(argparse.ArgumentParser):
    """argparse whose error leads with the problem and the fix, not with the usage (which
    --help prints in full)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n(`{self.prog} --help` lists every flag)\n")


def parser_from(cls, description, types=None, choices=None, epilog=None, skip=(), preset=False, prog=None):
    """An argparse parser with one flag per field of `cls`, grouped as its source groups them;
    types: field → a parser of its value (for tuples); choices: field → its valid values. With
    preset, a flag not given is absent from the parsed namespace (a preset supplies it), and its
    help says the field's own default."""
    ap = Parser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    groups = {}
    for f, (group, text) in field_docs(cls).items():
        if f in skip:
            continue
        if group not in groups:
            groups[group] = ap.add_argument_group(group)
        value = default = getattr(cls, f)
        if preset:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            text, default = f"{text} (default: the preset's, else {shown!r})", argparse.SUPPRESS
        if isinstance(value, bool):
            groups[group].add_argument(f"--{f}", action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            groups[group].add_argument(f"--{f}", type=(types or {}).get(f) or type(value), default=default, help=text,
                                       choices=(choices or {}).get(f))
    return ap


def given_flags(ap, argv):
    """The fields whose flag is on the command line (parsed again over a blank namespace)."""
    blank = argparse.Namespace(**{a.dest: None for a in ap._actions if a.dest != "help"})
    return {k for k, v in vars(ap.parse_args(argv, blank)).items() if v is not None}


def read_config(path, cls):
    """The fields of dataclass `cls` in a JSON config file (--config), checked against the class."""
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror}): pass a JSON file of flag values")
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path} is not valid JSON (line {e.lineno}: {e.msg}): fix the file")
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict) or set(values) - fields:
        bad = sorted(set(values) - fields) if isinstance(values, dict) else ["(not a JSON object)"]
        raise ConfigError(f"--config {path}: {', '.join(bad)} are not flags of this command: use the names of --help")
    for f in dataclasses.fields(cls):  # each value of its field's type (an int is a float too, a bool is no int)
        if f.name in values:
            v, kind = values[f.name], type(f.default)
            ok = isinstance(v, bool) if kind is bool else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           if kind is float else type(v) is kind)
            if not ok:
                raise ConfigError(f"--config {path}: {f.name} is {v!r}, not a {kind.__name__}: write it as "
                                  f"{'true/false' if kind is bool else 'a number' if kind in (int, float) else 'a string'}")
            values[f.name] = float(v) if kind is float else v
    return values
