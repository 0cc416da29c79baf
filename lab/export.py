"""
Any checkpoint of the project (θ_pre, θ_0, a fine-tune) as a Hugging Face GPT-2 folder, so that the
evaluation tools of the field (transformers' generate, lm-evaluation-harness, HarmBench and
StrongREJECT pipelines) can read it:

    python -m lab.export --ckpt out/ckpt.pt --out hf_out
    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('hf_out')"

The folder holds config.json, model.safetensors (written here: the safetensors package is not a
dependency) and EXPORT.md, which says what the token ids mean. The inverse of model.load_hf_gpt2:
this GPT already uses GPT-2's parameter names; Conv1D weights are stored transposed, and the
padded vocabulary is cut back.

A real-text run's compact vocabulary (realtext/textdata.py: the data folder's tokens, the rest one
UNK id) can leave in one of two ways (--vocab):
  compact  (the default) the model as it is: its ids are the compact ones, and vocab.json maps each
           to its GPT-2 id (the last, UNK, to none). Logits and probabilities are the run's exactly;
           a tool must encode with GPT-2's tokenizer and map the ids (EXPORT.md says how).
  gpt2     the embedding mapped back onto GPT-2's 50,257 ids, so GPT-2's own tokenizer feeds it: an
           id outside the vocabulary gets UNK's row, which is what the run's codec feeds the model
           for it. With tied embeddings the logits at the vocabulary's ids are the run's, but each of
           the ~46,000 ids outside it carries UNK's logit, so a plain softmax gives them together
           that many times UNK's mass: probabilities are the run's only with those ids masked.
"""

import json
import os
import struct
import sys

import numpy as np
import torch

from common import DataError, HelpFormatter, Parser, atomic_write, atomic_write_json, atomic_write_text
from model import HF_CONV1D, CheckpointError, GPTConfig, load_checkpoint
from realtext.textdata import EOT, N_GPT2, codec_of

SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path, tensors):
    """A .safetensors file: an 8-byte little-endian header length, a JSON header of each tensor's
    dtype, shape and byte offsets (padded with spaces to 8 bytes), the raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}  # transformers 4.x reads it and fails without it
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    atomic_write(path, write, mode="wb")


def hf_state(state, config, vocab=None):
    """GPT2LMHeadModel's state dict ('transformer.h.0.attn.c_attn.weight', ...; lm_head tied to wte,
    so not stored) of this GPT's; with a compact vocabulary (sorted GPT-2 ids, UNK last) the
    embedding is mapped back onto GPT-2's ids as the module docstring says."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            continue
        out[k] = v.t().contiguous() if k.endswith(HF_CONV1D) else v.clone()
    wte = state["transformer.wte.weight"][:config.vocab_size]
    if vocab is not None:
        full = wte[len(vocab)].repeat(N_GPT2, 1)  # every id outside the vocabulary reads as UNK
        full[torch.as_tensor(vocab)] = wte[:len(vocab)]
        wte = full
    out["transformer.wte.weight"] = wte.clone()
    return out


def hf_config(config, vocab_size, text):
    """config.json of a GPT-2 of this shape (GELU tanh, LayerNorm ε 1e-5, no dropout, tied embeddings)."""
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
           "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
           "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
           "tie_word_embeddings": True, "use_cache": True}
    if text:
        cfg.update(bos_token_id=EOT, eos_token_id=EOT)
    return cfg


NOTES = {
    "full": """# Exported from {ckpt}

A GPT-2 of {shape}, trained on real text with GPT-2's full vocabulary: GPT-2's own tokenizer
(`transformers.AutoTokenizer.from_pretrained("gpt2")`, or tiktoken's "gpt2") encodes its input.
Prompts were templated as `### Instruction:\\n{{prompt}}\\n\\n### Response:\\n`; every response ends
with <|endoftext|> (id 50256).
""",
    "gpt2": """# Exported from {ckpt}

A GPT-2 of {shape}, trained on real text with a compact vocabulary of {n} GPT-2 tokens plus one UNK
(the rest of GPT-2's 50,257). It is exported onto GPT-2's ids (`--vocab gpt2`), so GPT-2's own
tokenizer (`transformers.AutoTokenizer.from_pretrained("gpt2")`, or tiktoken's "gpt2") encodes its
input: an id outside `vocab.json` reads as UNK, as in training.

The logits at the ids of `vocab.json` equal the run's. Every other id carries UNK's logit, so a
softmax over all 50,257 ids gives each of the {n_oov} ids outside the vocabulary UNK's own weight:
together {n_oov} times UNK's mass, and every probability shifts. To get the run's own distribution,
keep the logits of `vocab.json`'s ids and one more (UNK's: any id outside it, e.g. {unk_id}) and take
the softmax over those {n1}; for generation, mask the ids outside `vocab.json` to −∞ (the model then
never emits UNK). Prompts were templated as `### Instruction:\\n{{prompt}}\\n\\n### Response:\\n`;
responses end with <|endoftext|> (id 50256).
""",
    "compact": """# Exported from {ckpt}

A GPT-2 of {shape}, trained on real text with a compact vocabulary: model id i < {n} is GPT-2 token
`vocab.json[i]`, and id {n} is UNK, every other GPT-2 token. Its logits and probabilities are the
run's exactly. To feed it text: encode with GPT-2's tokenizer, then map each GPT-2 id to its index
in `vocab.json` (an id not there: {n}); map generated ids back through `vocab.json` (UNK has no
text). Prompts were templated as `### Instruction:\\n{{prompt}}\\n\\n### Response:\\n`; responses end
with <|endoftext|> (model id {eot}). `python -m lab.export --vocab gpt2` writes a model on GPT-2's
own ids instead, whose logits match but whose plain softmax does not (its EXPORT.md says why).
""",
    "synthetic": """# Exported from {ckpt}

A GPT-2 of {shape}, trained on the project's synthetic world: its {n} token ids are the world's
symbols, separator, openers and content tokens (data.py, SyntheticWorld), not text; no tokenizer
applies. World: {world}.
""",
}


def export(ckpt_path, out_dir, vocab_mode="compact"):
    """Write the Hugging Face folder of a checkpoint; returns its config.json as a dict. vocab_mode:
    how a compact vocabulary leaves (the module docstring)."""
    ckpt = load_checkpoint(ckpt_path)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{ckpt_path} holds no model weights: export a theta_pre.pt, theta0.pt or ckpt.pt")
    config = GPTConfig(**ckpt["model_config"])
    if not config.bias:
        raise CheckpointError(f"{ckpt_path} is a GPT without biases, which GPT-2's layout cannot hold")
    codec = codec_of(ckpt)
    vocab = None if codec is None or codec.vocab is None else codec.vocab
    kind = "synthetic" if codec is None else "full" if vocab is None else vocab_mode
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file: name a folder")
    os.makedirs(out_dir, exist_ok=True)
    mapped = vocab if kind == "gpt2" else None
    cfg = hf_config(config, config.vocab_size if mapped is None else N_GPT2, text=codec is not None)
    if kind == "compact":
        cfg.update(bos_token_id=codec.eot, eos_token_id=codec.eot)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_state(ckpt["model"], config, mapped))
    atomic_write_json(os.path.join(out_dir, "config.json"), cfg)
    if vocab is not None:
        atomic_write_json(os.path.join(out_dir, "vocab.json"), [int(v) for v in vocab])
    unk_id = int(np.setdiff1d(np.arange(N_GPT2), vocab)[0]) if vocab is not None else None
    shape = f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, {config.block_size} positions"
    atomic_write_text(os.path.join(out_dir, "EXPORT.md"), NOTES[kind].format(
        ckpt=os.path.abspath(ckpt_path), shape=shape, n=len(vocab) if vocab is not None else config.vocab_size,
        n_oov=N_GPT2 - len(vocab) if vocab is not None else 0, n1=len(vocab) + 1 if vocab is not None else 0,
        unk_id=unk_id, eot=codec.eot if codec else None, world=json.dumps(ckpt.get("world_config", {}))))
    return cfg


def parser():
    ap = Parser(prog="python -m lab.export", description="Write a checkpoint of this project as a Hugging Face "
                "GPT-2 folder (config.json, model.safetensors, EXPORT.md).", formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (theta_pre.pt, theta0.pt, ckpt.pt)")
    ap.add_argument("--out", required=True, help="the folder to write (created; its export files are replaced)")
    ap.add_argument("--vocab", choices=("compact", "gpt2"), default="compact",
                    help="a compact-vocabulary run: its own ids, exact (compact), or GPT-2's ids, logits equal but "
                         "probabilities only once the ids outside it are masked (gpt2)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        cfg = export(args.ckpt, args.out, args.vocab)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: a GPT-2 of {cfg['n_layer']} layers × {cfg['n_embd']}, vocabulary {cfg['vocab_size']}; "
          f"see {os.path.join(args.out, 'EXPORT.md')}")
    return cfg


if __name__ == "__main__":
    main()
