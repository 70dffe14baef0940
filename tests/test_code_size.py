"""Size limits of the code (issue 23): no module of fcn_pipeline/ or flows/ over 450
lines, no function over 60 lines (its docstring not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_LINES, FUNCTION_LINES = 450, 60


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    value = getattr(first, "value", None)
    docstring = isinstance(value, ast.Constant) and isinstance(value.value, str)
    if isinstance(first, ast.Expr) and docstring and len(body) > 1:
        first = body[1]
    return node.end_lineno - first.lineno + 1


def sizes() -> dict[str, int]:
    found = {}
    for root in ("fcn_pipeline", "flows"):
        for path in sorted((REPO / root).rglob("*.py")):
            name = str(path.relative_to(REPO))
            source = path.read_text()
            found[name] = len(source.splitlines())
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found[f"{name}:{node.name}"] = function_lines(node)
    return found


def test_no_module_or_function_is_over_its_limit():
    over = {
        name: size
        for name, size in sizes().items()
        if size > (FUNCTION_LINES if ":" in name else MODULE_LINES)
    }
    assert over == {}, f"over the limits: {over}"
