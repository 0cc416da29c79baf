"""lab/export.py: any checkpoint as a Hugging Face GPT-2 folder, read back by the project's own
GPT-2 loader (model.load_hf_gpt2) with the same logits; a compact vocabulary mapped onto GPT-2's ids."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from lab import export
from model import CHECKPOINT_FORMAT, GPT, GPTConfig, atomic_torch_save, load_hf_gpt2, read_safetensors
from realtext.textdata import N_GPT2, Codec


def save(tmp_path, config, world_config):
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # biases and LayerNorms away from their init, so a lost or misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "theta0", "model": model.state_dict(),
                       "model_config": dataclasses.asdict(config), "world_config": world_config}, str(path))
    return model.eval(), str(path)


def test_safetensors_written_here_read_back_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float64), "c": torch.randn(2).half(),
               "empty": torch.zeros(0, 4)}
    export.write_safetensors(str(tmp_path / "t.safetensors"), tensors)
    back = read_safetensors(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


def test_a_synthetic_checkpoint_exports_with_the_same_logits(tmp_path):
    config = GPTConfig(block_size=6, vocab_size=23, n_layer=2, n_head=2, n_embd=16)  # 23: padded to 64 inside
    model, path = save(tmp_path, config, {"overlap": 0.25})
    export.main(["--ckpt", path, "--out", str(tmp_path / "hf")])
    assert {"config.json", "model.safetensors", "EXPORT.md"} <= set(os.listdir(tmp_path / "hf"))
    back = load_hf_gpt2(str(tmp_path / "hf")).eval()
    assert back.config.vocab_size == 23 and back.config.block_size == 6
    x = torch.randint(0, 23, (4, 6))
    with torch.no_grad():
        assert torch.allclose(back(x)[0], model(x)[0], atol=1e-5)


def test_a_compact_vocabulary_maps_back_onto_gpt2_ids(tmp_path):
    vocab = np.sort(np.random.default_rng(0).choice(N_GPT2 - 1, 40, replace=False)).tolist() + [N_GPT2 - 1]
    codec = Codec(vocab)  # 41 GPT-2 ids, then UNK
    config = GPTConfig(block_size=8, vocab_size=codec.vocab_size, n_layer=1, n_head=2, n_embd=16)
    model, path = save(tmp_path, config, {"vocab": vocab, "data_dir": ""})
    export.export(path, str(tmp_path / "hf"), "gpt2")
    back = load_hf_gpt2(str(tmp_path / "hf")).eval()
    assert back.config.vocab_size == N_GPT2
    oov = [i for i in range(100) if i not in vocab][:3]
    gpt2_ids = torch.tensor([vocab[:5] + oov[:3], vocab[5:13]])  # GPT-2 ids, three outside the vocabulary
    mine = torch.from_numpy(codec.encode_ids(gpt2_ids.numpy()))   # what the run's codec feeds its model
    with torch.no_grad():
        ours, theirs = model(mine)[0], back(gpt2_ids)[0]
    # the logits at the vocabulary's ids are the run's; every other id carries UNK's logit
    assert torch.allclose(theirs[..., vocab], ours[..., :len(vocab)], atol=1e-4)
    assert torch.allclose(theirs[..., oov], ours[..., codec.unk:codec.unk + 1].expand(-1, -1, 3), atol=1e-4)
    notes = open(tmp_path / "hf" / "EXPORT.md").read()
    assert "vocab.json" in notes and f"{N_GPT2 - len(vocab)} ids outside" in notes
    # the default keeps the compact ids: the run's logits and probabilities exactly
    export.export(path, str(tmp_path / "exact"))
    exact = load_hf_gpt2(str(tmp_path / "exact")).eval()
    with torch.no_grad():
        same = exact(mine)[0]
    assert exact.config.vocab_size == codec.vocab_size and torch.allclose(same, ours, atol=1e-5)
    assert torch.allclose(same.log_softmax(-1), ours.log_softmax(-1), atol=1e-5)
    assert "vocab.json[i]" in open(tmp_path / "exact" / "EXPORT.md").read()


def test_a_file_that_is_no_checkpoint_is_one_message_and_nothing_written(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "lab.export", "--ckpt", str(bad), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "not a readable checkpoint" in proc.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("transformers"), reason="transformers not installed")
@pytest.mark.parametrize("compact", [False, True])
def test_transformers_reads_the_export_with_the_same_logits(tmp_path, compact):
    """Outside the suite's dependencies: run where transformers is installed (README, "Export")."""
    import transformers
    vocab = list(range(0, 2000, 50)) + [N_GPT2 - 1] if compact else None
    codec = Codec(vocab) if compact else None
    config = GPTConfig(block_size=6, vocab_size=codec.vocab_size if compact else 23, n_layer=2, n_head=2, n_embd=16)
    model, path = save(tmp_path, config, {"vocab": vocab, "data_dir": ""} if compact else {"overlap": 0.25})
    export.export(path, str(tmp_path / "hf"), "gpt2")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.tensor([vocab[:6], vocab[6:12]]) if compact else torch.randint(0, 23, (4, 6))
    with torch.no_grad():
        theirs = hf(x).logits
        ours = model(torch.from_numpy(codec.encode_ids(x.numpy())) if compact else x)[0]
    if compact:
        theirs, ours = theirs[..., vocab], ours[..., :len(vocab)]
    assert (theirs - ours).abs().max() < 1e-4
