"""
The model P_θ(y|x) of THEORY.md §1: a small GPT in the nanoGPT mould.

A sequence is a prompt x followed by a response y. The model is trained and scored on
the response tokens only (a loss mask), so that

    log P_θ(y|x) = Σ_t log p_θ(y_t | x, y_<t)          (THEORY.md §1)

is exactly what `sequence_nll` returns. Parameter names follow Hugging Face's GPT-2
(`transformer.wte`, `transformer.h.{i}.attn.c_attn`, `mlp.c_fc`, `lm_head`) so that
pretrained weights map one to one.
"""

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import atomic_write


@dataclass
class GPTConfig:
    block_size: int = 8       # longest sequence the model sees (prompt + response)
    vocab_size: int = 64      # real vocabulary; the embedding is padded to a multiple of 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0      # 0 keeps CPU runs bitwise deterministic and resumable
    bias: bool = True         # GPT-2 has biases in Linear and LayerNorm

    @property
    def padded_vocab_size(self):
        # a vocabulary padded to a multiple of 64 keeps the lm_head matmul on fast GPU
        # kernels (nanoGPT pads GPT-2's 50,257 to 50,304 for this); logits are cut back to
        # the real vocabulary
        return ((self.vocab_size + 63) // 64) * 64


# -----------------------------------------------------------------------------
# The architecture, top to bottom


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # flash attention on GPU, a fused kernel on CPU; causal: token t sees only ≤ t
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LN residual blocks, as in GPT-2
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "SCALE_INIT", False):
                # residual projections scaled by 1/sqrt(2·n_layer) (GPT-2 paper)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx):
        """The final hidden states (B, T, n_embd), after ln_f: logits = lm_head of them.
        Evaluation on real text applies lm_head to the response positions only, since
        the output layer over a large vocabulary is most of a small model's cost."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, loss_mask=None, label_smoothing=0.0):
        """Logits (B, T, vocab_size) and, given targets, the mean next-token NLL over the
        tokens where loss_mask is true (the response tokens; all tokens if no mask), against
        targets smoothed by label_smoothing ε ((1−ε)·one-hot + ε·uniform) when ε > 0."""
        B, T = idx.size()
        x = self.hidden_states(idx)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # cut the padding back off
        if targets is None:
            return logits, None
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                              reduction="none", label_smoothing=label_smoothing).view(B, T)
        if loss_mask is None:
            return logits, nll.mean()
        mask = loss_mask.to(nll.dtype)
        # per-token mean over response tokens: a scale that does not depend on length
        return logits, (nll * mask).sum() / mask.sum().clamp(min=1.0)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, stop_token=None,
                 suppress=()):
        """Extend idx (B, T) by max_new_tokens; temperature 0 means greedy decoding. With
        stop_token, decoding ends early once every row has produced it (rows that ended
        go on being extended: the caller cuts at the first stop_token). Tokens of `suppress`
        are never produced (a compact vocabulary's UNK, which decodes to no text). The output
        layer runs on the last position only, the one that is sampled from."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            h = self.hidden_states(idx[:, -self.config.block_size:])[:, -1]
            logits = self.lm_head(h)[:, : self.config.vocab_size]
            if len(suppress):
                logits[:, list(suppress)] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None:
                done |= idx_next[:, 0] == stop_token
                if done.all():  # one host sync per token, and a stop when all have ended
                    break
        return idx

    def estimate_flops_per_token(self, T):
        """flops/token = 6·N + 12·L·H·Q·T, N = matmul parameters (the accounting of the PaLM
        paper, Chowdhery et al. 2022, appendix B, as nanoGPT's estimate_mfu uses it)."""
        cfg = self.config
        N = self.num_params()
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        return 6 * N + 12 * L * H * Q * T


def sequence_nll(logits, targets, loss_mask):
    """−log P_θ(y|x) per sequence (B,) in nats: the sum of next-token NLLs over the
    response tokens (THEORY.md §1). logits (B, T, V), targets and loss_mask (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    tok = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (tok * loss_mask.to(tok.dtype)).sum(dim=1)


# -----------------------------------------------------------------------------
# Checkpoints on disk: plain tensors and types only, so torch.load(weights_only=True)
# can read them and a file somebody sent cannot run code when loaded.


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, foreign or of another config."""


def atomic_torch_save(obj, path):
    """Write to a temporary name in the same folder, then rename: a reader (or a crash)
    never sees half a file."""
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by this project, refusing anything else with a clear
    message. weights_only=True never unpickles arbitrary objects, so no code runs."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint: pass the .pt file in it (theta0.pt, ckpt.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: run train.py first or fix the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is not a readable checkpoint of this project: it is empty (0 bytes, a write "
                              f"that never happened): delete it and train again")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, a pickle with code in it, a text file, ...
        raise CheckpointError(f"{path} is not a readable checkpoint of this project: {why_unreadable(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' marker): "
            f"point to a file written by train.py")
    return ckpt


def why_unreadable(e):
    """What torch.load's exception says about a file, in our words and one line."""
    text = " ".join(str(e).split())
    if "Weights only load failed" in text or "weights_only" in text:
        return ("it holds objects other than tensors and plain values, which could run code when loaded, so it "
                "is refused: load only checkpoints written by train.py")
    if isinstance(e, EOFError) or "central directory" in text or "failed reading" in text:
        return "it ends early (truncated: a run killed while writing, or a copy cut short): delete it and train again"
    return (f"it is not a PyTorch file ({type(e).__name__}): point to a .pt file written by train.py, or delete it "
            f"and train again")


CHECKPOINT_FORMAT = "safety-tradeoff-ckpt-v1"


def model_from_checkpoint(ckpt, device="cpu"):
    """Build the GPT stored in a checkpoint dict (from load_checkpoint)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def flat_params(model):
    """The trainable parameters θ in a fixed order (tied weights once)."""
    return [p for p in model.parameters() if p.requires_grad]


def params_hash(model):
    """A short identity of the weights, stored with fine-tunes so that a run never mixes
    up two different θ_0."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# GPT-2 weights from a local Hugging Face folder (config.json + model.safetensors or
# pytorch_model.bin, as `huggingface-cli download gpt2 --local-dir DIR` writes them).
# Parameter names are already Hugging Face's; two things differ. HF's GPT-2 uses Conv1D
# layers, whose weight is (in, out): the transpose of nn.Linear's (out, in). And this
# GPT pads the vocabulary to a multiple of 64 (rows that are never read, since logits
# are cut back to vocab_size).

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# settings of a GPT-2 config.json that this GPT computes: anything else would load and compute
# something other than the model the weights were trained as
HF_SUPPORTED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                "n_inner": (None,), "scale_attn_by_inverse_layer_idx": (False,), "scale_attn_weights": (True,),
                "tie_word_embeddings": (True,)}


def gpt_config_from_hf(hf):
    """GPTConfig of a Hugging Face GPT-2 config.json dict."""
    for k, ok in HF_SUPPORTED.items():
        if hf.get(k, ok[0]) not in ok:
            raise CheckpointError(f"config.json: {k} = {hf[k]!r} is not GPT-2's ({ok[0]!r}); this GPT cannot run it")
    for k in ("vocab_size", "n_layer", "n_head", "n_embd"):
        if not (isinstance(hf[k], int) and hf[k] > 0):
            raise TypeError(f"{k} = {hf[k]!r} is not a positive integer")
    return GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)


def convert_hf_gpt2(hf_state, config):
    """This GPT's state dict from a Hugging Face GPT-2 state dict (GPT2LMHeadModel keys,
    'transformer.h.0...', or GPT2Model keys, 'h.0...'). Pure: no files, inputs untouched."""
    sd = {}
    for k, v in hf_state.items():
        if k == "lm_head.weight":
            continue  # tied to wte in GPT-2: taken from wte below
        if not k.startswith("transformer."):
            k = "transformer." + k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # the causal mask as a buffer in older HF versions; SDPA is causal itself
        sd[k] = v.t().contiguous() if k.endswith(HF_CONV1D) else v.clone()
    wte = sd.get("transformer.wte.weight")
    if wte is None or wte.shape != (config.vocab_size, config.n_embd):
        raise CheckpointError(f"Hugging Face GPT-2 weights: wte of shape {None if wte is None else tuple(wte.shape)} "
                              f"≠ ({config.vocab_size}, {config.n_embd}) of its config")
    padded = torch.zeros(config.padded_vocab_size, config.n_embd, dtype=wte.dtype)
    padded[:config.vocab_size] = wte
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = padded
    with torch.device("meta"):  # the expected names and shapes, without allocating a model
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    if set(sd) != set(expected):
        raise CheckpointError(f"Hugging Face GPT-2 weights: missing {sorted(set(expected) - set(sd))[:4]}, "
                              f"unexpected {sorted(set(sd) - set(expected))[:4]}")
    wrong = [f"{k} {tuple(v.shape)} ≠ {expected[k]}" for k, v in sd.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"Hugging Face GPT-2 weights do not match their config.json: {'; '.join(wrong[:3])}")
    return sd


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, parsed here (the format is simple: an 8-byte
    little-endian header length, a JSON header of dtype/shape/byte offsets, the raw
    bytes), since the safetensors package is not a dependency of this project."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            buf = f.read()
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if end > len(buf):
                raise ValueError(f"tensor {name} ends at byte {end} of {len(buf)}: truncated")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            t = torch.frombuffer(bytearray(buf[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
        return out
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


def load_hf_gpt2(folder, device="cpu"):
    """A GPT with the GPT-2 weights of a local Hugging Face folder."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        hf_state = read_safetensors(st)
    elif os.path.isfile(pt):
        try:
            hf_state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pt} is not a readable PyTorch weights file ({str(e)[:200]})") from None
    else:
        raise CheckpointError(f"{folder}: no GPT-2 weights (model.safetensors or pytorch_model.bin); download "
                              f"them with `huggingface-cli download gpt2 --local-dir {folder}`")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{folder}: no config.json beside the weights")
    try:
        with open(cfg_path) as f:
            config = gpt_config_from_hf(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    model = GPT(config)
    model.load_state_dict(convert_hf_gpt2(hf_state, config))
    return model.to(device)
