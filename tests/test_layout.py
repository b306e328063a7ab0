"""The package layout holds: modules stay small, and avatar_engine/ imports its own modules only
at module top (so the layer contracts in .importlinter see every import; `lint-imports` checks
the layers themselves)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_library_module_is_over_the_limit():
    too_long = {str(p.relative_to(ROOT)): _lines(p) for p in _modules("avatar_engine") if _lines(p) > MAX_LINES}
    assert too_long == {}


def test_no_service_module_is_over_the_limit():
    too_long = {str(p.relative_to(ROOT)) for p in _modules("serve") if _lines(p) > MAX_LINES}
    assert too_long == set()


def _function_level_own_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`from .x import y` / `import avatar_engine.x` inside a function or method body."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            own = (isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").split(".")[0]
                                                         == "avatar_engine")) or \
                  (isinstance(inner, ast.Import) and any(a.name.split(".")[0] == "avatar_engine" for a in inner.names))
            if own:
                found.append(f"{path.relative_to(root)}:{inner.lineno} in {node.name}()")
    return found


def test_library_imports_its_own_modules_only_at_module_top():
    found = [hit for p in _modules("avatar_engine") for hit in _function_level_own_imports(p)]
    assert found == []


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from .config import EngineConfig\n", 1),
    ("def f():\n    import avatar_engine.engine\n", 1),
    ("class C:\n    def m(self):\n        from avatar_engine import faces\n", 1),
    ("def f():\n    import cv2\n    from scipy.optimize import linear_sum_assignment\n", 0),
    ("from .config import EngineConfig\n", 0),
])
def test_the_import_check_sees_function_level_imports(tmp_path, source, expected):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert len(_function_level_own_imports(probe, tmp_path)) == expected
