"""One job per piece: every class of caffe_alex/ under 250 lines and every function under 40,
unless a comment just above it (``# long: why``) says why it is not split.

Counted from the source (ast): a definition's lines from its ``def``/``class`` line to its
last line, docstring and comments included, decorators not. The generated protobuf module is
left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "caffe_alex"
CLASS_LINES, FUNCTION_LINES = 250, 40
REASON = "# long:"


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "caffe_pb2.py")


def _justified(lines: list[str], node: ast.AST) -> bool:
    """True when the comment block right above the definition (above its decorators) starts
    with ``# long:`` and gives a reason."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    row = first - 2  # 0-based index of the line above
    block = []
    while row >= 0 and lines[row].strip().startswith("#"):
        block.insert(0, lines[row].strip())
        row -= 1
    return bool(block) and block[0].startswith(REASON) and len(block[0]) > len(REASON) + 10


def oversized(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, length) of each class or function over its limit without a reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            limit = CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = FUNCTION_LINES
        else:
            continue
        length = node.end_lineno - node.lineno + 1
        if length > limit and not _justified(lines, node):
            found.append((node.name, node.lineno, length))
    return found


def test_the_scan_sees_the_package():
    assert len(_sources()) > 100


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_classes_and_functions_are_short_or_say_why(path):
    found = oversized(path.read_text())
    assert not found, "; ".join(
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} is {length} lines "
        f"(split it, or say why above it with '{REASON} ...')"
        for name, line, length in found
    )


def test_the_rule_finds_a_long_function_and_accepts_a_reason():
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    long_function = f"def f():\n{body}\n"
    assert [name for name, _, _ in oversized(long_function)] == ["f"]
    reason = "# long: one table of Caffe's cases, read top to bottom\n"
    assert oversized(reason + long_function) == []
    assert oversized(f"# long:\n{long_function}") != []  # a reason must be given
    assert oversized(f"{reason}@staticmethod\n{long_function}") == []
    short = "def g():\n    return 1\n"
    assert oversized(short) == []
