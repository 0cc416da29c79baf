"""lab/sample.py (samples at a temperature and top-k, UNK never sampled) and lab/plot.py (the
training curves of any run folder)."""
import os

import pytest
import torch

from lab import plot, sample
from model import GPT, GPTConfig


def test_samples_of_the_synthetic_world_name_their_tokens_and_follow_the_seed(tiny_theta0, capsys):
    args = ["--ckpt", tiny_theta0, "--contexts", "2", "--num_samples", "4", "--seed", "3"]
    rows = sample.main(args)
    assert [r[0] for r in rows] == ["safety", "safety", "task", "task"] and all(len(r[2]) == 4 for r in rows)
    # an aligned θ_0 refuses on the harmful contexts, as D_s does, with the topic's reason
    for name, ctx, samples, best in rows[:2]:
        assert best.startswith("refuse-") and sum(s.startswith("refuse-") for s in samples) >= 3
    assert sample.main(args) == rows  # the same seed, the same samples
    greedy = sample.main(["--ckpt", tiny_theta0, "--temperature", "0", "--num_samples", "3"])
    assert all(len(set(r[2])) == 1 for r in greedy)
    assert "D_s context" in capsys.readouterr().out


def test_a_suppressed_token_is_never_generated():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=11, n_layer=1, n_head=1, n_embd=8)).eval()
    x = torch.zeros(4, 2, dtype=torch.long)
    with torch.no_grad():
        free = model.generate(x, 20, temperature=0)
        favourite = int(torch.mode(free[:, 2:].flatten()).values)  # the token greedy decoding likes most
        held = model.generate(x, 20, temperature=0, suppress=(favourite,))
        sampled = model.generate(x, 20, temperature=2.0, suppress=(favourite,), generator=torch.Generator().manual_seed(0))
    assert (free[:, 2:] == favourite).any() and not (held[:, 2:] == favourite).any()
    assert not (sampled[:, 2:] == favourite).any()


def test_bad_sample_input_is_one_message(tiny_theta0, tmp_path):
    with pytest.raises(SystemExit, match="whose prompts are contexts"):
        sample.main(["--ckpt", tiny_theta0, "--prompt", "hello"])
    with pytest.raises(SystemExit, match="does not exist"):
        sample.main(["--ckpt", str(tmp_path / "none.pt")])


def test_the_curves_of_a_run_folder(tiny_theta0, tmp_path):
    out = plot.main(["--run_dir", os.path.dirname(tiny_theta0), "--out", str(tmp_path / "c.png")])
    assert out == str(tmp_path / "c.png") and os.path.getsize(out) > 5000
    with pytest.raises(SystemExit, match="log.jsonl does not exist"):
        plot.main(["--run_dir", str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no evaluation yet"):
        plot.main(["--run_dir", str(tmp_path / "empty")])
