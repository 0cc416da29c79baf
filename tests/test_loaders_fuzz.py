"""Property-based tests: the data loaders meet random, malformed JSON, JSONL and CSV.
Every case must end in either a valid dataset or the project's own DataError naming
the file; never a traceback from deep inside json, csv or the loader."""
import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import DataError
from realtext.loaders import load_csv, load_examples, load_instruction_json, load_jsonl, load_prompts

FIELDS = ["instruction", "input", "output", "prompt", "response", "goal", "label", "text", "x"]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), children, max_size=5),
    max_leaves=20)
records = st.lists(st.dictionaries(st.sampled_from(FIELDS), scalars, max_size=5) | json_values, max_size=6)


def mangle(text, data):
    """Cut, splice or keep a text: truncated files and stray characters."""
    how = data.draw(st.sampled_from(["keep", "cut", "insert"]))
    if how == "cut" and text:
        return text[: data.draw(st.integers(0, len(text)))]
    if how == "insert":
        i = data.draw(st.integers(0, len(text)))
        return text[:i] + data.draw(st.sampled_from(['"', ",", "\n", "{", "]", "\x00", "é", '\\'])) + text[i:]
    return text


def check(loader, name, content, **kw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb" if isinstance(content, bytes) else "w", **({} if isinstance(content, bytes)
                                                                         else {"encoding": "utf-8"})) as f:
            f.write(content)
        try:
            out = loader(path, **kw)
        except DataError as e:
            assert path in str(e), f"the error does not name the file: {e}"
            return
        assert len(out) > 0
        for ex in out:
            prompt = ex if isinstance(ex, str) else ex.prompt
            assert isinstance(prompt, str)
            if not isinstance(ex, str):
                assert ex.response is None or isinstance(ex.response, str)


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(records, st.data())
def test_random_json_ends_in_a_dataset_or_a_clear_error(recs, data):
    text = mangle(json.dumps(recs), data)
    check(load_instruction_json, "data.json", text)
    check(load_examples, "data.json", text)
    check(load_prompts, "prompts.json", text)


@SETTINGS
@given(st.lists(records.map(json.dumps) | st.text(max_size=30), max_size=6), st.data())
def test_random_jsonl_ends_in_a_dataset_or_a_clear_error(lines, data):
    text = mangle("\n".join(lines), data)
    check(load_jsonl, "data.jsonl", text)
    check(load_prompts, "prompts.jsonl", text)


cells = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\'x')), max_size=8)


@SETTINGS
@given(st.lists(st.sampled_from(["prompt", "response", "goal", "label", "", "x"]), max_size=4),
       st.lists(st.lists(cells, max_size=5), max_size=6), st.data())
def test_random_csv_ends_in_a_dataset_or_a_clear_error(header, rows, data):
    def line(cells):
        quoted = data.draw(st.booleans())
        return ",".join('"' + c.replace('"', '""') + '"' if quoted else c for c in cells)
    text = mangle("\n".join([line(header)] + [line(r) for r in rows]), data)
    check(load_csv, "data.csv", text, prompt_column="prompt")
    check(load_examples, "data.csv", text)
    check(load_prompts, "prompts.csv", text)


@SETTINGS
@given(st.binary(max_size=64))
def test_random_bytes_end_in_a_clear_error_or_a_dataset(blob):
    for loader, name in ((load_instruction_json, "d.json"), (load_jsonl, "d.jsonl"),
                         (load_examples, "d.csv"), (load_prompts, "p.txt")):
        check(loader, name, blob)
