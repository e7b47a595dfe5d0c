"""The import graph of kvlab, read from the sources with `ast`: no cycles, and no import from a lower layer
to a higher one. Lazy imports (inside functions) and importlib.import_module("kvlab...") count too.

The layers, lowest first; a module may import modules of its own layer and of the layers below:
  kernels     kvlab.kernels (the top-level kernels/ folder): Numba kernels, no kvlab imports but their own
  types       the type table
  arrays      kvlab._xp: numpy / torch interop
  core        quant, rotation, flash, rope, shape, _progress, _io, _threads: the API boundary and small shared
              helpers
  split       the meta backend model
  accuracy    error of quantized attention (uses split.cuda: which CUDA FA kernel a pair gets)
  hf          Hugging Face transformers
  ggml, tp    the real ggml/llama.cpp (checks split, accuracy and hf against it); tensor parallelism
  viz         figures, widgets, report
  cli         one module per subcommand
Façades are exempt as importers: kvlab/__init__ (the public API) and the `__main__` entry points (python -m
kvlab, python -m kvlab.tp: they run the CLI). Importing the kvlab façade from inside the package costs
everything it re-exports, so as an import it sits in the highest layer it imports, and it takes part in
cycles. EXEMPT lists the imports allowed anyway, each with its reason (and each must still exist).
"""
import ast
from pathlib import Path
import shutil

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    ("kvlab.kernels",),
    ("kvlab.types",),
    ("kvlab._xp",),
    ("kvlab.quant", "kvlab.rotation", "kvlab.flash", "kvlab.rope", "kvlab.shape", "kvlab._progress", "kvlab._io",
     "kvlab._threads"),
    ("kvlab.split",),
    ("kvlab.accuracy",),
    ("kvlab.hf",),
    ("kvlab.ggml", "kvlab.tp"),
    ("kvlab.viz",),
    ("kvlab.cli",),
)
FACADES = frozenset({"kvlab", "kvlab.__main__", "kvlab.tp.__main__"})
EXEMPT = {   # (importer, imported): why
    ("kvlab.accuracy.table", "kvlab"): "versions() reads kvlab.__version__ (the one place it is written, for "
                                       "pyproject too) inside the function, when the package is imported",
}


def module_files(root: Path = ROOT) -> dict:
    """{module name: path} for every module of the package; kernels/ is kvlab.kernels (pyproject package-dir)."""
    found = {}
    for base, prefix in ((root / "kvlab", ("kvlab",)), (root / "kernels", ("kvlab", "kernels"))):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if rel.parts[0] == "kernels" and prefix == ("kvlab",):   # a link to kernels/ in some checkouts
                continue
            parts = prefix + rel.with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(source: str, module: str, is_package: bool) -> set:
    """Every dotted name the source imports (or hands to importlib.import_module), anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def resolve(name: str, modules) -> str | None:
    """The kvlab module a dotted name lands in (`from kvlab.x import f` -> kvlab.x), None outside kvlab."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict:
    """{module: set of kvlab modules it imports}."""
    files = module_files(root)
    return {m: {t for n in imported_names(p.read_text(), m, p.name == "__init__.py")
                if (t := resolve(n, files)) is not None and t != m}
            for m, p in files.items()}


def layer_of(module: str, layers=LAYERS) -> int | None:
    best = None
    for i, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    return None if best is None else best[0]


def without(graph: dict, exempt) -> dict:
    return {m: {t for t in targets if (m, t) not in exempt} for m, targets in graph.items()}


def upward_imports(graph: dict, layers=LAYERS, facades=FACADES) -> list:
    """(importer, imported) pairs where a lower layer imports a higher one; a façade counts as the highest
    layer it imports."""
    def layer(m):
        if m in facades:
            return max((layer_of(t, layers) for t in graph.get(m, ()) if t not in facades), default=len(layers))
        return layer_of(m, layers)
    return sorted((m, t) for m, targets in graph.items() if m not in facades for t in targets if layer(t) > layer(m))


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (or a module importing itself); the
    `__main__` entry points are left out (nothing imports them)."""
    nodes = sorted(m for m in graph if not m.endswith("__main__"))
    edges = {m: sorted(t for t in graph[m] if t in graph and not t.endswith("__main__")) for m in nodes}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    assert len(graph) > 50 and "kvlab.kernels.q4_0" in graph and "kvlab.split.state" in graph
    assert [m for m in graph if m not in FACADES and layer_of(m) is None] == []


def test_no_import_cycles(graph):
    assert cycles(without(graph, EXEMPT)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    assert upward_imports(without(graph, EXEMPT)) == []


def test_every_exemption_is_still_needed(graph):
    assert [pair for pair in EXEMPT if pair[1] not in graph.get(pair[0], ())] == []


def test_lazy_relative_and_importlib_imports_are_seen():
    source = ("import numpy\n"
              "def f():\n    from kvlab.viz import plots\n"
              "def g():\n    from . import state\n    from .. import rotation\n"
              "def h():\n    importlib.import_module('kvlab.cli.sweep')\n")
    names = imported_names(source, "kvlab.split.graph", is_package=False)
    assert names == {"numpy", "kvlab.viz.plots", "kvlab.split.state", "kvlab.rotation", "kvlab.cli.sweep"}


def test_violating_imports_in_the_sources_are_caught(tmp_path):
    """A copy of the package's sources with a lazy upward import and a cycle added."""
    python_only = lambda folder, names: [n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir()]
    for folder in ("kvlab", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=python_only, symlinks=True)
    rope, shape = tmp_path / "kvlab" / "rope.py", tmp_path / "kvlab" / "shape.py"
    rope.write_text(rope.read_text() + "\n\ndef _late():\n    from kvlab.ggml import meta_child\n")
    shape.write_text(shape.read_text() + "\nfrom kvlab.rope import rope\n")
    rope.write_text(rope.read_text() + "from kvlab.shape import HeadShape\n")
    graph = without(import_graph(tmp_path), EXEMPT)
    assert upward_imports(graph) == [("kvlab.rope", "kvlab.ggml.meta_child")]
    assert cycles(graph) == [["kvlab.rope", "kvlab.shape"]]


def test_the_checks_fail_on_a_violating_graph():
    layers = (("p.low",), ("p.mid",), ("p.high",))
    graph = {"p.low.a": {"p.low.b"}, "p.low.b": {"p.mid.c"},            # low -> mid: upward
             "p.mid.c": {"p.low.a", "p.mid.d"}, "p.mid.d": {"p.mid.c"},  # a -> b -> c -> a and c <-> d: one cycle
             "p": {"p.mid.d"}, "p.low.f": {"p"}, "p.high.e": {"p"}}     # the façade sits in mid: low -> p is up
    assert upward_imports(graph, layers, facades={"p"}) == [("p.low.b", "p.mid.c"), ("p.low.f", "p")]
    assert cycles(graph) == [["p.low.a", "p.low.b", "p.mid.c", "p.mid.d"]]
    through_facade = {**graph, "p.mid.d": {"p"}}                        # p -> d -> p
    assert cycles(through_facade) == [["p", "p.mid.d"], ["p.low.a", "p.low.b", "p.mid.c"]]
    assert cycles({"p.low.a": {"p.low.a"}}) == [["p.low.a"]]
    assert upward_imports({"p.low.a": {"p.low.b"}, "p.low.b": set()}, layers, facades=set()) == []
    assert upward_imports(without(graph, {("p.low.b", "p.mid.c"), ("p.low.f", "p")}), layers, facades={"p"}) == []
