"""The package's layers: imports go one way, and no stage imports another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "pipeline"
# Each layer may import the layers after it, never one before it (cli wires the stages together).
LAYERS = ["cli", "stages", "tuning", "kaggle", "engine", "store", "options", "config", "errors"]


def layer_of(module: str) -> str:
    """'pipeline.stages.train' -> 'stages'; 'pipeline.config' -> 'config'."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            if node.module == "pipeline":
                found |= {f"pipeline.{alias.name}" for alias in node.names}
            elif node.module.count(".") == 1 and layer_of(node.module) in ("stages", "tuning", "engine",
                                                                           "store", "kaggle"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline.")}
    return found


def modules() -> dict[str, Path]:
    return {".".join(("pipeline", *p.relative_to(PACKAGE).with_suffix("").parts)): p
            for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_belongs_to_a_layer_and_imports_go_one_way() -> None:
    assert {layer_of(m) for m in modules()} - {"__main__"} <= set(LAYERS)
    for module, path in modules().items():
        if module == "pipeline.__main__":
            continue
        mine = LAYERS.index(layer_of(module))
        for target in imports_of(path):
            theirs = LAYERS.index(layer_of(target))
            assert theirs >= mine, f"{module} imports {target}: a lower layer imports a higher one"


def test_no_stage_imports_another() -> None:
    stages = {m for m in modules() if layer_of(m) == "stages"}
    assert len(stages) >= 10
    for module in stages:
        assert not imports_of(modules()[module]) & stages, module


def test_the_kaggle_client_is_imported_only_by_its_package() -> None:
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        clients = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                   and any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
                           == "kaggle" for a in n.names)]
        assert not clients or layer_of(module) == "kaggle", module
