"""The house rules that keep the code readable, measured: no class over 300 lines and no function
over 80 in fxsparse/ (decorators and docstrings included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fxsparse"
MAX_CLASS, MAX_FUNCTION = 300, 80


def too_long(source: str) -> list[tuple[str, int, int]]:
    """``(kind name, line, length)`` of every class over MAX_CLASS and function over MAX_FUNCTION
    lines in ``source``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if length > limit:
                found.append((f"{'class' if isinstance(node, ast.ClassDef) else 'def'} {node.name}", node.lineno, length))
    return found


def test_no_class_over_300_lines_and_no_function_over_80():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): found
        for path in sorted(PACKAGE.rglob("*.py")) if (found := too_long(path.read_text()))
    }
    assert not offenders, offenders


def test_the_measure_finds_long_code():
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    assert too_long(f"def f():\n{body}\n") == [("def f", 1, 81)]
    assert too_long(f"@decorated\ndef f():\n{body[:-12]}\n") == [("def f", 2, 81)]
    methods = "\n".join(f"    def m{i}(self):\n" + "\n".join(f"        y = {j}" for j in range(9)) for i in range(30))
    assert too_long(f"class C:\n{methods}\n")[0][:2] == ("class C", 1)
    assert too_long("def short():\n    return 1\n") == []
