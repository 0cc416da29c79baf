"""GPT-2 weights in the Hugging Face layout (Conv1D weights transposed, unpadded
vocabulary, mask buffers) convert to exactly this GPT (minGPT's one test that matters)."""
import json
import struct

import pytest
import torch

from model import GPT, HF_CONV1D, CheckpointError, convert_hf_gpt2, gpt_config_from_hf, load_hf_gpt2, read_safetensors

HF_CONFIG = {"model_type": "gpt2", "vocab_size": 101, "n_positions": 16, "n_ctx": 16, "n_layer": 2, "n_head": 2,
             "n_embd": 16}


def hf_layout(model, prefix="transformer."):
    """A state dict as Hugging Face's GPT2LMHeadModel stores it (prefix '') for GPT2Model."""
    cfg = model.config
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v[:cfg.vocab_size] if k == "transformer.wte.weight" else v
        v = v.t() if k.endswith(HF_CONV1D) else v
        out[prefix + k.removeprefix("transformer.")] = v.clone().contiguous()
    for i in range(cfg.n_layer):  # the causal-mask buffers older versions save
        out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(
            1, 1, cfg.block_size, cfg.block_size)
        out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if prefix:
        out["lm_head.weight"] = out[prefix + "wte.weight"]
    return out


def write_safetensors(path, tensors):
    """The .safetensors layout: header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture
def reference():
    torch.manual_seed(0)
    return GPT(gpt_config_from_hf(HF_CONFIG)).eval()


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_converted_hf_state_dict_gives_the_same_logits(reference, prefix):
    hf = hf_layout(reference, prefix)
    assert hf[prefix + "h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    before = {k: v.clone() for k, v in hf.items()}
    model = GPT(reference.config).eval()
    model.load_state_dict(convert_hf_gpt2(hf, reference.config))
    assert all(torch.equal(before[k], hf[k]) for k in hf)            # pure: the input is untouched
    idx = torch.randint(0, 101, (3, 16))
    assert torch.equal(model(idx)[0], reference(idx)[0])


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
def test_load_from_a_local_folder(tmp_path, reference, fmt):
    hf = hf_layout(reference)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    if fmt.endswith(".bin"):
        torch.save(hf, tmp_path / fmt)
    else:
        write_safetensors(tmp_path / fmt, {k: v for k, v in hf.items() if k != "lm_head.weight"})
        assert set(read_safetensors(str(tmp_path / fmt))) == set(hf) - {"lm_head.weight"}
    model = load_hf_gpt2(str(tmp_path)).eval()
    idx = torch.randint(0, 101, (2, 16))
    assert torch.equal(model(idx)[0], reference(idx)[0])


def test_missing_or_broken_weights_are_clear(tmp_path, reference):
    with pytest.raises(CheckpointError, match="no GPT-2 weights .*huggingface-cli download gpt2"):
        load_hf_gpt2(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_hf_gpt2(str(tmp_path))
    hf = hf_layout(reference)
    del hf["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match="missing .*h.1.mlp.c_fc.bias"):
        convert_hf_gpt2(hf, reference.config)
