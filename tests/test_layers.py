"""The package layering (README, "Source layout"): each package imports only packages of a lower layer, so no
upper package reaches sideways into another (train and evaluate share the task layer instead of each other).
Every import counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import deltatune

ROOT = Path(deltatune.__file__).parent
LAYERS = [
    {"core"},
    {"methods", "quant", "models"},
    {"data", "runtime", "trackers"},
    {"task", "combine"},
    {"train", "evaluate", "serve", "gguf", "classification"},  # siblings: none imports another
    {"sweep", "generation", "studio"},
    {"cli", "__init__"},  # the public API names lower layers lazily (PEP 562)
    {"__main__"},
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported(path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The deltatune top packages an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("deltatune.")]
    if node.level == 0:
        return [node.module.split(".")[1]] if node.module and node.module.startswith("deltatune.") else []
    here = list(path.relative_to(ROOT).parts[:-1])
    base = here[: len(here) - (node.level - 1)]
    if base:
        return [base[0]]
    return [node.module.split(".")[0]] if node.module else [a.name for a in node.names]


def test_every_import_goes_to_a_lower_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert {_package(f) for f in files} <= set(LAYER), "a new top package: give it a layer here and in README"
    wrong = []
    for path in files:
        mine = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(path, node):
                    if target != mine and target in LAYER and LAYER[target] >= LAYER[mine]:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not wrong, wrong
