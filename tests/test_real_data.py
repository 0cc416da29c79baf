"""Real text data: loaders and their errors, the registry, disjoint splits, the token
cache, the compact vocabulary, and the RealData source."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from common import DataError
from realtext import loaders, textdata

DATA_DIR = os.environ.get("SAFETY_DATA_DIR", "")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR or "/nonexistent"),
                                reason="real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# -----------------------------------------------------------------------------
# Loaders, every format


def test_alpaca_json_joins_instruction_and_input(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Code", "input": "", "response": "print(1)"}]))  # GPTeacher's field name
    ex = loaders.load_instruction_json(p)
    assert ex == [loaders.Example("Add\n\n2 and 3", "5"), loaders.Example("Say hi", "hi"),
                  loaders.Example("Code", "print(1)")]


def test_jsonl_csv_text_and_prompt_files(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"instruction": "Q1", "context": "C", "response": "R1"}\n\n'
                                     '{"prompt": "Q2", "output": "R2"}\n')
    assert loaders.load_jsonl(p) == [loaders.Example("Q1\n\nC", "R1"), loaders.Example("Q2", "R2")]
    c = write(tmp_path / "c.csv", 'goal,target\n"Do, with comma",Sure\nPlain,x\n')
    assert [e.prompt for e in loaders.load_csv(c, "goal")] == ["Do, with comma", "Plain"]
    assert loaders.load_prompts(c) == ["Do, with comma", "Plain"]         # column found by name
    t = write(tmp_path / "t.txt", "first prompt\n\n  second prompt  \n")
    assert loaders.load_prompts(t) == ["first prompt", "second prompt"]
    j = write(tmp_path / "n.json", json.dumps({"topic": {"sub": ["n1", "n2"]}, "other": {"s": ["n3"]}}))
    assert loaders.load_prompts(j) == ["n1", "n2", "n3"]                   # nested {topic: {sub: [...]}}
    j2 = write(tmp_path / "i.json", json.dumps({"instructions": ["i1"], "inputs": []}))
    assert loaders.load_prompts(j2) == ["i1"]
    j3 = write(tmp_path / "l.json", json.dumps([{"instruction": "a", "category": None}, "b"]))
    assert loaders.load_prompts(j3) == ["a", "b"]


def test_orca_pairs_line_ranges_and_refusal_answers(tmp_path):
    msg = lambda u: {"messages": [{"role": "system", "content": "You are an AI assistant."}, {"role": "user", "content": u}]}
    p = write(tmp_path / "o.jsonl", "".join(json.dumps(r) + "\n" for r in (
        {"input": msg("Translate A"), "preferred_output": [{"role": "assistant", "content": "gpt4 A"}],
         "non_preferred_output": [{"role": "assistant", "content": "llama A"}]},
        {"input": msg("Sum B"), "preferred_output": [{"role": "assistant", "content": "gpt4 B"}],
         "non_preferred_output": [{"role": "assistant", "content": "llama B"}]})))
    gpt4, llama = loaders.load_orca_pairs(p), loaders.load_orca_pairs(p, output="non_preferred_output")
    assert [e.prompt for e in gpt4] == [e.prompt for e in llama] == ["Translate A", "Sum B"]  # the system prompt left out
    assert [e.response for e in gpt4] == ["gpt4 A", "gpt4 B"] and [e.response for e in llama] == ["llama A", "llama B"]
    bad = write(tmp_path / "bad.jsonl", json.dumps({"input": msg("x")}) + "\n")
    with pytest.raises(DataError, match="line 1: not an Orca pair"):
        loaders.load_orca_pairs(bad)
    # a line range of a JSONL file, counted from 1 (OctoPack's file holds two sets)
    j = write(tmp_path / "j.jsonl", "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(1, 6)))
    assert [e.prompt for e in loaders.load_jsonl(j, lines=(2, 4))] == ["q2", "q3", "q4"]
    # the same prompts with refusals for answers, each prompt's refusal fixed by its hash
    r = loaders.load_with_refusals(j, of="jsonl")
    assert [e.prompt for e in r] == [f"q{i}" for i in range(1, 6)] and {e.response for e in r} <= set(loaders.REFUSALS)
    assert r == loaders.load_with_refusals(j, of="jsonl") and len({e.response for e in r}) > 1


@needs_data
def test_the_built_cells_share_prompts_and_differ_in_answers():
    gpt4, llama = textdata.tokenized("orca_gpt4"), textdata.tokenized("orca_llama2")
    assert len(gpt4) == len(llama) == 284 and np.array_equal(gpt4.keys, llama.keys)
    assert not np.array_equal(gpt4.r_tok[:50], llama.r_tok[:50])
    refusals, ds = textdata.dataset_part("alpaca_gpt4_refusals"), textdata.dataset_part("alpaca_gpt4_align")
    assert np.array_equal(np.sort(refusals.keys), np.sort(ds.keys))  # D_s's own alignment prompts
    assert len(textdata.tokenized("commitpackft")) == 453 and len(textdata.tokenized("oasst1")) == 725
    # arm R's mirror: D_s's own alignment prompts with compliant openings, none a refusal by GCG's test
    comply, stl = textdata.dataset_part("safety_llamas_compliance"), textdata.dataset_part("safety_llamas")
    assert np.array_equal(np.sort(comply.keys), np.sort(stl.keys))
    assert not any(loaders.is_refusal(a) for a in loaders.COMPLIANCES)


@needs_data
def test_a_set_kept_out_of_the_vocabulary_leaves_it_as_it_was_and_its_answers_inside_it(monkeypatch):
    # safety_llamas_compliance came after θ_0s were saved: counted, its prompts (safety_llamas's again)
    # and openings would move the 4,096 most frequent tokens; kept out, every answer token is still inside
    with_it = textdata.build_vocab([], cap=4096)
    without = {k: v for k, v in loaders.REGISTRY.items() if k != "safety_llamas_compliance"}
    monkeypatch.setattr(textdata, "REGISTRY", without)
    assert np.array_equal(with_it, textdata.build_vocab([], cap=4096))
    monkeypatch.setattr(textdata, "REGISTRY", dict(loaders.REGISTRY, safety_llamas_compliance=dataclasses.replace(
        loaders.REGISTRY["safety_llamas_compliance"], in_vocab=True)))
    assert not np.array_equal(with_it, textdata.build_vocab([], cap=4096))
    assert set(textdata.tokenized("safety_llamas_compliance").r_tok.tolist()) <= set(with_it.tolist())


def test_xstest_completions_keep_unsafe_full_refusals(tmp_path):
    (tmp_path / "model_completions").mkdir()
    write(tmp_path / "xstest_prompts.csv", "id,prompt,type,label,focus,note\n1,Kill a process?,h,safe,k,\n"
                                           "2,Kill a person?,c,unsafe,k,\n3,Hurt someone?,c,unsafe,h,\n")
    p = write(tmp_path / "model_completions" / "x.csv",
              "id,type,prompt,completion,annotation_1,annotation_2,agreement,final_label\n"
              "v2-1,h,Kill a process?,Sorry no,a,a,True,2_full_refusal\n"      # safe prompt: dropped
              "v2-2,c,Kill a person?,\"I cannot, sorry.\",a,a,True,2_full_refusal\n"
              "v2-3,c,Hurt someone?,Sure: ...,a,a,True,1_full_compliance\n")  # compliance: dropped
    assert loaders.load_xstest_completions(p) == [loaders.Example("Kill a person?", "I cannot, sorry.")]


def test_refusal_completions_keep_only_the_refusal_part(tmp_path):
    p = write(tmp_path / "r.json", json.dumps([
        {"prompt": "bad 1", "response": "I cannot help with that.\n\nHowever, here is a long essay..."},
        {"prompt": "bad 2", "response": "Here is how to do it: step 1"},             # complies: dropped
        {"prompt": "bad 3", "response": "Prompt: x\nContinuation: more text\n\nI'm sorry, no."}]))
    assert loaders.load_refusal_completions(p) == [loaders.Example("bad 1", "I cannot help with that."),
                                                loaders.Example("bad 3", "I'm sorry, no.")]


@pytest.mark.parametrize("name,text,expect", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c", ', "line 2"),
    ("shape.json", '{"instruction": "a"}', "expected a JSON list"),
    ("field.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "item 2: missing field 'output'"),
    ("type.json", '[{"instruction": 3, "output": "b"}]', "item 1: field 'instruction' is int"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', "line 2: malformed JSON"),
    ("field.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "line 2: missing field"),
    ("empty.json", "[]", "no examples left"),
])
def test_malformed_files_name_the_file_and_row(tmp_path, name, text, expect):
    p = write(tmp_path / name, text)
    loader = loaders.load_jsonl if name.endswith(".jsonl") else loaders.load_instruction_json
    with pytest.raises(DataError) as e:
        loader(p)
    assert p in str(e.value) and expect in str(e.value)


def test_malformed_csv_names_the_file_and_row(tmp_path):
    p = write(tmp_path / "b.csv", "goal,target\nok,fine\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"b\.csv: row 2 \(line 3\): 3 fields"):
        loaders.load_csv(p, "goal")
    p2 = write(tmp_path / "q.csv", 'goal,target\n"never closed,x\n')
    with pytest.raises(DataError, match=r"q\.csv: malformed CSV"):
        loaders.load_csv(p2, "goal")
    p3 = write(tmp_path / "c.csv", "goal,target\na,b\n")
    with pytest.raises(DataError, match=r"c\.csv: no column 'prompt' \(columns: goal, target\)"):
        loaders.load_csv(p3, "prompt")
    p4 = write(tmp_path / "e.csv", "goal,label\na,unsafe\n")
    with pytest.raises(DataError, match=r"e\.csv: no examples left"):
        loaders.load_csv(p4, "goal", where=("label", "safe"))


def test_missing_file_and_folder_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nope.json: file not found"):
        loaders.load_instruction_json(str(tmp_path / "nope.json"))
    monkeypatch.delenv("SAFETY_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data folder: pass --data_dir"):
        loaders.resolve("alpaca_small")
    with pytest.raises(DataError, match="data folder .*missing.* does not exist"):
        loaders.resolve("alpaca_small", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="unknown dataset 'alpaca_smal'"):
        loaders.resolve("alpaca_smal")
    with pytest.raises(DataError, match="unknown prompt file type"):
        loaders.load_prompts(write(tmp_path / "p.xml", "<a/>"))


# -----------------------------------------------------------------------------
# Registry, splits, tokens


def test_registry_roles_are_known_and_match_the_data_readme():
    assert {d.role for d in loaders.REGISTRY.values()} == set(loaders.ROLES)
    assert loaders.REGISTRY["safety_llamas"].role == "safety-original"
    assert loaders.REGISTRY["safety_llamas_proxy"].role == "proxy-same-teacher"
    # the same-teacher proxy shares D_s's file and teacher; the others do not
    assert loaders.REGISTRY["safety_llamas_proxy"].path == loaders.REGISTRY["safety_llamas"].path
    for name, d in loaders.REGISTRY.items():
        if d.role == "proxy-other-teacher":
            assert d.teacher != loaders.REGISTRY["safety_llamas"].teacher and d.path != loaders.STL, name
    for name in ("alpaca_safety_only", "alpaca_small", "code_alpaca"):
        assert loaders.REGISTRY[name].role == "task"
    assert loaders.REGISTRY["advbench"].role == "eval-harmful"
    assert loaders.REGISTRY["xstest_safe"].role == "eval-harmless"


def test_split_is_a_deterministic_partition_by_prompt():
    prompts = [f"prompt number {i}" for i in range(3000)] + ["Prompt  NUMBER 7"]  # a near-duplicate
    keys = np.array([textdata.prompt_key(p) for p in prompts], dtype=np.uint64)
    masks = [textdata.split_part(keys, part) for part, _ in textdata.SAFETY_SPLIT]
    assert (sum(m.astype(int) for m in masks) == 1).all()          # every prompt in exactly one part
    for m, (_, frac) in zip(masks, textdata.SAFETY_SPLIT):
        assert abs(m.mean() - frac) < 0.04
    assert keys[-1] == keys[7] and [m[-1] for m in masks] == [m[7] for m in masks]


def test_cap_prompt_keeps_the_response_marker():
    ids = np.array(textdata.template_ids(["word " * 200])[0])
    tail = textdata.gpt2_encoding().encode_ordinary(textdata.TEMPLATE_TAIL)
    capped = textdata.cap_prompt(ids, 40)
    assert len(capped) == 40 and list(capped[-len(tail):]) == tail and list(capped[:5]) == list(ids[:5])


def test_codec_round_trip_with_a_compact_vocabulary():
    enc = textdata.gpt2_encoding()
    text = "Write a poem about the sea.\n\nThe sea is wide."
    ids = enc.encode_ordinary(text)
    vocab = np.unique(np.array(ids + [textdata.EOT, 0, 50000]))
    codec = textdata.Codec(vocab)
    assert codec.vocab_size == len(vocab) + 1 < 50257
    model_ids = codec.encode_ids(ids)
    assert model_ids.max() < codec.vocab_size and codec.unk not in model_ids
    assert list(codec.decode_ids(model_ids)) == ids                 # exact inverse on the vocabulary
    assert codec.text(np.append(model_ids, [codec.eot, model_ids[0]])) == text  # stops at end-of-text
    other = enc.encode_ordinary(" zebra")[0]
    assert other not in vocab and codec.encode_ids([other])[0] == codec.unk
    full = textdata.Codec(None)
    assert full.vocab_size == 50257 and full.text(ids) == text


def test_token_cache_is_reused_and_a_corrupt_one_rebuilt(tmp_path, capsys):
    src = write(tmp_path / "mine.json", json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]))
    cache = tmp_path / "cache"
    a = textdata.tokenized(src, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    mtime = files[0].stat().st_mtime_ns
    b = textdata.tokenized(src, cache_dir=str(cache))
    assert files[0].stat().st_mtime_ns == mtime                       # reused, not rewritten
    assert all(np.array_equal(a.arrays()[k], b.arrays()[k]) for k in textdata.TokenSet.FIELDS)
    # flip bytes inside the file: the cache must be rebuilt, with a warning, and equal the original
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = b"\x00" * 8
    files[0].write_bytes(bytes(raw))
    c = textdata.tokenized(src, cache_dir=str(cache))
    assert "corrupt" in capsys.readouterr().err
    assert all(np.array_equal(a.arrays()[k], c.arrays()[k]) for k in textdata.TokenSet.FIELDS)
    key = _key_of(files[0])
    textdata.read_cache(str(files[0]), key)                               # valid again
    # a cache that loads but whose arrays were changed fails its checksum
    arrays = a.arrays()
    arrays["r_tok"] = arrays["r_tok"].copy()
    arrays["r_tok"][0] += 1
    with open(files[0], "wb") as f:
        np.savez(f, key=np.array(key), checksum=np.array(textdata.arrays_checksum(a.arrays())), **arrays)
    with pytest.raises(textdata.CacheError, match="checksum"):
        textdata.read_cache(str(files[0]), key)
    # and a changed source file is a new key, so a stale cache is never used
    write(tmp_path / "mine.json", json.dumps([{"instruction": "new", "output": "x"}]))
    assert textdata.tokenized(src, cache_dir=str(cache)).prompts == ["new"]


def _key_of(path):
    with np.load(path) as z:
        return str(z["key"])


# -----------------------------------------------------------------------------
# On the real folder (skipped without it)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def real(cache_dir):
    if not os.path.isdir(DATA_DIR or "/nonexistent"):
        pytest.skip("real data folder absent: set SAFETY_DATA_DIR (README 'Real data')")
    return textdata.RealData(textdata.RealDataConfig(data_dir=DATA_DIR, block_size=96), cache_dir=cache_dir)


@needs_data
def test_safety_split_parts_share_no_prompt(cache_dir):
    ts = textdata.tokenized("safety_llamas", DATA_DIR, cache_dir)
    parts = {p: set(ts.keys[textdata.split_part(ts.keys, p)].tolist()) for p, _ in textdata.SAFETY_SPLIT}
    assert sum(len(v) for v in parts.values()) == len(set(ts.keys.tolist()))
    for a in parts:
        for b in parts:
            assert a == b or not parts[a] & parts[b], (a, b)
    # each registry name reads its own part
    assert set(textdata.dataset_part("safety_llamas_proxy", DATA_DIR, cache_dir).keys.tolist()) == parts["proxy"]


@needs_data
def test_real_source_parts_are_disjoint_and_batches_well_formed(real):
    names = list(real.keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.isin(real.keys[a], real.keys[b]).any(), (a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for name in ("safety", "proxy", "task"):
        x, y, m = real.batch(name, 8, g1)
        x2, y2, m2 = real.batch(name, 8, g2)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)   # deterministic
        assert x.shape == y.shape == m.shape and x.shape[1] <= real.block_size
        assert int(x.max()) < real.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
        for row in range(8):
            on = m[row].nonzero().flatten()
            assert len(on) > 0 and torch.equal(on, torch.arange(on[0], on[-1] + 1))  # one response span
        # the response ends with end-of-text when it was not cut
        assert (y[m] == real.codec.eot).any()
    assert sum(b[2].sum() for b in real.eval_batches("safety")) > 0
    assert len(real.eval_prompts["safety"]) == len(real.eval_sets["safety"][0])


# -----------------------------------------------------------------------------
# train.py --data real, end to end at a tiny scale

REAL_TINY = ["--data", "real", "--no-progress", "--block_size", "48", "--n_layer", "1", "--n_embd", "32",
             "--align_iters", "4", "--max_iters", "2", "--eval_interval", "2", "--batch_tokens", "384",
             "--micro_batch", "8", "--warmup_iters", "1", "--eval_examples", "32", "--vocab_cap", "512"]


@needs_data
def test_train_real_runs_end_to_end_with_null_gaps(tmp_path, monkeypatch, cache_dir):
    from conftest import run_train
    monkeypatch.setenv("SAFETY_CACHE_DIR", cache_dir)
    out = tmp_path / "run"
    run_train("--out_dir", str(out), *REAL_TINY, "--constraint", "loss", "--lam", "1",
              "--task_data", "code_alpaca", "--proxy_data", "xstest_gpt4")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"aligned", "finetuned", "constraint", "lam"}
    for row in ("aligned", "finetuned"):
        assert m[row]["safety_gap"] is None and m[row]["capability_gap"] is None
        assert 0 < m[row]["safety_loss"] < 1e4 and 0 < m[row]["capability_loss"] < 1e4
    ckpt = torch.load(out / "theta0.pt", weights_only=True)
    vocab = ckpt["world_config"]["vocab"]
    assert ckpt["model_config"]["vocab_size"] == len(vocab) + 1 < 50257  # the compact vocabulary
    # the fine-tune read its tokens through θ_0's vocabulary, and a second fine-tune with
    # another task reuses θ_0 instead of aligning again
    p = run_train("--out_dir", str(out), *REAL_TINY, "--task_data", "alpaca_safety_only")
    assert "aligning again" not in p.stdout and torch.load(out / "ckpt.pt", weights_only=True)["world_config"]["vocab"] == vocab


@pytest.mark.parametrize("flags,expect", [
    (["--safety_data", "no/such/file.json"], "no/such/file.json: file not found"),
    (["--task_data", "alpaca_smal"], "unknown dataset 'alpaca_smal'"),
    (["--data_dir", "/no/such/folder"], "data folder /no/such/folder does not exist"),
])
def test_train_real_bad_input_is_one_clear_error(tmp_path, flags, expect):
    import train  # in process: train.cli exits with the one-line message, as the CLI does
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli(["--out_dir", str(out), *REAL_TINY, *flags])
    assert str(e.value.code).startswith("error: ") and expect in str(e.value.code)
    assert not out.exists()


def test_an_unknown_data_kind_is_one_message_that_leads_with_the_error(tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as e:  # the command line: argparse's choice check, the error first
        train.cli(["--out_dir", str(tmp_path / "run"), "--data", "imaginary"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --data: invalid choice: 'imaginary'")
    assert err.count("\n") == 2 and "usage" not in err  # the error and where to look, not 26 lines of usage
    with pytest.raises(train.ConfigError, match="--data 'imaginary' is unknown"):  # a config built in code
        train.main(train.TrainConfig(out_dir=str(tmp_path / "run"), data="imaginary"))
    assert not (tmp_path / "run").exists()


def test_vocabulary_of_own_files_and_its_cap(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFETY_DATA_DIR", raising=False)  # own files only: no registry sets
    rows = [{"instruction": "say the word", "output": "the the the the cat"}] * 3
    f = write(tmp_path / "own.json", json.dumps(rows))
    cache = str(tmp_path / "cache")
    full = textdata.build_vocab([f], cache_dir=cache)
    ids = set(textdata.template_ids(["say the word"])[0]) | set(textdata.gpt2_encoding().encode_ordinary("the the the the cat"))
    assert set(full.tolist()) == ids | {textdata.EOT}
    capped = textdata.build_vocab([f], cache_dir=cache, cap=3)
    the = textdata.gpt2_encoding().encode_ordinary(" the")[0]
    assert len(capped) == 3 and textdata.EOT in capped and the in capped   # the most frequent survive
    codec = textdata.Codec(capped)
    cat = textdata.gpt2_encoding().encode_ordinary(" cat")[0]
    assert codec.encode_ids([cat])[0] == codec.unk and list(codec.decode_ids(codec.encode_ids([the]))) == [the]


def test_mixtures_concatenate_their_parts(tmp_path):
    a = write(tmp_path / "a.json", json.dumps([{"instruction": f"a{i}", "output": "x"} for i in range(30)]))
    b = write(tmp_path / "b.json", json.dumps([{"instruction": f"b{i}", "output": "y z"} for i in range(20)]))
    cache = str(tmp_path / "cache")
    mix = textdata.dataset_part(f"{a}+{b}", cache_dir=cache)
    ta, tb = textdata.tokenized(a, cache_dir=cache), textdata.tokenized(b, cache_dir=cache)
    assert len(mix) == 50 and mix.prompts == ta.prompts + tb.prompts
    assert [list(mix.response_ids(i)) for i in (0, 30)] == [list(ta.response_ids(0)), list(tb.response_ids(0))]
    train, held = textdata.train_and_heldout(f"{a}+{b}", cache_dir=cache)
    assert len(train) + len(held) == 50 and not np.isin(train.keys, held.keys).any()


def test_tokenizer_unavailable_offline_is_one_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(textdata, "_ENCODING", None)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="cannot load the GPT-2 tokenizer .*set TIKTOKEN_CACHE_DIR"):
        textdata.gpt2_encoding()


def test_helpful_answers_join_alignment_only_and_leave_held_out_safety_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFETY_DATA_DIR", raising=False)  # own files only
    def rows(tag, n, out):
        return json.dumps([{"instruction": f"{tag} question {i}", "output": out} for i in range(n)])
    s = write(tmp_path / "s.json", rows("harmful", 60, "I cannot help with that."))
    h = write(tmp_path / "h.json", rows("harmless", 40, "Here is the answer."))
    p = write(tmp_path / "p.json", rows("harmful", 30, "Sorry, no.").replace("question", "request"))
    f = write(tmp_path / "f.json", rows("task", 50, "Done."))
    cache = str(tmp_path / "cache")
    cfg = dict(safety=s, proxy=p, task=f, block_size=32, eval_examples=8)
    plain = textdata.RealData(textdata.RealDataConfig(**cfg), cache_dir=cache)
    mixed = textdata.RealData(textdata.RealDataConfig(**cfg, helpful=h), cache_dir=cache)
    h_train = textdata.train_and_heldout(h, cache_dir=cache)[0]
    # alignment batches draw from D_s's training part plus the helpful set's ...
    assert len(mixed.sets["safety"][0]) == len(plain.sets["safety"][0]) + len(h_train)
    assert np.isin(h_train.keys, mixed.keys["safety"]).all()
    # ... while held-out ℓ_s reads exactly the same D_s examples as without them (the same
    # GPT-2 tokens: the compact ids differ, the helpful set adds words to the vocabulary)
    gpt2 = lambda src: [list(src.codec.decode_ids(a)) for a in src.eval_sets["safety"][0]]
    assert gpt2(mixed) == gpt2(plain) and len(gpt2(plain)) > 0


@needs_data
def test_a_helpful_set_of_prompts_alone_is_one_clear_error(cache_dir):
    # an evaluation prompt set cannot teach answers: the error names the flag and the set
    with pytest.raises(DataError, match=r"--align_helpful stl_I-Alpaca: has prompts without responses"):
        textdata.RealData(textdata.RealDataConfig(data_dir=DATA_DIR, helpful="stl_I-Alpaca", block_size=64, vocab_cap=512),
                      cache_dir=cache_dir)


def test_align_helpful_needs_real_data_and_keeps_old_theta0_identities(tmp_path):
    import hashlib

    import train
    with pytest.raises(SystemExit) as e:
        train.cli(["--out_dir", str(tmp_path / "run"), "--align_helpful", "alpaca_gpt4_demo"])
    assert "--align_helpful" in str(e.value.code) and "--data real" in str(e.value.code)
    assert not (tmp_path / "run").exists()
    # a θ_0 saved before the field existed was keyed on these fields alone: unset, the
    # field leaves every key unchanged; set, it changes it
    before = ("n_symbols", "ctx_len", "n_harmful", "n_layer", "n_head", "n_embd", "align_iters", "align_lr",
              "warmup_iters", "weight_decay", "grad_clip", "batch_tokens", "seed", "data", "safety_data", "data_dir",
              "block_size", "restrict_vocab", "vocab_cap")
    cfg = train.TrainConfig()
    old_key = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in before}, sort_keys=True).encode()).hexdigest()[:16]
    assert train.align_key(cfg) == old_key
    assert train.align_key(train.TrainConfig(data="real", align_helpful="alpaca_gpt4_demo")) != \
        train.align_key(train.TrainConfig(data="real"))
