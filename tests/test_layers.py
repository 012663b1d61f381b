"""The rule of the house, held against the code: which layer may import which, and no import cycles.

Bottom to top (qwen3/__init__.py draws the same map):

    foundation  qwen3 (the face), errors, config, runtime, atomic, allocator: what every layer may use
    model       the decoder and what travels with it            may import the foundation
    data        text -> tokens                                  may import the foundation
    infer       generation, chat, demo, export                  may import model and data
    train       the loop, its stages, evaluation, run files     may import model, data and infer: the
                                                                samples and the chat scores generate
                                                                through the inference engine
    server      the HTTP API and page                           may import model, data and infer, never train
    cli         the `qwen3` command                             may import anything; nothing imports it

Every import statement counts, those inside functions (lazy) and under TYPE_CHECKING included. The
face hands its names on through importlib when they are first read, so it imports nothing when it
is imported, and any module may take `__version__` from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qwen3

PACKAGE = Path(qwen3.__file__).parent
FOUNDATION = {"qwen3", "qwen3.errors", "qwen3.config", "qwen3.runtime", "qwen3.atomic", "qwen3.allocator"}
COMMAND_LINE = {"qwen3.cli", "qwen3.__main__"}
LAYERS = ["foundation", "model", "data", "infer", "train", "server", "cli"]
MAY_IMPORT = {
    "foundation": {"foundation"},
    "model": {"foundation", "model"},
    "data": {"foundation", "data"},
    "infer": {"foundation", "model", "data", "infer"},
    "train": {"foundation", "model", "data", "infer", "train"},
    "server": {"foundation", "model", "data", "infer", "server"},
    "cli": set(LAYERS),
}
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = module_files()


def layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module in COMMAND_LINE:
        return "cli"
    return module.split(".")[1]


def imported_modules(path: Path) -> set[str]:
    """The qwen3 modules a file imports anywhere in it: `from A import B` is module A.B when that is
    a module, else A."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                         for alias in node.names)
    return {name for name in found if name == "qwen3" or name.startswith("qwen3.")}


def import_graph() -> dict[str, set[str]]:
    return {module: imported_modules(path) for module, path in MODULES.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'A (layer) -> B (layer)' for every import the rule forbids."""
    return [f"{module} ({layer(module)}) -> {target} ({layer(target)})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if layer(target) not in MAY_IMPORT[layer(module)]
            or (target in COMMAND_LINE and module != "qwen3.__main__")]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), and any
    module that imports itself."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.get(module, ()):
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_rule_finds_what_it_forbids() -> None:
    """The checks themselves: an upward import, an import of the command line and a cycle are found."""
    graph = {"qwen3.model.decoder": {"qwen3.train.loop"}, "qwen3.train.loop": {"qwen3.model.decoder"},
             "qwen3.server.app": {"qwen3.train.evaluate", "qwen3.infer.engine"}, "qwen3.infer.engine": {"qwen3.cli"}}
    assert layer_violations(graph) == ["qwen3.infer.engine (infer) -> qwen3.cli (cli)",
                                       "qwen3.model.decoder (model) -> qwen3.train.loop (train)",
                                       "qwen3.server.app (server) -> qwen3.train.evaluate (train)"]
    assert cycles(graph) == [["qwen3.model.decoder", "qwen3.train.loop"]]


def test_the_walk_reads_every_kind_of_import() -> None:
    graph = import_graph()
    assert {"qwen3.train.stages", "qwen3.train.state", "qwen3.model.checkpoint"} <= graph["qwen3.train.loop"]
    assert "qwen3.train.loop" in graph["qwen3.cli"]  # imported inside a function
    assert "qwen3" in graph["qwen3.train.state"]  # `from qwen3 import __version__`
    assert set(MODULES) > {"qwen3", "qwen3.cli", "qwen3.model.decoder", "qwen3.train.stages.sft"}


def test_no_layer_imports_one_above_it() -> None:
    assert layer_violations(import_graph()) == []


def test_no_import_cycles_lazy_imports_included() -> None:
    assert cycles(import_graph()) == []


def test_every_module_is_on_a_layer() -> None:
    assert {layer(module) for module in MODULES} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_says_why_it_exists_and_stays_short(module: str) -> None:
    path = MODULES[module]
    source = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(source)), f"{path} has no docstring"
    assert source.count("\n") <= MAX_LINES, f"{path} has {source.count(chr(10))} lines, more than {MAX_LINES}"


def test_the_face_hands_on_the_public_names() -> None:
    from qwen3 import Muon, load_model, save_model  # the contract of the package's face

    assert (load_model.__module__, save_model.__module__, Muon.__module__) == (
        "qwen3.model.checkpoint", "qwen3.model.checkpoint", "qwen3.train.muon")
    for name in qwen3.EXPORTS:
        assert getattr(qwen3, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        qwen3.nothing  # noqa: B018
