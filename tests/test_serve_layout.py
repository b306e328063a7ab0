"""serve/ stays readable by role: no module over ~500 lines, and the engine object is touched only
where it is built and wrapped (`engine_client`, `deployments`). The import layers themselves are
checked by `lint-imports` (.importlinter, run by `make test`)."""
from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[1] / "serve"
MAX_LINES = 500
ENGINE_OWNERS = {"engine_client.py", "deployments.py"}


def test_no_serve_module_is_over_500_lines():
    sizes = {str(p.relative_to(SERVE)): len(p.read_text(encoding="utf-8").splitlines()) for p in SERVE.rglob("*.py")}
    assert len(sizes) > 30
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_only_the_engine_client_reaches_into_the_engine():
    """No serve module reads the engine's private state (`engine._models`, `engine._tasks`...) or
    imports `AvatarEngine` to build one, except the engine boundary."""
    offenders = []
    for path in SERVE.rglob("*.py"):
        if path.name in ENGINE_OWNERS and path.parent == SERVE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == "_models":
                offenders.append(f"{path.name}:{node.lineno} '_models'")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr in ("engine", "_engine"):
                offenders.append(f"{path.name}:{node.lineno} .engine.{node.attr}")
            if isinstance(node, ast.ImportFrom) and any(a.name == "AvatarEngine" for a in node.names):
                offenders.append(f"{path.name}:{node.lineno} imports AvatarEngine")
    assert offenders == []
