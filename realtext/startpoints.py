"""
Where alignment starts (THEORY.md §1, "starting points"), nanoGPT's --init_from convention:

    scratch        random weights, a function of the seed (the default)
    <path>         a checkpoint of this project: θ_pre of `--stage pretrain`, or any θ_0 or run
    gpt2           GPT-2's weights from a local Hugging Face folder (--hf_dir), full vocabulary

A starting point is part of θ_0's identity: align_key holds the hash of its weights (not its
path, so a moved file keeps its θ_0s), and a θ_pre's corpus may not contain a set the run
trains or evaluates on. The model's shape and vocabulary must be the run's; the positional
embedding is cut to the run's block size (nanoGPT's crop_block_size).
"""

import functools
import hashlib
import json
import os

import numpy as np
import torch

from common import ConfigError
from model import GPT, CheckpointError, GPTConfig, load_checkpoint, load_hf_gpt2, model_from_checkpoint, params_hash

PRETRAIN_FIELDS = ("n_layer", "n_head", "n_embd", "pretrain_iters", "pretrain_lr", "warmup_iters", "weight_decay",
                   "grad_clip", "batch_tokens", "seed", "data_dir", "block_size", "restrict_vocab", "vocab_cap",
                   "pretrain_data")


def pretrain_key(cfg):
    """Identity of a pretraining recipe: a saved θ_pre is reused only when it matches."""
    blob = repr(sorted((k, getattr(cfg, k)) for k in PRETRAIN_FIELDS))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SHAPE = ("n_layer", "n_head", "n_embd")  # the model's shape flags


def hf_shape(hf_dir):
    """The shape flags of a Hugging Face GPT-2 folder, from its config.json; None if it has none
    (check_init then names the problem)."""
    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf = json.load(f)
        return {k: hf[k] for k in SHAPE}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shape_from_init(values, stated):
    """--init_from gpt2 --hf_dir DIR: the shape flags and --restrict_vocab not stated by the user
    (`stated`: the fields of the command line and of a --config file) from the folder, as nanoGPT's
    init_from does; a stated one that disagrees is refused later, by check_init."""
    shape = hf_shape(values["hf_dir"]) if values.get("init_from") == "gpt2" and values.get("hf_dir") else None
    if shape is None:
        return values
    return dict(values, **{k: v for k, v in dict(shape, restrict_vocab=False).items() if k not in stated})


def check_init(cfg):
    """Reject a bad --init_from/--hf_dir before anything is written."""
    if cfg.init_from == "gpt2":
        if not cfg.hf_dir:
            raise ConfigError("--init_from gpt2 needs --hf_dir DIR, a local Hugging Face GPT-2 folder "
                              "(`huggingface-cli download gpt2 --local-dir DIR`)")
        if not os.path.isdir(cfg.hf_dir):
            raise ConfigError(f"--hf_dir {cfg.hf_dir} is not a folder")
        if cfg.restrict_vocab:
            raise ConfigError("--init_from gpt2 keeps GPT-2's full vocabulary: add --no-restrict_vocab")
        shape = hf_shape(cfg.hf_dir)
        wrong = {k: v for k, v in (shape or {}).items() if getattr(cfg, k) != v}
        if wrong:
            raise ConfigError(f"--hf_dir {cfg.hf_dir} holds a GPT-2 of {', '.join(f'{k} {v}' for k, v in wrong.items())}, "
                              f"not the {', '.join(f'--{k} {getattr(cfg, k)}' for k in wrong)} given: drop those "
                              f"flags (the folder's shape is used) or pass {' '.join(f'--{k} {v}' for k, v in wrong.items())}")
    elif cfg.init_from != "scratch":
        if not os.path.isfile(cfg.init_from):
            raise ConfigError(f"--init_from {cfg.init_from}: no such checkpoint; choose scratch, gpt2 (with "
                              f"--hf_dir) or the path of a checkpoint (θ_pre: `python train.py --stage pretrain`)")
    if cfg.hf_dir and cfg.init_from != "gpt2":
        raise ConfigError("--hf_dir is read by --init_from gpt2 only: add it or drop --hf_dir")
    if cfg.init_from != "scratch" and cfg.stage == "pretrain":
        raise ConfigError("--stage pretrain trains θ_pre from scratch: drop --init_from")


@functools.lru_cache(maxsize=8)
def _weights_id(kind, path, stamp):
    if kind == "gpt2":
        return "gpt2:" + params_hash(load_hf_gpt2(path))
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind")
    # a θ_pre and a θ_0 store the hash of their own weights; a run's checkpoint stores its θ_0's
    own = {"theta_pre": ckpt.get("params_hash"), "theta0": ckpt.get("theta0_hash")}.get(kind)
    return f"{kind}:" + (own or params_hash(model_from_checkpoint(ckpt)))


def init_identity(cfg):
    """'' for scratch, else the kind and weight hash of the starting point (for align_key)."""
    if cfg.init_from == "scratch":
        return ""
    path = cfg.hf_dir if cfg.init_from == "gpt2" else cfg.init_from
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    stamp = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, files))  # a rewrite is a new inode
    return _weights_id(cfg.init_from if cfg.init_from == "gpt2" else "ckpt", path, stamp)


def init_checkpoint(cfg):
    """The checkpoint of --init_from <path>, checked to be a model; None for scratch or gpt2."""
    if cfg.init_from in ("scratch", "gpt2"):
        return None
    ckpt = load_checkpoint(cfg.init_from)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"--init_from {cfg.init_from} holds no model weights")
    return ckpt


def init_vocab(cfg):
    """The compact vocabulary of --init_from <path> (() for scratch and gpt2): alignment reads
    tokens as the starting point learned them. Another vocabulary recipe is refused."""
    ckpt = init_checkpoint(cfg)
    if ckpt is None:
        return ()
    data = ckpt.get("config", {}).get("data", "synthetic")
    if data != cfg.data:
        raise CheckpointError(f"--init_from {cfg.init_from} was trained on --data {data}, this run is --data "
                              f"{cfg.data}: start from a checkpoint of the same data")
    for k in ("restrict_vocab", "vocab_cap"):
        saved = ckpt.get("config", {}).get(k, getattr(cfg, k))
        if saved != getattr(cfg, k):
            raise CheckpointError(f"--init_from {cfg.init_from} has another vocabulary (--{k} {saved}; this run "
                                  f"{getattr(cfg, k)}): pass --{k} {saved}")
    return tuple(ckpt.get("world_config", {}).get("vocab", ()))


def check_corpus(ckpt, cfg, world):
    """A θ_pre may not have been pretrained on a set this run trains or evaluates on: by name, and by
    prompt against every part of the run (training and held-out) where θ_pre stored its prompts."""
    if ckpt.get("kind") != "theta_pre":
        return
    corpus = set(ckpt["config"].get("pretrain_data", "").split("+")) - {""}
    used = {n for name in (cfg.safety_data, cfg.proxy_data, cfg.task_data, cfg.align_helpful) for n in name.split("+")}
    if corpus & used:
        raise CheckpointError(f"--init_from {cfg.init_from} was pretrained on {', '.join(sorted(corpus & used))}, "
                              f"which this run trains or evaluates on: pretrain without it (--pretrain_data)")
    seen = set(ckpt.get("corpus_keys", torch.zeros(0, dtype=torch.int64)).tolist())
    for part, keys in getattr(world, "keys", {}).items():
        shared = seen & set(np.asarray(keys, dtype=np.uint64).view(np.int64).tolist())
        if shared:
            raise CheckpointError(f"--init_from {cfg.init_from} was pretrained on {len(shared)} prompts of this run's "
                                  f"{part} part: pretrain without the set that holds them (--pretrain_data)")


def new_model(cfg, world, sys_):
    """A GPT of the run's shape and the world's vocabulary, on sys_.device, its initial weights a
    function of the seed alone."""
    torch.manual_seed(cfg.seed)
    mc = GPTConfig(block_size=world.block_size, vocab_size=world.vocab_size,
                   n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    return GPT(mc).to(sys_.device)


def initial_model(cfg, world, sys_):
    """The model alignment starts from, on sys_.device: checked against the run's shape and
    vocabulary, its positional embedding cut to the run's block size."""
    model = new_model(cfg, world, sys_)
    mc = model.config
    if cfg.init_from == "scratch":
        return model
    if cfg.init_from == "gpt2":
        src, what = load_hf_gpt2(cfg.hf_dir), f"--hf_dir {cfg.hf_dir}"
        src_cfg, src_state = src.config, src.state_dict()
    else:
        ckpt = init_checkpoint(cfg)
        check_corpus(ckpt, cfg, world)
        src_cfg, src_state, what = GPTConfig(**ckpt["model_config"]), ckpt["model"], f"--init_from {cfg.init_from}"
        if tuple(ckpt.get("world_config", {}).get("vocab", ())) != tuple(getattr(world.wc, "vocab", ())):
            raise CheckpointError(f"{what} was trained on other data (--data {ckpt['config'].get('data')}; this run "
                                  f"--data {cfg.data}) or another vocabulary: start from a checkpoint of this data")
    shape = {k: getattr(src_cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
    if shape != {k: getattr(mc, k) for k in shape}:
        flags = " ".join(f"--{k} {v}" for k, v in shape.items() if k != "vocab_size")
        raise CheckpointError(f"{what} is a model of {shape}, this run's is "
                              f"{ {k: getattr(mc, k) for k in shape} }: pass {flags} (and its vocabulary)")
    if src_cfg.block_size < mc.block_size:
        raise CheckpointError(f"{what} has {src_cfg.block_size} positions, fewer than --block_size "
                              f"{mc.block_size}: lower --block_size")
    state = dict(src_state, **{"transformer.wpe.weight": src_state["transformer.wpe.weight"][:mc.block_size]})
    model.load_state_dict(state)  # copied onto the model's device
    return model
