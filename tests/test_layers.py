"""The package's import graph: no cycles between modules, and components never import the jobs built on them.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in a function-level
import fails here too. Layers, lowest first (docs/architecture.md): a module may import its own layer and those
below, never above. The top layer is the `jobs` sub-package, so the tree shows the cut too; module-level imports
are the rule, and `test_imports_inside_functions_say_why` holds the exceptions to a reason each.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "src" / "imagen_transfer"
LAYERS = [
    {"errors", "outputs", "config", "text", "unet", "checkpoint", "metrics", "masks", "sources", "memory", "runs",
     "openmp"},  # foundations
    {"cascade", "diffusion", "data", "transfer"},  # the model and its math, data sets
    {"interop", "sampling", "dense", "datasets", "shard", "step", "fusion", "judge", "scratch", "detection",
     "segmentation", "protocol", "task_size", "fits"},  # built on the model
    {"measure", "evaluate", "quality", "train", "features", "backbone", "probe", "dense_probe", "backbone_probe", "probe_report"},  # tasks: one result each
    {"jobs.demo", "jobs.study", "jobs.study_report", "jobs.report", "jobs.cli"},  # whole experiments, the command line
]
# Imports that go against the graph on purpose, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}


def module_names() -> set[str]:
    """Dotted names inside the package ('train', 'jobs.cli'), packages' __init__ and __main__ left out."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
            if p.stem not in ("__init__", "__main__")}


def imports_of(module: str) -> set[str]:
    """The package modules that `module` imports (relative imports resolved against its own package)."""
    parts = module.split(".")
    names = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = parts[: len(parts) - node.level]
            if node.module:
                names.add(".".join(base + [node.module]))
            else:
                names.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imagen_transfer."):
            names.add(node.module.removeprefix("imagen_transfer."))
    return names


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(m) & modules for m in modules}


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


# Modules whose imports stay inside functions wholesale, with the reason.
LAZY_MODULES = {"jobs.cli": "`imagen-transfer --help` and argument errors answer before torch loads"}


def test_imports_inside_functions_say_why():
    """Imports sit at the top of a module, where its dependencies show; one inside a function (a cycle broken on
    purpose, an optional package, a backend chosen late) carries a comment on its line or the line above."""
    unexplained = []
    for module in sorted(module_names() - set(LAZY_MODULES)):
        lines = (PACKAGE / f"{module.replace('.', '/')}.py").read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        unexplained.append(f"{module}:{node.lineno}: {here.strip()}")
    assert not unexplained, f"imports inside functions without a reason: {unexplained}"


def test_every_function_reads_in_one_screen():
    """No function in the package is longer than 80 lines (docstring included): longer ones get split."""
    long = []
    for module in sorted(module_names()):
        tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
        long += [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, f"functions over 80 lines: {long}"
