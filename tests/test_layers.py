"""The package's layers point one way, and the folder is the map that gptjax/__init__.py draws.

Each module may import from its own layer and the layers below, never from one above:

  base (config, options, tokenizer, errors, paths) <- runtime <- data <- model <- weights
      <- inference <- eval <- train <- bench, and the commands at the top

Every import counts: at module level or inside a function, absolute or relative. A deferred import is
still a dependency (it is how a cycle hides). `import gptjax.data` starts no JAX: preparing data needs none.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "gptjax"
LAYERS = ["base", "runtime", "data", "model", "weights", "inference", "eval", "train", "bench", "commands"]
BASE = {"config", "options", "tokenizer", "errors", "paths"}
TOP = {"commands", "__main__", "__init__"}  # the commands and the package's front, above everything
MAX_TOP_ENTRIES = 14


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    name = module.split(".")[1]
    if name in LAYERS:  # a sub-package or a module in one
        return LAYERS.index(name)
    return LAYERS.index("commands") if name in TOP else LAYERS.index("base")


def imports(module: str, path: Path) -> set[str]:
    """The gptjax modules `module` imports, resolved to modules (a name imported from a package may be one)."""
    known = modules()
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gptjax")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("gptjax"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known or f"{sub}.__init__" in known else base)
    return {m.removesuffix(".__init__") for m in found} - {module.removesuffix(".__init__")}


def graph() -> dict[str, set[str]]:
    return {m.removesuffix(".__init__"): imports(m, p) for m, p in modules().items()}


def test_the_top_of_the_package_has_at_most_14_entries():
    entries = [p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()]
    assert len(entries) <= MAX_TOP_ENTRIES, sorted(entries)
    # every sub-package is a layer this test knows, and every top-level module is base or the top
    for name in entries:
        stem = name.removesuffix(".py")
        assert stem in LAYERS or stem in BASE | TOP, f"gptjax/{name} belongs to no layer of {LAYERS}"


def test_imports_never_point_up_the_layers():
    wrong = [f"{m} ({LAYERS[layer(m)]}) imports {d} ({LAYERS[layer(d)]})"
             for m, deps in graph().items() if m != "gptjax" for d in deps if d != "gptjax" and layer(d) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    done, path = set(), []

    def visit(m):
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(g.get(m, ())):
            if d != "gptjax":  # the package's front defers to its parts; its parts may name the package
                visit(d)
        path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def test_the_checker_sees_relative_and_deferred_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from ..train import trainer\n    from . import documents\n")
    assert imports("gptjax.data.m", tmp_path / "m.py") == {"gptjax.train.trainer", "gptjax.data.documents"}


@pytest.mark.slow
def test_preparing_data_imports_no_jax():
    code = "import sys, gptjax.data, gptjax.data.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_package_docstring_maps_every_sub_package():
    import gptjax

    for p in sorted(PACKAGE.iterdir()):
        if (p / "__init__.py").exists():
            assert f"{p.name}/" in gptjax.__doc__, f"gptjax/__init__.py's map does not name {p.name}/"
