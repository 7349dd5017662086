"""Run the README's ```python blocks as a notebook would: every top-level statement in turn, in one namespace,
then the test's own follow-up code; write what each statement gave as JSON for tests/test_readme.py to check.

    python notebook.py BLOCKS.json RESULTS.json

BLOCKS.json holds {"blocks": [source, ...], "after": source}; `after` runs last and fills a dict `facts`.
Each statement's record: its source (ast.unparse, so without comments), what it printed, the value of an
expression described in JSON (type, and what the checks need: text, length, dtype, finiteness), or the
traceback of what it raised. A statement that raises does not stop the ones after it.
"""

import ast
import contextlib
import io
import json
import math
import sys
import traceback
from pathlib import Path

import numpy as np


def describe(value, depth: int = 0) -> dict:
    """A JSON description of a statement's value: enough to check its type and its figures."""
    kind = type(value).__name__
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bool) or value is None:
        return {"type": kind, "value": value}
    if isinstance(value, (int, float, np.floating, np.integer)):
        return {"type": kind, "value": float(value), "finite": math.isfinite(float(value))}
    if isinstance(value, np.ndarray):
        finite = bool(np.all(np.isfinite(value))) if value.size else True
        return {"type": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape), "finite": finite,
                "max": float(value.max()) if value.size else None,
                "mean": float(value.mean()) if value.size else None}
    if isinstance(value, (list, tuple)) and depth < 2:
        return {"type": kind, "items": [describe(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        leaves = [leaf for leaf in _leaves(value)]
        return {"type": "dict", "keys": sorted(map(str, value)), "leaves": len(leaves),
                "array_leaves": sum(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)}
    return {"type": kind, "module": type(value).__module__, "repr": repr(value)[:300]}


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def run_statement(node: ast.stmt, namespace: dict) -> dict:
    record = {"statement": ast.unparse(node)}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            if isinstance(node, ast.Expr):
                value = eval(compile(ast.Expression(node.value), "<README>", "eval"), namespace)
                record["value"] = describe(value)
            else:
                exec(compile(ast.Module([node], type_ignores=[]), "<README>", "exec"), namespace)
    except Exception:
        record["error"] = traceback.format_exc()
    record["printed"] = printed.getvalue()
    return record


def main(blocks_path: str, results_path: str) -> None:
    spec = json.loads(Path(blocks_path).read_text())
    namespace: dict = {"__name__": "__main__"}
    records = [run_statement(node, namespace) for block in spec["blocks"] for node in ast.parse(block).body]
    namespace["facts"] = facts = {}
    try:
        exec(compile(spec["after"], "<test_readme follow-up>", "exec"), namespace)
    except Exception:
        facts["error"] = traceback.format_exc()
    Path(results_path).write_text(json.dumps({"records": records, "facts": facts}, indent=1, default=str))
    failed = [r["statement"] for r in records if "error" in r] + (["(follow-up)"] if "error" in facts else [])
    for record in records:
        if "error" in record:
            print(f"statement {record['statement']!r} raised:\n{record['error']}", file=sys.stderr)
    if "error" in facts:
        print(f"the follow-up code raised:\n{facts['error']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(*sys.argv[1:])
