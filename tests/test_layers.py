"""The package's import graph: no cycles between modules, and components never import the jobs built on them.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in a function-level
import fails here too. Layers, lowest first (docs/architecture.md): a module may import its own layer and those
below, never above.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "src" / "imagen_transfer"
LAYERS = [
    {"errors", "outputs", "config", "text", "unet", "checkpoint", "metrics"},  # foundations
    {"cascade", "diffusion", "data", "transfer"},  # the model and its math, data sets
    {"interop", "sampling", "dense", "step", "fusion", "judge", "quality"},  # built on the model
    {"train", "evaluate", "features", "probe", "dense_probe", "report"},  # jobs
    {"demo", "study", "study_report", "cli"},  # whole experiments and the command line
]
# Imports that go against the graph on purpose, each with its reason.
ALLOWED = {
    ("data", "dense"): "a detection / segmentation set reads as image tiles through load_dataset (lazy import)",
    ("quality", "evaluate"): "KID while training generates through evaluate.generate_images",
}


def imports_of(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: imports_of(PACKAGE / f"{m}.py") & modules for m in modules}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(graph()) == placed, f"unplaced: {set(graph()) - placed}, gone: {placed - set(graph())}"


def test_no_module_imports_a_layer_above_it():
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = sorted((m, d) for m, deps in graph().items() for d in deps
                    if level[d] > level[m] and (m, d) not in ALLOWED)
    assert not upward, f"imports against the layering: {upward}"


def test_no_import_cycles():
    g = {m: {d for d in deps if (m, d) not in ALLOWED} for m, deps in graph().items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
