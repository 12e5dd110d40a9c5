"""The package's import graph, read from the source with ``ast``: every import inside the package is
relative and resolves to a file by path (as an uninstalled checkout, grep and IDEs see it), the folders
form layers without cycles, and the bottom layer imports nothing of synpref.

Run as a script to print the folder graph: ``python tests/test_layering.py``.
"""
import ast
import os
import re
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = open(os.path.join(ROOT, "setup.py")).read()
PACKAGES = dict(re.findall(r'"(synpref[\w.]*)":\s*"([\w/]+)"', SETUP))  # package -> folder
TOP = sorted({folder.split("/")[0] for folder in PACKAGES.values()})
# Lower layers never import higher ones (folders on one line may import each other's modules downwards).
LAYERS = ["core", "schemas", "transforms", "runs", "formats", "training", "reporting", "pipelines", "demo", "cli"]


def package_files():
    for pkg, folder in PACKAGES.items():
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                yield pkg, folder, os.path.join(folder, name)


def resolve(folder: str, level: int, module: str) -> str:
    """The path (relative to ROOT, without .py) a relative import names, by folders alone."""
    parts = folder.split("/")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return "/".join(base + (module.split(".") if module else []))


def imports():
    """(importing file, imported path or None for an absolute synpref import, line)."""
    for pkg, folder, path in package_files():
        tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = resolve(folder, node.level, node.module or "")
                names = [a.name for a in node.names]
                yield path, target, names, node.lineno
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "synpref":
                yield path, None, [], node.lineno
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "synpref" for a in node.names):
                yield path, None, [], node.lineno


def exists(target: str, names: list) -> bool:
    full = os.path.join(ROOT, target)
    if os.path.isfile(full + ".py") or os.path.isfile(os.path.join(full, "__init__.py")):
        return True
    return False


def folder_of(path: str) -> str:
    return path.split("/")[0]


def folder_graph():
    graph = defaultdict(set)
    for path, target, _, _ in imports():
        if target is not None and folder_of(target) != folder_of(path):
            graph[folder_of(path)].add(folder_of(target))
    return graph


def test_every_import_inside_the_package_is_relative_and_resolves_by_path():
    absolute = [f"{p}:{line}" for p, t, _, line in imports() if t is None and p != "synpref/__init__.py"]
    assert not absolute, f"absolute synpref imports inside the package: {absolute}"
    unresolved = [f"{p}:{line} -> {t}" for p, t, names, line in imports() if t is not None and not exists(t, names)]
    assert not unresolved, unresolved


def test_folders_form_layers_without_cycles():
    graph = folder_graph()
    assert set(graph) | {t for ts in graph.values() for t in ts} <= set(LAYERS) | {"jobs", "synpref"}
    upward = [(a, b) for a, ts in graph.items() for b in ts if LAYERS.index(b) > LAYERS.index(a)]
    assert not upward, f"imports from a lower layer to a higher one: {upward}"
    assert not graph.get("core"), f"core imports {graph.get('core')}"


if __name__ == "__main__":
    for a, ts in sorted(folder_graph().items(), key=lambda kv: LAYERS.index(kv[0])):
        print(f"{a:>10} -> {', '.join(sorted(ts, key=LAYERS.index))}")
