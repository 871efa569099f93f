"""The house rule of docs/architecture.md: a module imports only from the layers before it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gptstack"
# The order of docs/architecture.md's module table.
LAYERS = ["files", "runtime", "config", "tokenizer", "chat", "data", "loss", "_kernels", "ops", "kv_cache", "model", "crf", "heads", "lora", "crypto",
          "dcp_io", "checkpoint", "sharded_checkpoint", "train", "inference", "evaluate", "adapt", "tune", "interop", "serve", "cli"]


def imported_layers(path: Path) -> set[str]:
    """The top-level gptstack modules that ``path`` imports."""
    own = list(path.relative_to(PACKAGE).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = own[:-node.level] if node.level <= len(own) else []
            names = (node.module or "").split(".") if node.module else [a.name for a in node.names]
            target = (base + names)[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptstack."):
            target = node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            target = next((a.name.split(".")[1] for a in node.names if a.name.startswith("gptstack.")), None)
        else:
            continue
        if target:
            found.add(target)
    return found


def test_every_module_imports_only_earlier_layers():
    broken = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if layer == "__init__":
            continue
        assert layer in LAYERS, f"{path} is in no layer; add it to LAYERS and docs/architecture.md"
        for target in imported_layers(path) - {layer}:
            assert target in LAYERS, f"{path} imports unknown module {target}"
            if LAYERS.index(target) > LAYERS.index(layer):
                broken.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not broken, broken
