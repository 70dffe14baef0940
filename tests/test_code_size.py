"""Size limits of the code (issue 23): no module of fcn_pipeline/ or flows/ over 450
lines, no function over 60 lines (its docstring not counted). The few that are still
over are listed with their size, so none may grow and no other may join them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_LINES, FUNCTION_LINES = 450, 60
# Still over, to be split (training.py and evaluation.py are stage code: splitting them
# reruns the committed pipeline, so it waits for the next reference refresh).
KNOWN = {
    "fcn_pipeline/training.py": 724,
    "fcn_pipeline/training.py:_train": 106,
    "fcn_pipeline/training.py:train_one_epoch": 62,
    "fcn_pipeline/evaluation.py:evaluate_variant": 68,
}


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


def test_no_module_or_function_is_over_its_limit_or_grows():
    over = {
        name: size
        for name, size in sizes().items()
        if size > (FUNCTION_LINES if ":" in name else MODULE_LINES)
    }
    grown_or_new = {n: s for n, s in over.items() if s > KNOWN.get(n, 0)}
    assert grown_or_new == {}, f"over the limits: {grown_or_new}"


def test_the_known_exceptions_are_still_real():
    """A listed one that got under its limit leaves the list."""
    found = sizes()
    for name in KNOWN:
        limit = FUNCTION_LINES if ":" in name else MODULE_LINES
        assert found.get(name, 0) > limit, f"{name} is within its limit now: drop it from KNOWN"
