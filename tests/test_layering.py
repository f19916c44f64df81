"""kvslim's layers (issue 12): each module imports only from its own layer or below, and
no kvslim modules import each other in a cycle.

Imports are read from the source with ``ast``: module level and inside functions (the
lazy imports), but not ``if TYPE_CHECKING:`` blocks (type hints only). A dynamic import
(``importlib.import_module`` of a name in a variable) is not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# formats < kernels < cache < attention < models < engine < llm < cli / server; a module
# may import its own layer and those below it.
RANKS = {
    "kvslim.version": 0,
    "kvslim.units": 0,  # memory sizes as users write them
    "kvslim.atomic": 0,  # files written whole or not at all
    "kvslim.heap": 0,  # the process heap setting (standard library only)
    "kvslim.jit": 0,  # how numba links the kernels (every module with a kernel imports it)
    "kvslim.autotype": 0,  # --kv-cache-type auto: the choice from a quality table
    "kvslim.formats": 0,
    "kvslim.rotation": 1,  # the coding transforms and the torch rounding reference,
    "kvslim.rounding": 1,  # which the kernels run fused
    "kvslim.kernels": 2,  # every kernels.* module
    "kvslim.codec": 2,  # what a cache's rows are coded with (no model needed)
    "kvslim.cache": 3,
    "kvslim.kvfile": 3,  # one sequence's blocks saved to disk and restored into a pool
    "kvslim.attention": 4,
    "kvslim.weights": 4,  # weights as held (blocks in the mapped file), read by the models
    "kvslim.architectures": 5,  # the table of architectures (module, class, rope style)
    "kvslim.models": 5,  # every models.* module
    "kvslim.gguf_loader": 5,  # model files: metadata, weights, tokenizer, the store
    "kvslim.tokenizer": 5,
    "kvslim.store": 5,
    "kvslim.download": 5,  # resumable, verified HTTP downloads into the store
    "kvslim.gotemplate": 5,  # Ollama's Go chat templates as Jinja
    "kvslim.modelfile": 5,  # Modelfiles and model cards (create, show --modelfile)
    "kvslim.registry": 5,  # pulls from the Ollama registry
    "kvslim.pull": 5,  # `kvslim pull`: registry, Hugging Face, built-in
    "kvslim.engine": 6,
    "kvslim.sampling": 6,
    "kvslim.grammar": 6,  # constrained decoding: a grammar's token mask per sequence
    "kvslim.calibration": 6,  # runs the model to build a codec for the engine
    "kvslim.chat": 6,  # chat rendering and the one prompt-fitting policy
    "kvslim.prefix": 6,  # the prefix cache over the pool's pages, used by the engine
    "kvslim.settings": 7,  # arguments + environment -> settings for LLM, CLI, server
    "kvslim.llm": 7,
    "kvslim": 7,  # the package facade: `from kvslim import LLM`
    "kvslim.planner": 8,
    "kvslim.bench": 8,
    "kvslim.warmup": 6,  # compiles the CPU kernels (weights, attention) before a first token
    "kvslim.hf": 8,  # kvslim's cache as a transformers.Cache (beside the front ends)
    "kvslim.cli": 9,
    "kvslim.repl": 9,  # kvslim run's answers and interactive chat
    "kvslim.client": 9,  # a running server's Ollama API, for run, ps and stop
    "kvslim.server": 9,  # every server.* module
    "kvslim.ray": 9,  # replicas of the server on Ray Serve, and their routing
}

def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "kvslim").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported(source: str, modules: set[str]) -> set[str]:
    """kvslim modules a source imports anywhere except under ``if TYPE_CHECKING:``;
    ``from kvslim.x import y`` counts as kvslim.x.y when that is a module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kvslim")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "kvslim":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        visit(node)

    visit(ast.parse(source))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {m: imported(p.read_text(), names) - {m} for m, p in files.items()}


def rank(module: str) -> int | None:
    """The rank of a module or of the nearest package above it that has one."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        got = RANKS.get(".".join(parts[:n]))
        if got is not None:
            return got
    return None


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_walker_sees_lazy_imports_and_skips_type_checking():
    src = ("from typing import TYPE_CHECKING\nfrom kvslim import formats\n"
           "if TYPE_CHECKING:\n    from kvslim.cache import KVCache\n"
           "def f():\n    import kvslim.engine\n    from kvslim.kernels import cpu\n")
    mods = {"kvslim.formats", "kvslim.cache", "kvslim.engine", "kvslim.kernels",
            "kvslim.kernels.cpu"}
    assert imported(src, mods) == {"kvslim.formats", "kvslim.engine", "kvslim.kernels.cpu"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_every_module_has_a_layer():
    assert [m for m in module_files() if rank(m) is None] == []


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (rank {rank(m)}) imports {d} (rank {rank(d)})"
           for m, deps in import_graph().items() for d in sorted(deps) if rank(d) > rank(m)]
    assert bad == []


def test_kernels_import_only_formats_and_the_transforms():
    allowed = {"kvslim.formats", "kvslim.rotation", "kvslim.rounding", "kvslim.atomic",
               "kvslim.jit"}
    bad = {m: deps for m, deps in import_graph().items() if m.startswith("kvslim.kernels")
           and any(not (d in allowed or d.startswith("kvslim.kernels")) for d in deps)}
    assert bad == {}


def test_no_import_cycle():
    assert [sorted(c) for c in cycles(import_graph())] == []
