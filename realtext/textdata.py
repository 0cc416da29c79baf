"""
Real text as training data (THEORY.md §1): deterministic splits by prompt, so that no prompt
is shared between the alignment, proxy and evaluation parts; one prompt template and GPT-2's
BPE; token arrays cached on disk; the compact vocabulary of a run; and RealData, a source of
D_s, D_s', D_f with the same interface as the synthetic world (batch, seq_len, block_size,
vocab_size). There the densities are unknown: losses are measured on held-out examples and
the gaps are not available.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common import DataError, atomic_write, file_sha256
from realtext.loaders import LOADERS, REGISTRY, TRAIN_ROLES, nonempty, resolve, resolve_data_dir

# -----------------------------------------------------------------------------
# Splits. A prompt's part is decided by a hash of its normalized text alone, so the
# split is deterministic, independent of file order, and duplicates of a prompt always
# land in the same part: no prompt is shared between alignment, proxy and evaluation.

# parts of D_s's file: alignment, validation (where alignment stops: realtext/validation.py), the
# same-teacher proxy, and the held-out evaluation of ℓ_s; proxy and eval kept their place when the
# validation part was cut from the alignment part's top
SAFETY_SPLIT = (("align", 0.50), ("val", 0.10), ("proxy", 0.25), ("eval", 0.15))
HELDOUT = 0.15  # share of any other file held out for evaluation (the same hash, its top 15%)
VALIDATION = 0.10  # and of a D_s that is not a split's part, the validation share just below it
SPLIT_VERSION = 2  # part of every real θ_0's identity (train.align_key): version 1 had no validation part


def prompt_key(prompt):
    """64-bit identity of a prompt: case and whitespace do not make a new prompt."""
    norm = " ".join(prompt.lower().split())
    return int.from_bytes(hashlib.sha256(norm.encode()).digest()[:8], "little")


def key_fraction(keys):
    """Each key as a uniform number in [0, 1)."""
    return np.asarray(keys, dtype=np.uint64).astype(np.float64) / 2.0 ** 64


def split_part(keys, part, split=SAFETY_SPLIT):
    """Boolean mask of the examples in `part` of a split (fractions summing to one)."""
    u, lo = key_fraction(keys), 0.0
    for name, frac in split:
        if name == part:
            return (u >= lo) & (u < lo + frac)
        lo += frac
    raise DataError(f"unknown split part {part!r}: choose one of {', '.join(n for n, _ in split)}")


# -----------------------------------------------------------------------------
# Tokens. tiktoken's GPT-2 BPE; one prompt template for every dataset:
#
#     ### Instruction:\n{prompt}\n\n### Response:\n{response}<|endoftext|>
#
# with {prompt} the instruction and its input joined by a blank line. The three pieces of
# the prompt are tokenized separately, so that cutting a long prompt never cuts the
# response marker, and the loss is taken on the response and its end-of-text token.

TEMPLATE_HEAD, TEMPLATE_TAIL = "### Instruction:\n", "\n\n### Response:\n"
N_GPT2 = 50257          # GPT-2's vocabulary
EOT = 50256             # <|endoftext|>: ends every response, pads batches (never scored)
_ENCODING = None


def gpt2_encoding():
    """tiktoken's gpt2 encoding; offline it needs TIKTOKEN_CACHE_DIR (README 'Real data')."""
    global _ENCODING
    if _ENCODING is None:
        import tiktoken
        try:
            _ENCODING = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache: name the fix
            raise DataError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {str(e)[:120]}): "
                            f"set TIKTOKEN_CACHE_DIR to a folder with its files (`python -m realtext.fetch` puts them "
                            f"in DATA_DIR/tiktoken_cache)") from None
    return _ENCODING


def template_ids(prompts):
    """GPT-2 ids of the templated prompts, each head + prompt + tail."""
    enc = gpt2_encoding()
    head, tail = enc.encode_ordinary(TEMPLATE_HEAD), enc.encode_ordinary(TEMPLATE_TAIL)
    return [head + ids + tail for ids in enc.encode_ordinary_batch(list(prompts))]


def cap_prompt(ids, max_len):
    """A prompt of at most max_len tokens that still ends with the response marker."""
    if len(ids) <= max_len:
        return ids
    n_tail = len(gpt2_encoding().encode_ordinary(TEMPLATE_TAIL))
    return np.concatenate([ids[:max_len - n_tail], ids[len(ids) - n_tail:]])


class TokenSet:
    """A tokenized dataset as flat arrays: templated prompt ids, response ids (each with
    its end-of-text; empty in prompt-only sets), prompt keys and the prompt texts."""

    FIELDS = ("p_tok", "p_off", "r_tok", "r_off", "keys", "text", "t_off")

    def __init__(self, p_tok, p_off, r_tok, r_off, keys, text, t_off):
        self.p_tok, self.p_off, self.r_tok, self.r_off = p_tok, p_off, r_tok, r_off
        self.keys, self.text, self.t_off = keys, text, t_off

    @classmethod
    def from_examples(cls, examples):
        enc = gpt2_encoding()
        prompts = [ids for ids in template_ids(e.prompt for e in examples)]
        resp = [enc.encode_ordinary(e.response) + [EOT] if e.response is not None else []
                for e in examples]
        texts = [e.prompt.encode() for e in examples]

        def flat(seqs, dtype):
            off = np.zeros(len(seqs) + 1, dtype=np.int64)
            off[1:] = np.cumsum([len(s) for s in seqs])
            return np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(off[-1])), off
        p_tok, p_off = flat(prompts, np.int32)
        r_tok, r_off = flat(resp, np.int32)
        text, t_off = flat(texts, np.uint8)
        keys = np.array([prompt_key(e.prompt) for e in examples], dtype=np.uint64)
        return cls(p_tok, p_off, r_tok, r_off, keys, text, t_off)

    def __len__(self):
        return len(self.keys)

    def prompt_ids(self, i):
        return self.p_tok[self.p_off[i]:self.p_off[i + 1]]

    def response_ids(self, i):
        return self.r_tok[self.r_off[i]:self.r_off[i + 1]]

    def prompt(self, i):
        return bytes(self.text[self.t_off[i]:self.t_off[i + 1]]).decode()

    @property
    def prompts(self):
        return [self.prompt(i) for i in range(len(self))]

    @property
    def has_responses(self):
        return bool((np.diff(self.r_off) > 0).all())

    def subset(self, idx):
        """The examples at the indices idx, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        def take(tok, off):
            parts = [tok[off[i]:off[i + 1]] for i in idx]
            new_off = np.zeros(len(idx) + 1, dtype=np.int64)
            new_off[1:] = np.cumsum([len(p) for p in parts])
            return (np.concatenate(parts) if parts else tok[:0]), new_off
        p = take(self.p_tok, self.p_off)
        r = take(self.r_tok, self.r_off)
        t = take(self.text, self.t_off)
        return TokenSet(p[0], p[1], r[0], r[1], self.keys[idx], t[0], t[1])

    @classmethod
    def concat(cls, sets):
        """One TokenSet of the examples of several, in order."""
        arrays = {}
        for tok, off in (("p_tok", "p_off"), ("r_tok", "r_off"), ("text", "t_off")):
            arrays[tok] = np.concatenate([getattr(ts, tok) for ts in sets])
            ends = np.cumsum([0] + [getattr(ts, off)[-1] for ts in sets[:-1]])
            arrays[off] = np.concatenate([[0]] + [getattr(ts, off)[1:] + e for ts, e in zip(sets, ends)])
        arrays["keys"] = np.concatenate([ts.keys for ts in sets])
        return cls(**arrays)

    def where(self, mask):
        return self.subset(np.flatnonzero(mask))

    def cut(self, block_size):
        """The examples as a model of `block_size` positions sees them (fit_block, in GPT-2 ids):
        the prompt capped at half the block, the response cut to what is left: the scored span."""
        def flat(seqs):
            off = np.zeros(len(seqs) + 1, dtype=np.int64)
            off[1:] = np.cumsum([len(q) for q in seqs])
            return (np.concatenate(seqs) if seqs else self.p_tok[:0]).astype(np.int32), off
        p = [cap_prompt(self.prompt_ids(i), block_size // 2) for i in range(len(self))]
        r = [self.response_ids(i)[:block_size + 1 - len(q)] for i, q in enumerate(p)]
        return TokenSet(*flat(p), *flat(r), self.keys, self.text, self.t_off)

    def arrays(self):
        return {f: getattr(self, f) for f in self.FIELDS}


# -----------------------------------------------------------------------------
# The token cache: one .npz per (source files, loader, template, tokenizer), written to
# a temporary name and renamed, with a checksum of its arrays. A file that fails to load
# or to check is rebuilt with a warning, never used.

CACHE_VERSION = 1


def default_cache_dir():
    return os.environ.get("SAFETY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "safety-tradeoff-tokens")


def arrays_checksum(arrays):
    h = hashlib.sha256()
    for name in TokenSet.FIELDS:
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class CacheError(Exception):
    """A cache file that cannot be trusted (truncated, edited, another version)."""


def read_cache(path, key):
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in TokenSet.FIELDS}
            stored_key, stored_sum = str(z["key"]), str(z["checksum"])
    except Exception as e:  # a truncated zip, a missing array, not an npz at all
        raise CacheError(f"unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    if stored_key != key:
        raise CacheError("written for other source files or settings")
    if stored_sum != arrays_checksum(arrays):
        raise CacheError("checksum mismatch")
    for tok, off in (("p_tok", "p_off"), ("r_tok", "r_off"), ("text", "t_off")):
        o = arrays[off]
        if len(o) != len(arrays["keys"]) + 1 or o[0] != 0 or o[-1] != len(arrays[tok]) or (np.diff(o) < 0).any():
            raise CacheError(f"inconsistent offsets {off}")
    return TokenSet(**arrays)


def write_cache(path, key, ts):
    arrays = ts.arrays()
    atomic_write(path, lambda f: np.savez(f, key=np.array(key), checksum=np.array(arrays_checksum(arrays)),
                                          **arrays), mode="wb")


def tokenized(name, data_dir="", cache_dir=""):
    """The TokenSet of a registry name or file, from the cache when it is valid."""
    label, spec, path = resolve(name, data_dir)
    sources = [path]
    if spec.loader == "xstest_completions":
        sources.append(os.path.join(os.path.dirname(os.path.dirname(path)), "xstest_prompts.csv"))
    for s in sources:
        if not os.path.isfile(s):
            raise DataError(f"{s}: file not found: check the data folder (--data_dir) or the path")
    key = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "loader": spec.loader, "kw": repr(spec.kw), "tokenizer": "gpt2",
        "template": [TEMPLATE_HEAD, TEMPLATE_TAIL], "files": [file_sha256(s) for s in sources]},
        sort_keys=True).encode()).hexdigest()
    cache_dir = cache_dir or default_cache_dir()
    cpath = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}-{key[:16]}.npz")
    if os.path.exists(cpath):
        try:
            return read_cache(cpath, key)
        except CacheError as e:
            print(f"token cache {cpath} is corrupt ({e}): rebuilding it", file=sys.stderr)
    ts = TokenSet.from_examples(LOADERS[spec.loader](path, **dict(spec.kw)))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_cache(cpath, key, ts)
    except OSError as e:  # a read-only cache folder slows later runs down, nothing more
        print(f"cannot write the token cache {cpath} ({e.strerror}); continuing without it", file=sys.stderr)
    return ts


def dataset_part(name, data_dir="", cache_dir=""):
    """The TokenSet of a name, restricted to its part of the safety split if it has one;
    'a+b' is the union of the parts of a and b (a mixture, e.g. refusals + helpful answers)."""
    if "+" in name:
        return TokenSet.concat([dataset_part(n, data_dir, cache_dir) for n in name.split("+")])
    ts = tokenized(name, data_dir, cache_dir)
    spec = REGISTRY.get(name)
    if spec is not None and spec.part:
        ts = ts.where(split_part(ts.keys, spec.part))
    return ts


# -----------------------------------------------------------------------------
# The model's vocabulary. GPT-2 has 50,257 tokens but the data of a run uses about half of
# them; on CPU the output layer dominates a small model's cost, so `restrict_vocab`
# keeps only the tokens of the data folder's training sets (every registry set with a
# training role, plus the run's own files; 30,833 tokens for the data folder of
# data_manifest.json) in a compact id map. It is fixed by the folder, not by the run,
# so one θ_0 serves fine-tunes on every task and proxy, and it is stored in the checkpoint. Generation maps compact ids back to GPT-2 ids exactly;
# a token outside the vocabulary (in a prompt never seen in training) becomes UNK.
# `vocab_cap` K keeps only the K most frequent tokens (4096 cover 92% of the tokens of
# the training sets, and every refusal keyword but three rare ones): the output
# layer shrinks ~7× more, but every rarer token is one UNK class, so losses are lower
# than under the full vocabulary and compare only between runs with the same vocabulary.


UNK_TEXT = "⟨unk⟩"  # how a generated UNK reads: visible, so that a response of UNKs is never an empty string


class Codec:
    """Text ↔ model token ids: GPT-2's BPE, the prompt template and, with a vocabulary
    (sorted GPT-2 ids), the compact id map with one extra id, UNK, at the end."""

    def __init__(self, vocab=None):
        self.vocab = None if vocab is None or len(vocab) == 0 else np.asarray(vocab, dtype=np.int64)
        if self.vocab is None:
            self.vocab_size, self.unk = N_GPT2, None
        else:
            assert (np.diff(self.vocab) > 0).all() and self.vocab[-1] < N_GPT2, "vocab: sorted GPT-2 ids"
            self.unk = len(self.vocab)
            self.vocab_size = len(self.vocab) + 1
            self.to_model = np.full(N_GPT2, self.unk, dtype=np.int64)
            self.to_model[self.vocab] = np.arange(len(self.vocab))
        self.eot = int(self.encode_ids([EOT])[0])

    def encode_ids(self, gpt2_ids):
        """GPT-2 ids → model ids (UNK for a token outside the vocabulary)."""
        ids = np.asarray(gpt2_ids, dtype=np.int64)
        return ids if self.vocab is None else self.to_model[ids]

    def decode_ids(self, model_ids):
        """Model ids → GPT-2 ids, exactly; UNK has no GPT-2 id and is dropped."""
        ids = np.asarray(model_ids, dtype=np.int64)
        if self.vocab is None:
            return ids
        return self.vocab[ids[ids != self.unk]]

    def prompt(self, text, max_len=None):
        """Model ids of one templated prompt, cut to max_len keeping the response marker."""
        ids = self.encode_ids(template_ids([text])[0])
        return cap_prompt(ids, max_len) if max_len else ids

    def until_eot(self, model_ids):
        """Generated model ids up to the first end-of-text."""
        ids = np.asarray(model_ids, dtype=np.int64)
        stop = np.flatnonzero(ids == self.eot)
        return ids[:stop[0]] if len(stop) else ids

    def text(self, model_ids):
        """The text of generated model ids, up to the first end-of-text; a token outside the
        vocabulary (UNK, which has no text) shows as UNK_TEXT, never as nothing."""
        ids, enc = self.until_eot(model_ids), gpt2_encoding()
        if self.unk is None:
            return enc.decode(list(ids))
        pieces = np.split(ids, np.flatnonzero(ids == self.unk))  # each piece after the first starts with UNK
        return "".join((UNK_TEXT if k and len(piece) else "") + enc.decode(list(self.decode_ids(piece)))
                       for k, piece in enumerate(pieces))

    def unk_share(self, model_ids):
        """Share of UNK among generated model ids up to the first end-of-text (0 for none generated)."""
        ids = self.until_eot(model_ids)
        return float((ids == self.unk).mean()) if len(ids) and self.unk is not None else 0.0

    def coverage(self, gpt2_ids):
        """Share of GPT-2 tokens that the vocabulary holds (the rest become UNK)."""
        ids = np.asarray(gpt2_ids, dtype=np.int64)
        return 1.0 if self.vocab is None or not len(ids) else float((self.encode_ids(ids) != self.unk).mean())


def build_vocab(names, data_dir="", cache_dir="", cap=0):
    """Sorted GPT-2 ids used by the training sets of the registry present in the data
    folder and by the named datasets, plus end-of-text; with cap > 0, only the cap most
    frequent of them (the rest become UNK: a further ~7× on CPU, see RealDataConfig)."""
    try:
        d = resolve_data_dir(data_dir)
        names = list(names) + [n for n, spec in REGISTRY.items() if spec.role in TRAIN_ROLES and spec.in_vocab]
    except DataError:  # no data folder: a run on the user's own files alone
        d = ""
    # a part of a file that the registry also holds whole adds nothing (arm P's alpaca_small_task is
    # counted once, as alpaca_small); a file held only as parts (safety_llamas) counts once per part,
    # as it always has, so that the vocabulary of every θ_0 saved before stays what it was
    whole = {spec.path for spec in REGISTRY.values() if spec.role in TRAIN_ROLES and not spec.part}
    seen, counts = set(), np.zeros(N_GPT2, dtype=np.int64)
    for n in [part for name in names for part in name.split("+")]:
        if n in seen or (n in REGISTRY and not os.path.isfile(os.path.join(d, REGISTRY[n].path))):
            continue  # a registry set missing from a partial folder adds no tokens
        if n in REGISTRY and REGISTRY[n].part and REGISTRY[n].path in whole:
            continue
        seen.add(n)
        ts = tokenized(n, data_dir, cache_dir)
        counts += np.bincount(ts.p_tok, minlength=N_GPT2) + np.bincount(ts.r_tok, minlength=N_GPT2)
    counts[EOT] = counts.max() + 1  # always kept: it ends every response
    used = np.flatnonzero(counts)
    if cap and cap < len(used):
        used = np.sort(np.argsort(-counts, kind="stable")[:cap])  # ties: the lower id
    return used


# -----------------------------------------------------------------------------
# The real-data source: D_s, D_s', D_f as token sets, each with its held-out part.


@dataclass
class RealDataConfig:
    safety: str = "safety_llamas"          # D_s: a registry name or a file of (prompt, response); 'a+b' mixes
    proxy: str = "safety_llamas_proxy"     # D_s': proxy safety data used by Case I
    task: str = "alpaca_small"             # D_f: the fine-tuning task
    helpful: str = ""                      # helpful (prompt, response) data mixed into D_s's training part
    data_dir: str = ""                     # the data folder; default $SAFETY_DATA_DIR
    block_size: int = 128                  # most tokens per example (prompt + response); longer ones are cut
    restrict_vocab: bool = True            # the compact vocabulary of the folder's training sets
    vocab_cap: int = 0                     # keep only this many most frequent tokens (0: all); others → UNK
    eval_examples: int = 256               # held-out examples per evaluated set (first by prompt hash)
    vocab: tuple = ()                      # the compact vocabulary (GPT-2 ids), set once built


class RealData:
    """Real text with the interface of SyntheticWorld: batch(name, n, generator) for
    name in safety/proxy/task, seq_len, block_size, vocab_size; `eval_batches` for the
    held-out losses of evaluate.py. Parts, disjoint in prompts (but see rc.helpful):

        safety  D_s's training part    safety eval   held-out D_s (safety_loss)
                (+ rc.helpful's, if any)
        proxy   D_s'                   task eval     held-out D_f (capability_loss)
        task    D_f's training part    validation    D_s's validation part (alignment's stop)

    rc.vocab fixes the compact vocabulary (a θ_0's); empty, restrict_vocab builds it.
    rc.helpful mixes helpful answers into the alignment batches only: a θ_0 trained on
    refusals alone refuses everything, harmless prompts too, because it never saw an answer;
    the held-out ℓ_s stays on D_s alone. The helpful part loses the evaluation parts'
    prompts but not D_f's training prompts: θ_0 serves fine-tunes on several tasks, so it
    cannot depend on one (alpaca_gpt4_demo shares 42 prompts with alpaca_small's 2,000 and
    30 with alpaca_safety_only, none with code_alpaca)."""

    name = "real"

    def __init__(self, rc: RealDataConfig, cache_dir=""):
        if rc.block_size < 16:
            raise DataError(f"--block_size {rc.block_size} is too small for a prompt and a response: use ≥ 16")
        vocab = None
        if rc.restrict_vocab:
            vocab = rc.vocab or build_vocab([rc.safety, rc.proxy, rc.task] + ([rc.helpful] if rc.helpful else []),
                                            rc.data_dir, cache_dir, rc.vocab_cap)
        self.codec = Codec(vocab)
        self.wc = dataclasses.replace(rc, vocab=tuple(int(v) for v in vocab) if vocab is not None else ())
        self.block_size = self.seq_len = rc.block_size
        self.vocab_size = self.codec.vocab_size

        s_train, s_eval = train_and_heldout(rc.safety, rc.data_dir, cache_dir)
        s_val = validation_part(rc.safety, rc.data_dir, cache_dir)
        if rc.helpful:  # its own held-out part is dropped: ℓ_s is measured on D_s alone
            h_train = train_and_heldout(rc.helpful, rc.data_dir, cache_dir)[0]
            if not h_train.has_responses:
                raise DataError(f"--align_helpful {rc.helpful}: has prompts without responses: alignment "
                                f"needs (prompt, response) pairs")
            s_train = TokenSet.concat([s_train, h_train])
        f_train, f_eval = train_and_heldout(rc.task, rc.data_dir, cache_dir)
        proxy = dataset_part(rc.proxy, rc.data_dir, cache_dir)
        # no prompt in two parts: training parts lose what the evaluation parts hold, the
        # proxy what D_s's training part holds (a proxy equal to D_s would not be a proxy)
        held = np.concatenate([s_eval.keys, s_val.keys, f_eval.keys])
        parts = {"safety": (rc.safety, s_train, held),
                 "proxy": (rc.proxy, proxy, np.concatenate([held, s_train.keys])),
                 "task": (rc.task, f_train, held)}
        train = {part: nonempty(name, ts.where(~np.isin(ts.keys, exclude)), f"{part} examples")
                 for part, (name, ts, exclude) in parts.items()}
        # evaluation: the first eval_examples by prompt hash, a fixed random sample
        held = {part: nonempty(name, ts.subset(np.argsort(ts.keys, kind="stable")[:rc.eval_examples]),
                               "held-out examples")
                for part, name, ts in (("safety", rc.safety, s_eval), ("task", rc.task, f_eval))}
        self.sets = {part: self._prepare(parts[part][0], ts) for part, ts in train.items()}
        self.eval_sets = {part: self._prepare(name, held[part]) for part, name in (("safety", rc.safety),
                                                                                  ("task", rc.task))}
        if len(s_val):  # only early-stopped alignment needs it (realtext/validation.py says so when empty)
            self.eval_sets["validation"] = self._prepare(rc.safety, s_val.subset(
                np.argsort(s_val.keys, kind="stable")[:rc.eval_examples]))
        self.eval_prompts = {part: ts.prompts for part, ts in held.items()}
        # the proxy's own losses, for Case I's fit of D_s' (evaluate.proxy_metrics): on examples it
        # trains on, and on its file's held-out part where it is a part of a split (else none)
        first = lambda ts: ts.subset(np.argsort(ts.keys, kind="stable")[:rc.eval_examples])
        self.eval_sets["proxy_train"] = self._prepare(rc.proxy, first(train["proxy"]))
        spec = REGISTRY.get(rc.proxy)
        if spec is not None and spec.part:
            self.eval_sets["proxy_heldout"] = self._prepare(rc.proxy, first(train_and_heldout(rc.proxy, rc.data_dir,
                                                                                               cache_dir)[1]))
        # prompt identities of every part, to check that no prompt is in two of them
        self.keys = {**{part: ts.keys for part, ts in train.items()},
                     **{f"{part}_eval": ts.keys for part, ts in held.items()}, "validation": s_val.keys}

    def _prepare(self, name, ts):
        """Per example: model ids of prompt + response cut to block_size + 1 tokens (the
        prompt to at most half of them), and the prompt length."""
        if not ts.has_responses:
            raise DataError(f"{name}: has prompts without responses: training and held-out losses "
                            f"need (prompt, response) pairs")
        return fit_block(ts, self.codec, self.block_size)[:2]

    def collate(self, part, idx):
        """(inputs, targets, loss_mask) of the examples idx of a prepared part (collate)."""
        seqs, plens = part
        return collate([seqs[i] for i in idx], [plens[i] for i in idx], self.codec.eot)

    def batch(self, name, n, generator):
        """n examples of D_s ('safety'), D_s' ('proxy') or D_f ('task'), drawn uniformly
        with replacement, as (inputs, targets, loss_mask)."""
        part = self.sets[name]
        idx = torch.randint(len(part[0]), (n,), generator=generator).tolist()
        return self.collate(part, idx)

    def eval_batches(self, name, batch_size=16):
        """The held-out examples of 'safety' or 'task', in a fixed order, in batches (small:
        the logits of a batch are batch × T × vocabulary floats)."""
        part = self.eval_sets[name]
        for i in range(0, len(part[0]), batch_size):
            yield self.collate(part, list(range(i, min(i + batch_size, len(part[0])))))


def fit_block(ts, codec, block_size):
    """(seqs, plens, response lengths): each example's model ids of prompt + response cut to
    block_size + 1 tokens (the prompt to at most half of them), its prompt length, and its whole
    response's length (end-of-text included), before the cut."""
    seqs, plens, rlens = [], [], []
    for i in range(len(ts)):
        p = cap_prompt(codec.encode_ids(ts.prompt_ids(i)), block_size // 2)
        r = codec.encode_ids(ts.response_ids(i))
        seqs.append(np.concatenate([p, r[:block_size + 1 - len(p)]]))
        plens.append(len(p))
        rlens.append(len(r))
    return seqs, np.array(plens), np.array(rlens)


def answer_coverage(ts, codec, block_size):
    """The share of a set's answer tokens (end-of-text included) that the loss scores at this block
    size, where long examples are cut (THEORY.md §1: the loss is over whole responses), and the
    share of its examples whose answer is scored whole."""
    seqs, plens, rlens = fit_block(ts, codec, block_size)
    scored = np.array([len(s) for s in seqs]) - plens
    return {"answer_tokens_scored": float(scored.sum() / max(rlens.sum(), 1)),
            "answers_whole": float((scored == rlens).mean()) if len(rlens) else 0.0,
            "mean_answer_tokens": float(rlens.mean()) if len(rlens) else 0.0, "examples": len(rlens)}


def collate(seqs, plens, pad):
    """(inputs, targets, loss_mask) of sequences of prompt + response model ids, each with its
    prompt length, padded with `pad` to the longest; the mask is true exactly on the response
    targets."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), pad, dtype=torch.long)
    m = torch.zeros((len(seqs), T), dtype=torch.bool)
    for row, (s, plen) in enumerate(zip(seqs, plens)):
        s = torch.from_numpy(np.asarray(s))
        n = len(s) - 1
        x[row, :n], y[row, :n] = s[:-1], s[1:]
        m[row, plen - 1:n] = True
    return x, y, m


def train_and_heldout(name, data_dir="", cache_dir=""):
    """(training, held-out) TokenSets of a dataset: a part of the safety split is held
    out against the split's eval part; any other file against its top HELDOUT by hash;
    a mixture 'a+b' part by part."""
    if "+" in name:
        parts = [train_and_heldout(n, data_dir, cache_dir) for n in name.split("+")]
        return TokenSet.concat([p[0] for p in parts]), TokenSet.concat([p[1] for p in parts])
    ts = tokenized(name, data_dir, cache_dir)
    spec = REGISTRY.get(name)
    if spec is not None and spec.part:
        return ts.where(split_part(ts.keys, spec.part)), ts.where(split_part(ts.keys, "eval"))
    held = key_fraction(ts.keys) >= 1.0 - HELDOUT
    return ts.where(~held), ts.where(held)


def validation_part(name, data_dir="", cache_dir=""):
    """D_s's validation examples, never trained on, which choose where alignment stops: the split's
    val part for a part of a split; else the VALIDATION share of the file just below its held-out
    part (by prompt hash); a mixture 'a+b' part by part."""
    if "+" in name:
        return TokenSet.concat([validation_part(n, data_dir, cache_dir) for n in name.split("+")])
    ts = tokenized(name, data_dir, cache_dir)
    spec = REGISTRY.get(name)
    if spec is not None and spec.part:
        return ts.where(split_part(ts.keys, "val"))
    u = key_fraction(ts.keys)
    return ts.where((u >= 1.0 - HELDOUT - VALIDATION) & (u < 1.0 - HELDOUT))


_SOURCES = {}


def real_source(rc: RealDataConfig):
    """RealData(rc), kept per configuration, so that the stages of one run read the files once."""
    key = json.dumps(dataclasses.asdict(rc), sort_keys=True)
    if key not in _SOURCES:
        _SOURCES[key] = RealData(rc)
    return _SOURCES[key]


def codec_of(ckpt):
    """The text codec of a real-data checkpoint (its compact vocabulary), None for the
    synthetic world."""
    wc = ckpt.get("world_config", {})
    if "vocab" not in wc:
        return None
    return Codec(wc["vocab"] or None)
