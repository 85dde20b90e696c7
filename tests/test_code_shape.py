"""The package stays readable: no function longer than a screenful and a half.

ruff (pyflakes, pycodestyle, import order, bugbear) and import-linter run before the tests in
`make test`; this is the one rule of the house they have no check for.
"""

import ast
from pathlib import Path

import cnnlab

MOST_LINES = 80


def test_no_function_is_longer_than_80_lines():
    root = Path(cnnlab.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MOST_LINES:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)
