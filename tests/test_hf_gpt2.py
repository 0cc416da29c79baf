"""A Hugging Face GPT-2 folder loads into exactly GPT-2's function, not just into a model of the right shape.

The folder is written here (config.json and random weights with GPT2LMHeadModel's key names and Conv1D's
(in, out) layout, as model.safetensors through a tiny writer of the format or as pytorch_model.bin), and the
loaded model's logits are compared with GPT-2's forward pass written out below from the Hugging Face tensors
themselves: comparing with this project's own GPT would pass a shared mistake (an untransposed Conv1D weight,
erf GELU instead of GPT-2's tanh one, a wrong attention scale). Broken folders must fail with a CheckpointError
that names the problem, never load something else.
"""
import json
import math
import struct

import pytest
import torch

from model import GPT, CheckpointError, convert_hf_gpt2, gpt_config_from_hf, load_hf_gpt2, read_safetensors

CFG = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4,
       "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
FORMATS = ["model.safetensors", "pytorch_model.bin"]


def random_hf_gpt2(cfg=CFG, seed=0):
    """Random GPT-2 weights as GPT2LMHeadModel names and shapes them (Conv1D weights (in, out))."""
    g = torch.Generator().manual_seed(seed)
    C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]

    def rnd(*shape, mean=0.0):
        return mean + 0.2 * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": rnd(V, C), "transformer.wpe.weight": rnd(P, C)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": rnd(C, mean=1.0), p + "ln_1.bias": rnd(C),
                   p + "attn.c_attn.weight": rnd(C, 3 * C), p + "attn.c_attn.bias": rnd(3 * C),
                   p + "attn.c_proj.weight": rnd(C, C), p + "attn.c_proj.bias": rnd(C),
                   p + "ln_2.weight": rnd(C, mean=1.0), p + "ln_2.bias": rnd(C),
                   p + "mlp.c_fc.weight": rnd(C, 4 * C), p + "mlp.c_fc.bias": rnd(4 * C),
                   p + "mlp.c_proj.weight": rnd(4 * C, C), p + "mlp.c_proj.bias": rnd(C)})
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = rnd(C, mean=1.0), rnd(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, as in GPT-2
    return sd


def write_safetensors(path, tensors):
    """The .safetensors layout: 8-byte little-endian header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_hf_folder(folder, fmt, **config_changes):
    """A GPT-2 folder of CFG's weights in format fmt; config_changes go into config.json only. Returns the weights."""
    sd = random_hf_gpt2()
    (folder / "config.json").write_text(json.dumps({**CFG, **config_changes}))
    if fmt == "model.safetensors":
        write_safetensors(folder / fmt, sd)
    else:
        torch.save(sd, folder / fmt)
    return sd


def reference_logits(sd, cfg, idx):
    """GPT-2's forward pass from the Hugging Face tensors, in plain torch ops (Conv1D: x @ W + b)."""
    def w(name):
        return sd["transformer." + name]

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg["layer_norm_epsilon"]) * w(name + ".weight") + w(name + ".bias")

    def conv1d(x, name):
        return x @ w(name + ".weight") + w(name + ".bias")

    B, T = idx.shape
    C, nh = cfg["n_embd"], cfg["n_head"]
    hs = C // nh
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w("wte.weight")[idx] + w("wpe.weight")[:T]
    for i in range(cfg["n_layer"]):
        h = f"h.{i}."
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, -1))
        att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), h + "attn.c_proj")
        m = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        m = 0.5 * m * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (m + 0.044715 * m ** 3)))  # "gelu_new"
        x = x + conv1d(m, h + "mlp.c_proj")
    return ln(x, "ln_f") @ w("wte.weight").T


def random_batch(B=3, T=17):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_folder_computes_gpt2(tmp_path, fmt):
    sd = write_hf_folder(tmp_path, fmt)
    if fmt == "model.safetensors":  # the reader returns the file's tensors bit for bit
        read = read_safetensors(str(tmp_path / fmt))
        assert set(read) == set(sd) and all(torch.equal(read[k], sd[k]) for k in sd)
    model = load_hf_gpt2(str(tmp_path)).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    idx = random_batch()
    with torch.no_grad():
        logits, loss = model(idx)  # full-sequence logits, already cut to vocab_size
    assert loss is None and logits.shape == (3, 17, CFG["vocab_size"])
    torch.testing.assert_close(logits, reference_logits(sd, CFG, idx), atol=1e-5, rtol=0)


def test_convert_takes_gpt2model_keys_with_mask_buffers_and_leaves_them_untouched():
    sd = random_hf_gpt2()
    hf = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}  # GPT2Model keys
    P = CFG["n_positions"]
    for i in range(CFG["n_layer"]):  # the causal-mask buffers older transformers versions save
        hf[f"h.{i}.attn.bias"] = torch.ones(1, 1, P, P).tril()
        hf[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    before = {k: v.clone() for k, v in hf.items()}
    config = gpt_config_from_hf(CFG)
    model = GPT(config).eval()
    model.load_state_dict(convert_hf_gpt2(hf, config))
    assert all(torch.equal(before[k], hf[k]) for k in hf)  # pure: the input is untouched
    idx = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_logits(sd, CFG, idx), atol=1e-5, rtol=0)
    del hf["h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing .*h\.1\.mlp\.c_fc\.bias"):
        convert_hf_gpt2(hf, config)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(CheckpointError, match=r"no GPT-2 weights \(model\.safetensors or pytorch_model\.bin\)"):
        load_hf_gpt2(str(tmp_path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_folder_without_config(tmp_path, fmt):
    write_hf_folder(tmp_path, fmt)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_gpt2(str(tmp_path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_of_another_width_than_the_weights(tmp_path, fmt):
    write_hf_folder(tmp_path, fmt, n_embd=48)
    with pytest.raises(CheckpointError, match=r"wte of shape \(97, 32\) ≠ \(97, 48\) of its config"):
        load_hf_gpt2(str(tmp_path))


@pytest.mark.parametrize("keep", [4, 40, 0.5, -1])  # cut in the length, the header, the tensors, the last byte
def test_truncated_safetensors(tmp_path, keep):
    write_hf_folder(tmp_path, "model.safetensors")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    problem = "truncated" if keep in (0.5, -1) else ""  # where the tensors are cut, the message says so
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is not a readable \.safetensors file .*{problem}"):
        load_hf_gpt2(str(tmp_path))


def test_truncated_pytorch_bin(tmp_path):
    write_hf_folder(tmp_path, "pytorch_model.bin")
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a readable PyTorch weights file"):
        load_hf_gpt2(str(tmp_path))


@pytest.mark.parametrize("changes, words", [
    ({"n_positions": 64}, r"do not match their config.json: transformer.wpe.weight \(32, 32\) ≠ \(64, 32\)"),
    ({"activation_function": "relu"}, "activation_function = 'relu' is not GPT-2's"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings = False is not GPT-2's"),
    ({"n_embd": None}, "not a GPT-2 config.json"),
])
def test_a_config_this_gpt_cannot_compute_is_refused(tmp_path, changes, words):
    write_hf_folder(tmp_path, "model.safetensors", **changes)
    with pytest.raises(CheckpointError, match=words):
        load_hf_gpt2(str(tmp_path))


def test_a_config_that_is_not_json_is_refused(tmp_path):
    write_hf_folder(tmp_path, "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a GPT-2 config.json"):
        load_hf_gpt2(str(tmp_path))
