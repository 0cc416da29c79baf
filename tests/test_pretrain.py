"""Starting points: the pretraining corpus keeps out every prompt a later run trains or evaluates on,
`--stage pretrain` trains θ_pre and `--init_from` aligns from it or from a Hugging Face GPT-2 folder,
and every bad starting point is one clear message with nothing written.

The tests build a small data folder of their own (a few registry files and general text), so they need
neither the real data nor much time; one test reads the real folder when it is there."""
import gzip
import json
import os

import pytest
import torch
from test_hf_gpt2 import random_hf_gpt2, reference_logits, write_safetensors

from common import DataError
from conftest import run_train
from realtext import corpus, loaders, textdata

SHARED_PROMPTS = [f"Name a colour of the flag number {i}." for i in range(12)]  # in alpaca_small and the harmless list


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data folder with D_s (safety_llamas), a task (alpaca_small), general text and harmless instructions."""
    d = tmp_path_factory.mktemp("data")
    write_json(d / loaders.STL, [{"instruction": f"How do I hurt person {i}?", "input": "",
                                  "output": "I'm sorry, but I cannot help with that."} for i in range(80)])
    write_json(d / "alpaca_small_2k/alpaca_small.json",
               [{"instruction": p, "input": "", "output": "Red, white and blue."} for p in SHARED_PROMPTS]
               + [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(60)]
               + [{"instruction": "Tell a story.", "input": "", "output": "The cat sat on the mat. The dog sat on the log."}])
    write_json(d / "refusal_direction_splits/harmless_train.json",
               [{"instruction": p} for p in SHARED_PROMPTS] + [{"instruction": f"Describe a river, case {i}."}
                                                               for i in range(40)])
    os.makedirs(d / "hh_rlhf_harmless")
    with gzip.open(d / "hh_rlhf_harmless/test.jsonl.gz", "wt") as f:  # the first human turn is a prompt of a task
        for p in SHARED_PROMPTS[:3] + ["What is a river?"]:
            f.write(json.dumps({"chosen": f"\n\nHuman: {p}\n\nAssistant: Let me think."}) + "\n")
    os.makedirs(d / "general_text")
    with open(d / "general_text/wiki_demo.txt", "w") as f:
        for i in range(300):  # context predicts the next word: a model beats the unigram entropy
            f.write(f"The cat number {i % 60} sat on the mat, case {i // 60}. The dog number {i % 60} sat on the log.\n")
    return str(d)


@pytest.fixture
def env(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_DATA_DIR", folder)
    monkeypatch.setenv("SAFETY_CACHE_DIR", str(tmp_path / "cache"))
    return folder


# -----------------------------------------------------------------------------
# The corpus


def test_corpus_drops_every_prompt_a_later_set_holds(env):
    docs, dropped = corpus.corpus_documents("wiki_demo+harmless_instructions+hh_rlhf", env)
    assert dropped == len(SHARED_PROMPTS) + 3 and len(docs["harmless_instructions"]) == 40
    assert [p for _, p in docs["hh_rlhf"]] == ["What is a river?"]  # a dialogue's first human turn is its prompt
    assert corpus.leaks(docs, env) == []
    # independently of leaks(): no corpus prompt is in any part of any registry set of the folder
    later = {int(k) for n in ("alpaca_small", "safety_llamas", "safety_llamas_eval", "safety_llamas_proxy")
             for k in textdata.dataset_part(n, env).keys}
    mine = {textdata.prompt_key(p) for ds in docs.values() for _, p in ds if p is not None}
    assert mine and not mine & later
    assert all(p is None for _, p in docs["wiki_demo"])  # general text has no prompt
    assert corpus.leaks({"wiki_demo": [("x", SHARED_PROMPTS[0])]}, env) == [SHARED_PROMPTS[0]]  # leaks() finds one


@pytest.mark.parametrize("sources,expect", [
    ("safety_llamas", "part align of a split"),
    ("wiki_demo+safety_llamas_eval", "part eval of a split"),
    ("advbench", "eval-harmful"),
    ("wiki_demo+no_such_source", "not a corpus source"),
    ("", "--pretrain_data is empty"),
])
def test_corpus_refuses_parts_held_out_or_trained_on_later(sources, expect):
    with pytest.raises(DataError, match=expect):
        corpus.check_sources(sources)


def test_corpus_batches_are_every_token_and_evaluation_is_fixed(env):
    c = corpus.Corpus(corpus.CorpusConfig(sources="wiki_demo", data_dir=env, block_size=16, eval_examples=8))
    x, y, m = c.batch("general", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and bool(m.all())
    a, b = list(c.eval_batches("general")), list(c.eval_batches("general"))
    assert len(a) == 1 and torch.equal(a[0][0], b[0][0]) and a[0][0].shape == (8, 16)
    assert 0 < c.stats["heldout_tokens"] < c.stats["train_tokens"]


@pytest.mark.skipif(not os.path.isdir(os.environ.get("SAFETY_DATA_DIR", "/nonexistent")),
                    reason="real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")
def test_real_corpus_of_the_paper_preset_holds_no_later_prompt():
    from lab import presets
    sources = presets.PAPER_REAL_CPU_TRAIN["pretrain_data"]
    docs, dropped = corpus.corpus_documents(sources)
    assert dropped > 0 and corpus.leaks(docs) == []
    # the held-out parts, which the reports evaluate on, by their own split
    for n in ("alpaca_gpt4_align", "alpaca_small_task", "code_alpaca", "safety_llamas"):
        held = {int(k) for k in textdata.train_and_heldout(n)[1].keys}
        assert not held & {textdata.prompt_key(p) for ds in docs.values() for _, p in ds if p is not None}, n


# -----------------------------------------------------------------------------
# --stage pretrain and --init_from a checkpoint

TINY = ["--data", "real", "--no-progress", "--block_size", "32", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--batch_tokens", "256", "--micro_batch", "8", "--warmup_iters", "2", "--eval_examples", "16",
        "--vocab_cap", "0", "--pretrain_data", "wiki_demo+harmless_instructions"]


PRETRAIN = ["--stage", "pretrain", "--pretrain_iters", "60", "--eval_interval", "30"]


def pretrain(out, *extra):
    run_train("--out_dir", str(out), *PRETRAIN, *TINY, *extra)
    return out


@pytest.fixture(scope="module")
def theta_pre(folder, tmp_path_factory):
    """One θ_pre of the TINY recipe, pretrained once for the tests of this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SAFETY_DATA_DIR", folder)
    mp.setenv("SAFETY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        yield pretrain(tmp_path_factory.mktemp("pre"))
    finally:
        mp.undo()


def test_pretrain_beats_the_unigram_entropy_and_is_reused(env, theta_pre):
    out = theta_pre
    ckpt = torch.load(out / "theta_pre.pt", weights_only=True)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert ckpt["kind"] == "theta_pre" and ckpt["corpus"]["general_loss"] < ckpt["corpus"]["unigram_entropy"]
    assert log[-1]["general_loss"] < log[0]["general_loss"]
    p = run_train("--out_dir", str(out), *PRETRAIN, *TINY)
    assert "nothing to do" in p.stdout


def test_alignment_starts_from_theta_pre_exactly(env, tmp_path, theta_pre):
    import train
    pre = theta_pre
    out = tmp_path / "align"
    # lr 0: θ_0 must be θ_pre itself, so the weights were loaded, not re-initialised
    run_train("--out_dir", str(out), "--stage", "align", "--init_from", str(pre / "theta_pre.pt"), "--align_iters", "1",
              "--align_lr", "0", *TINY)
    a, b = torch.load(pre / "theta_pre.pt", weights_only=True), torch.load(out / "theta0.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["world_config"]["vocab"] == b["world_config"]["vocab"]
    # θ_0's identity holds the starting point's weights: a scratch θ_0 of the same recipe is another one
    cfg = train.parse_args(["--out_dir", str(out), "--init_from", str(pre / "theta_pre.pt"), "--align_iters", "1",
                            "--align_lr", "0", *TINY])
    assert b["align_key"] == train.align_key(cfg) != train.align_key(train.parse_args(TINY + ["--align_iters", "1",
                                                                                               "--align_lr", "0"]))


@pytest.mark.parametrize("corpus_sources,flags,expect", [
    ("", ["--vocab_cap", "64"], "another vocabulary (--vocab_cap 0; this run 64)"),
    ("", ["--n_embd", "64"], "pass --n_layer 1 --n_head 2 --n_embd 32"),
    ("wiki_demo+alpaca_small", ["--task_data", "alpaca_small"], "was pretrained on alpaca_small"),
])
def test_a_bad_theta_pre_is_one_clear_error(env, tmp_path, theta_pre, corpus_sources, flags, expect):
    import train
    pre = pretrain(tmp_path / "pre", "--pretrain_data", corpus_sources) if corpus_sources else theta_pre
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli(["--out_dir", str(out), "--init_from", str(pre / "theta_pre.pt"), *TINY, *flags])
    assert str(e.value.code).startswith("error: ") and expect in str(e.value.code)
    assert not out.exists()


def test_a_run_on_prompts_theta_pre_saw_is_refused(env, tmp_path, theta_pre):
    """θ_pre keeps the harmless instructions no registry set holds; a user's task file asking them is refused."""
    import train
    own = tmp_path / "own.json"
    own.write_text(json.dumps([{"instruction": f"Describe a river, case {i}.", "output": "Wide."} for i in range(30)]))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli(["--out_dir", str(out), "--init_from", str(theta_pre / "theta_pre.pt"), *TINY, "--task_data", str(own)])
    assert "was pretrained on" in str(e.value.code) and "prompts of this run's task part" in str(e.value.code)
    assert not out.exists()


def test_two_run_checkpoints_of_one_theta0_are_two_starting_points(env, tmp_path, theta_pre):
    import train
    from realtext import startpoints
    ckpt = torch.load(theta_pre / "theta_pre.pt", weights_only=True)
    for i in (1, 2):  # runs fine-tuned from one θ_0 store its hash, not their own
        run = dict(ckpt, kind="finetune-resume", theta0_hash="same", model={k: v + i for k, v in ckpt["model"].items()})
        torch.save(run, tmp_path / f"run{i}.pt")
    ids = {startpoints.init_identity(train.parse_args(["--init_from", str(tmp_path / f"run{i}.pt"), *TINY]))
           for i in (1, 2)}
    assert len(ids) == 2


# -----------------------------------------------------------------------------
# --init_from gpt2: a random folder in Hugging Face's layout with GPT-2's full vocabulary

GPT2_CFG = {"model_type": "gpt2", "vocab_size": textdata.N_GPT2, "n_positions": 64, "n_embd": 32, "n_layer": 1,
            "n_head": 2, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
GPT2_FLAGS = ["--init_from", "gpt2", "--no-restrict_vocab", "--n_layer", "1", "--n_head", "2", "--n_embd", "32"]
SHAPE_FLAGS = ("--n_layer", "--n_head", "--n_embd")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    sd = random_hf_gpt2(GPT2_CFG)
    (d / "config.json").write_text(json.dumps(GPT2_CFG))
    write_safetensors(d / "model.safetensors", sd)
    return d, sd


def test_gpt2_start_computes_gpt2_then_aligns_and_finetunes(env, tmp_path, hf_dir):
    import train
    from realtext import startpoints
    d, sd = hf_dir
    # no shape flag and no --no-restrict_vocab: the folder says both (its config.json, GPT-2's vocabulary)
    unshaped = [f for i, f in enumerate(TINY) if not (f in SHAPE_FLAGS or i and TINY[i - 1] in SHAPE_FLAGS)]
    argv = ["--out_dir", str(tmp_path / "run"), "--hf_dir", str(d), *unshaped, *GPT2_FLAGS[:2], "--align_iters", "2",
            "--max_iters", "2", "--eval_interval", "2"]
    cfg = train.parse_args(argv)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.restrict_vocab) == (1, 2, 32, False)  # not the defaults 2, 4, 64
    world = train.make_world(cfg)
    model = startpoints.initial_model(cfg, world, train.setup_system(cfg)).eval()
    idx = torch.randint(0, GPT2_CFG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # cut to the run's 32 positions, the model is still GPT-2's function
        assert torch.allclose(model(idx)[0], reference_logits(sd, GPT2_CFG, idx), atol=1e-4, rtol=0)
    run_train(*argv)
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["finetuned"]["distance"] > 0 and 0 < m["aligned"]["safety_loss"] < 1e4


@pytest.mark.parametrize("flags,expect", [
    (["--init_from", "gpt2"], "--init_from gpt2 needs --hf_dir"),
    ([*GPT2_FLAGS[:2], "--restrict_vocab", "--hf_dir", "HF"], "add --no-restrict_vocab"),
    ([*GPT2_FLAGS, "--hf_dir", "EMPTY"], "no GPT-2 weights"),
    ([*GPT2_FLAGS[:3], "--hf_dir", "HF"], "pass --n_layer 1 --n_head 2 --n_embd 32"),
    ([*GPT2_FLAGS[:3], "--n_layer", "1", "--hf_dir", "HF"], "not the --n_head 4, --n_embd 64 given"),
    (["--init_from", "no/such/theta_pre.pt"], "no such checkpoint"),
    (["--hf_dir", "HF"], "--hf_dir is read by --init_from gpt2 only"),
])
def test_a_bad_gpt2_start_is_one_clear_error(env, tmp_path, hf_dir, flags, expect):
    import train
    (tmp_path / "empty").mkdir()
    flags = [{"HF": str(hf_dir[0]), "EMPTY": str(tmp_path / "empty")}.get(f, f) for f in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli(["--out_dir", str(out), *TINY, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", *flags])
    assert str(e.value.code).startswith("error: ") and expect in str(e.value.code)
    assert not out.exists()
