"""The model of THEORY.md §1: causal, scored on response tokens only."""
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, sequence_nll


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"block_size": 8, "vocab_size": 40, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw}))


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny().eval()
    idx = torch.randint(0, 40, (3, 8))
    logits, _ = m(idx)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % 40
    logits2, _ = m(changed)
    assert torch.equal(logits[:, :5], logits2[:, :5])
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])


def test_loss_mask_ignores_prompt_targets_and_equals_manual_mean():
    m = tiny().eval()
    idx, tgt = torch.randint(0, 40, (4, 6)), torch.randint(0, 40, (4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 3:] = True
    logits, loss = m(idx, tgt, mask)
    tgt2 = tgt.clone()
    tgt2[:, :3] = (tgt2[:, :3] + 1) % 40  # change only masked-out targets
    _, loss2 = m(idx, tgt2, mask)
    assert torch.equal(loss, loss2)
    manual = F.cross_entropy(logits[:, 3:].reshape(-1, 40), tgt[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_sequence_nll_is_minus_log_prob_of_the_response():
    m = tiny().eval()
    idx, tgt = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    logits, _ = m(idx)
    nll = sequence_nll(logits, tgt, mask)
    logp = F.log_softmax(logits, -1)
    manual = -(logp[:, 4].gather(1, tgt[:, 4:5]).squeeze(1) + logp[:, 5].gather(1, tgt[:, 5:6]).squeeze(1))
    torch.testing.assert_close(nll, manual)


def test_vocab_padding_is_cut_from_logits_and_weights_are_tied():
    m = tiny()
    assert m.lm_head.weight.shape[0] == 64 and m(torch.zeros(1, 3, dtype=torch.long))[0].shape[-1] == 40
    assert m.lm_head.weight is m.transformer.wte.weight
    names = dict(m.named_parameters())
    for n in ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
              "transformer.ln_f.weight"]:
        assert n in names


def test_greedy_generate_extends_with_argmax():
    m = tiny().eval()
    idx = torch.randint(0, 40, (2, 3))
    out = m.generate(idx, 3, temperature=0)
    assert out.shape == (2, 6) and torch.equal(out[:, :3], idx)
    logits, _ = m(out[:, :3])
    assert torch.equal(out[:, 3], logits[:, -1].argmax(-1))
