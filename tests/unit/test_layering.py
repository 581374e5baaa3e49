"""The package reads in layers: tools -> training -> model -> hf / data / config -> the core modules.

Every ``simpo_megatron`` import (also those inside functions) must point to the same layer
or a lower one: an import running back up (model/ importing training/, say) fails here.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "simpo_megatron"

# Lower number = lower layer. Top-level modules and subpackages, by their first name.
LAYERS = {
    "fsutil": 0,
    "checkpoint_format": 0,
    "losses": 0,
    "logprobs": 0,
    "runtime": 0,
    "mathutil": 0,
    "saved_tensors": 0,
    # config reads its choices from data (tokenizer types) and losses (the loss registry).
    "config": 1,
    "hf": 1,
    "data": 1,
    "model": 2,
    "memory_estimate": 2,  # from the config alone; printed by training, run by cli
    "training": 3,
    "cli": 4,
    "example": 4,
    "testing": 4,
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "simpo_megatron" else None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "simpo_megatron")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_every_module_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_no_import_runs_back_up():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for module in _imports(path):
            there = _unit(module)
            if there in LAYERS and LAYERS[there] > LAYERS[here]:
                upward.append(f"{rel} imports {module}")
    assert not upward, "\n".join(sorted(upward))
