"""The house rules a reader relies on (shared/DESIGN.md, README "Layout"): the method's six files and
two support modules at the top, imports one way (harness → method → real-text data → model, data, system →
common), no cycles, and every file and function small enough to hold at once."""
import ast
import os
import re

import pytest

from conftest import ROOT

# a module's layer; an import may only go to a layer at or below its own, and never round a cycle
LAYERS = {"common": 0, "model": 1, "data": 1, "system": 1, "realtext": 2,
          "constraints": 3, "evaluate": 3, "theory": 3, "train": 3, "lab": 4}
METHOD = {"model", "data", "constraints", "train", "evaluate", "theory"}
SUPPORT = {"common", "system"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def project_files(root=ROOT, with_tests=False):
    """{module name: path} of every Python file of the project (tests only if asked)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and (with_tests or d != "tests"))
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports_of(path, modules):
    """The project modules a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lab import sweep` imports the module lab.sweep; `from lab.plan import x` lab.plan
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer(module):
    return LAYERS.get(module.split(".")[0])


def layout_errors(graph):
    """Every breach of the rules in {module: imported modules}: a module outside the layers, an import
    that goes up a layer, and each cycle (named by its modules in order)."""
    errors = [f"{m} is in no layer of the layout" for m in graph if layer(m) is None]
    errors += [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}): imports go down the layers only"
               for a, bs in sorted(graph.items()) for b in sorted(bs)
               if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    state, stack = {}, []

    def visit(m):  # depth-first; a node met again while still on the stack closes a cycle
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                errors.append("import cycle: " + " → ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    return errors


def project_graph():
    modules = project_files()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_the_checker_finds_a_cycle_and_a_wrong_way_import():
    assert layout_errors({"train": {"model"}, "model": {"common"}, "common": set()}) == []
    cycle = layout_errors({"train": {"evaluate"}, "evaluate": {"theory"}, "theory": {"train"}})
    assert cycle == ["import cycle: evaluate → theory → train → evaluate"]
    wrong = layout_errors({"theory": {"lab.forecast"}, "lab.forecast": set()})
    assert wrong == ["theory (layer 3) imports lab.forecast (layer 4): imports go down the layers only"]
    assert layout_errors({"helpers": set()}) == ["helpers is in no layer of the layout"]


def test_imports_run_one_way_with_no_cycle():
    graph = project_graph()
    assert {"train", "lab.sweep", "realtext.textdata"} <= set(graph)  # the walk found the tree
    assert "lab.forecast" in graph["lab.worker"] and "realtext.textdata" in graph["train"]
    assert layout_errors(graph) == []


def test_the_top_level_is_the_method_and_two_support_modules():
    top = {m for m in project_files() if "." not in m and not os.path.isdir(os.path.join(ROOT, m))}
    assert top == METHOD | SUPPORT


def test_every_file_and_function_fits_in_one_reading():
    long_files, long_functions = [], []
    for m, path in project_files(with_tests=True).items():
        text = open(path, encoding="utf-8").read()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{m}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name}: {n} lines")
    assert (long_files, long_functions) == ([], [])


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_every_layer_has_its_files(module):
    modules = project_files()
    assert any(m == module or m.startswith(module + ".") for m in modules)


def test_the_readme_is_a_door_with_the_reading_order_it_promises():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.count("\n") <= 250
    # the reading order's line counts are the files' own (to 10%: a small edit need not touch the README)
    rows = re.findall(r"^\| \d \| `(\w+\.py)` \| (\d+) \|", text, flags=re.M)
    assert {f for f, _ in rows} == {f"{m}.py" for m in METHOD}
    for f, n in rows:
        actual = open(os.path.join(ROOT, f), encoding="utf-8").read().count("\n")
        assert abs(actual - int(n)) <= 0.1 * actual, f"README says {f} has {n} lines; it has {actual}"
    # every preset with a published folder has its line in the results index, and its README exists
    for preset in sorted(os.listdir(os.path.join(ROOT, "results"))):
        assert f"(results/{preset}/README.md)" in text
        assert os.path.exists(os.path.join(ROOT, "results", preset, "README.md"))
