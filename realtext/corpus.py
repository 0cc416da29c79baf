"""
The pretraining corpus (THEORY.md §1, "starting points"): general text on which θ_pre learns
the language before alignment, so that no later task is new language to the model, while
none of the examples it is later aligned, fine-tuned or evaluated on was ever seen.

    python train.py --data real --stage pretrain --out_dir out/pre        # θ_pre
    python train.py --data real --init_from out/pre/theta_pre.pt ...       # align from it

A corpus is a '+'-joined list of sources: the general text of the data folder (SOURCES below:
Wikipedia, C4, WikiText-2, Anthropic's HH dialogues, harmless instructions without answers, the
Alpaca seed tasks), registry instruction sets in the prompt template (for example
gpteacher_codegen's code before a code_alpaca fine-tune), or a user's .txt file (a document per
line). Two rules keep it clean:
  - a registry set with a part of a split (D_s, its proxy, its held-out part) or an evaluation
    role is refused: its parts are trained on or held out later;
  - an instruction (or a dialogue's first human turn) whose prompt occurs in any registry set of
    the data folder outside the corpus is dropped, so a later fine-tune or evaluation on them never
    meets a prompt θ_pre saw (`leaks` checks it); θ_pre stores the prompts it kept, and a run
    from it checks them against its own parts, user files and sets fetched later included
    (startpoints.check_corpus).
Documents end with end-of-text and are packed into one token stream; HELDOUT_DOCS of them, by a
hash of their text, are held out for the held-out loss of θ_pre.
"""

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from common import DataError
from realtext.loaders import REGISTRY, TRAIN_ROLES, _open_text, join_prompt, load_prompts, read_jsonl, resolve_data_dir
from realtext.textdata import (EOT, TEMPLATE_HEAD, TEMPLATE_TAIL, Codec, build_vocab, gpt2_encoding, key_fraction,
                               prompt_key, tokenized)

# source name → (path in the data folder, reader of its documents)
SOURCES = {
    "wiki_demo": ("general_text/wiki_demo.txt", "lines"),
    "c4_demo": ("general_text/c4_demo.jsonl", "jsonl_text"),
    "wikitext2_valid": ("general_text/wikitext2_valid.txt", "wikitext"),
    "wikitext2_test": ("general_text/wikitext2_test.txt", "wikitext"),
    "hh_rlhf": ("hh_rlhf_harmless/test.jsonl.gz", "hh"),
    "harmless_instructions": ("refusal_direction_splits/harmless_train.json", "prompts"),
    "alpaca_seed": ("stanford_alpaca_seed/seed_tasks.jsonl", "seed"),
}
DEFAULT_CORPUS = "+".join(SOURCES)
HELDOUT_DOCS = 0.05  # share of documents held out (by hash), for θ_pre's held-out loss


# -----------------------------------------------------------------------------
# Documents: (text, prompt or None). An instruction's prompt is kept so that `leaks` can
# compare it with the registry's prompts; general text has none.


def _wikitext(path):
    """WikiText-2's articles (a ' = Title = ' line starts one), its tokenizer's ' @-@ '
    markers undone."""
    with _open_text(path) as f:
        text = f.read()
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return [a.strip() for a in re.split(r"\n (?== [^=])", text) if a.strip()]


def _lines(path):
    with _open_text(path) as f:
        return [line.strip() for line in f if line.strip()]


def _template(prompt, response=None):
    """An instruction as the later runs will see it: the prompt template of textdata.py."""
    return TEMPLATE_HEAD + prompt + TEMPLATE_TAIL + (response or "")


def _seed_tasks(path):
    out = []
    for _, rec in read_jsonl(path):
        for inst in rec.get("instances", []):
            prompt = join_prompt(rec["instruction"], inst.get("input"))  # as the registry's loaders join them
            out.append((_template(prompt, inst.get("output", "")), prompt))
    return out


def _dialogue(text):
    """An HH dialogue and its first human turn, its prompt."""
    first = text.split("\n\nAssistant:")[0].replace("Human:", "", 1).strip()
    return text, first or None


READERS = {
    "lines": lambda p: [(t, None) for t in _lines(p)],
    "wikitext": lambda p: [(t, None) for t in _wikitext(p)],
    "jsonl_text": lambda p: [(rec["text"], None) for _, rec in read_jsonl(p) if rec.get("text", "").strip()],
    "hh": lambda p: [_dialogue(rec["chosen"].strip()) for _, rec in read_jsonl(p) if rec.get("chosen", "").strip()],
    "prompts": lambda p: [(_template(q), q) for q in load_prompts(p)],
    "seed": _seed_tasks,
}


def check_sources(names):
    """The corpus's source names, each valid for pretraining (the rules of the module docstring)."""
    names = [n for n in names.split("+") if n]
    if not names:
        raise DataError("--pretrain_data is empty: name at least one source (default: " + DEFAULT_CORPUS + ")")
    for n in names:
        spec = REGISTRY.get(n)
        if n in SOURCES or (spec is None and os.path.isfile(n) and n.endswith(".txt")):
            continue
        if spec is None:
            raise DataError(f"--pretrain_data {n}: not a corpus source ({', '.join(SOURCES)}), a registry "
                            f"instruction set or a .txt file")
        if spec.part or spec.role not in TRAIN_ROLES:
            raise DataError(f"--pretrain_data {n}: would put a part held out for evaluation or trained on later "
                            f"into the corpus ({'part ' + spec.part + ' of a split' if spec.part else spec.role}): "
                            f"drop it (only whole instruction sets that no later run uses may be pretrained on)")
    return names


def documents(name, data_dir=""):
    """[(text, prompt or None)] of one source."""
    if name in SOURCES:
        rel, reader = SOURCES[name]
        path = os.path.join(resolve_data_dir(data_dir), rel)
        if not os.path.isfile(path):
            raise DataError(f"{path}: corpus source {name} is missing from the data folder: "
                            f"`python -m realtext.fetch` fetches it, or drop it from --pretrain_data")
        return READERS[reader](path)
    if name in REGISTRY:
        ts = tokenized(name, data_dir)
        enc = gpt2_encoding()
        return [(_template(ts.prompt(i), enc.decode(list(ts.response_ids(i)[:-1]))), ts.prompt(i))
                for i in range(len(ts))]
    return [(t, None) for t in _lines(name)]


def registry_keys(exclude, data_dir=""):
    """Prompt keys of every registry set in the data folder outside `exclude`: what no corpus
    instruction may share."""
    d = resolve_data_dir(data_dir)
    return {int(k) for n, spec in REGISTRY.items() if n not in exclude and os.path.isfile(os.path.join(d, spec.path))
            for k in tokenized(n, data_dir).keys}


def corpus_documents(names, data_dir=""):
    """{source: [(text, prompt)]}, instructions whose prompt a registry set outside the corpus
    holds dropped; also the number dropped."""
    names = check_sources(names)
    taken = registry_keys(set(names), data_dir)
    out, dropped = {}, 0
    for n in names:
        docs = documents(n, data_dir)
        keep = [d for d in docs if d[1] is None or prompt_key(d[1]) not in taken]
        dropped += len(docs) - len(keep)
        out[n] = keep
    return out, dropped


def leaks(docs, data_dir=""):
    """Prompts of the corpus's instructions that a registry set outside it holds (should be none)."""
    taken = registry_keys(set(docs), data_dir)
    return [p for ds in docs.values() for _, p in ds if p is not None and prompt_key(p) in taken]


def doc_heldout(text):
    """Is a document in the held-out share (a hash of its text)?"""
    key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return bool(key_fraction([key])[0] >= 1.0 - HELDOUT_DOCS)


# -----------------------------------------------------------------------------
# The corpus as a data source: next-token prediction on every token of blocks cut at random
# offsets from the packed training stream (nanoGPT's batches); a fixed set of consecutive
# blocks of the held-out stream for evaluation.


@dataclass
class CorpusConfig:
    sources: str = DEFAULT_CORPUS   # '+'-joined sources (module docstring)
    data_dir: str = ""              # the data folder; default $SAFETY_DATA_DIR
    block_size: int = 64            # tokens per block
    restrict_vocab: bool = True     # the compact vocabulary of the later runs (textdata.build_vocab)
    vocab_cap: int = 0
    eval_examples: int = 128        # held-out blocks per evaluation
    vocab: tuple = ()               # set once built


class Corpus:
    name = "corpus"

    def __init__(self, cc: CorpusConfig):
        vocab = (cc.vocab or build_vocab([], cc.data_dir, cap=cc.vocab_cap)) if cc.restrict_vocab else None
        self.codec = Codec(vocab)
        self.wc = dataclasses.replace(cc, vocab=tuple(int(v) for v in vocab) if vocab is not None else ())
        self.block_size = self.seq_len = cc.block_size
        self.vocab_size = self.codec.vocab_size
        docs, self.dropped = corpus_documents(cc.sources, cc.data_dir)
        enc = gpt2_encoding()
        streams = {False: [], True: []}
        self.stats = {"documents": {n: len(d) for n, d in docs.items()}, "dropped_instructions": self.dropped}
        for ds in docs.values():
            for text, _ in ds:
                streams[doc_heldout(text)].append(enc.encode_ordinary(text) + [EOT])
        # the prompts θ_pre sees, for the check of every later run against them (startpoints.check_corpus)
        self.prompt_keys = np.array(sorted({prompt_key(p) for ds in docs.values() for _, p in ds if p is not None}),
                                    dtype=np.uint64)
        self.train, self.heldout = (self.codec.encode_ids(np.concatenate(streams[h]) if streams[h] else [])
                                    for h in (False, True))
        if len(self.train) <= cc.block_size + 1 or len(self.heldout) <= cc.block_size:
            raise DataError(f"--pretrain_data {cc.sources}: too little text ({len(self.train)} training, "
                            f"{len(self.heldout)} held-out tokens) for blocks of {cc.block_size}: add sources")
        p = np.bincount(self.train, minlength=self.vocab_size) / len(self.train)
        self.stats.update(train_tokens=int(len(self.train)), heldout_tokens=int(len(self.heldout)),
                          unigram_entropy=float(-(p[p > 0] * np.log(p[p > 0])).sum()),
                          unk_share=float(p[self.codec.unk]) if self.codec.unk is not None else 0.0)
        self.stream = torch.from_numpy(self.train.astype(np.int64))
        self.eval_stream = torch.from_numpy(self.heldout.astype(np.int64))

    def batch(self, name, n, generator):
        """n blocks of the training stream at uniform offsets, as (inputs, targets, mask): every
        token is a target."""
        assert name == "general", name
        start = torch.randint(len(self.stream) - self.block_size - 1, (n,), generator=generator)
        idx = start[:, None] + torch.arange(self.block_size + 1)
        seq = self.stream[idx]
        return seq[:, :-1], seq[:, 1:], torch.ones(n, self.block_size, dtype=torch.bool)

    def eval_batches(self, name, batch_size=16):
        """eval_examples blocks of the held-out stream at fixed, evenly spaced offsets."""
        assert name == "general", name
        T = self.block_size
        n = min(self.wc.eval_examples, (len(self.eval_stream) - 1) // T)
        # spread evenly over the stream, not all from its first source
        starts = torch.linspace(0, len(self.eval_stream) - T - 1, n).long().tolist()
        for i in range(0, n, batch_size):
            rows = starts[i:i + batch_size]
            seq = torch.stack([self.eval_stream[r:r + T + 1] for r in rows])
            yield seq[:, :-1], seq[:, 1:], torch.ones(len(rows), T, dtype=torch.bool)
