"""The import layers (docs/design.md, "Layers"): passes/ never imports codegen/ or TVM, and neither does anything
they import; the kernels' work arithmetic, the cost model and the measurement clocks are TVM-free too, so analysis
and planning can run (and be read) without TVM. Checked on the source, every import at any depth of a module,
followed through sparsecc's own modules; and by importing them in a fresh process."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# setuptools package-dir: sparsecc.passes and sparsecc.codegen live at the repository root.
PACKAGE_DIRS = {"sparsecc.passes": ROOT / "passes", "sparsecc.codegen": ROOT / "codegen", "sparsecc": ROOT / "sparsecc"}
TVM_FREE = ("sparsecc.kernel_work", "sparsecc.planning.cost_model", "sparsecc.planning.pricing",
            "sparsecc.planning.tuning_db", "sparsecc.measure.clock", "sparsecc.measure.dense", "sparsecc.settings",
            "sparsecc.formats", "sparsecc.cache")


def module_file(name: str) -> Path | None:
    for package, folder in PACKAGE_DIRS.items():
        if name == package or name.startswith(package + "."):
            rest = name[len(package):].lstrip(".").split(".") if name != package else []
            base = folder.joinpath(*rest)
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            if (base / "__init__.py").is_file():
                return base / "__init__.py"
            return None
    return None


def imports_of(name: str) -> set[str]:
    """Modules `name`'s source imports anywhere (module level or inside functions), with the packages on the way."""
    path = module_file(name)
    if path is None:
        return set()
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    # Importing a.b.c runs the packages on the way too, except sparsecc's own __init__: it is the public API (the
    # pipeline and the backend), above every layer checked here.
    with_parents = set()
    for module in found:
        parts = module.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents - {"sparsecc"}


def reachable(name: str) -> dict[str, str]:
    """Every module reachable from `name` through sparsecc's own modules -> the module that imported it."""
    seen, todo = {name: ""}, [name]
    while todo:
        current = todo.pop()
        for module in imports_of(current):
            if module not in seen:
                seen[module] = current
                if module.startswith("sparsecc"):
                    todo.append(module)
    return seen


def chain(seen: dict[str, str], module: str) -> str:
    path = [module]
    while seen.get(path[-1]):
        path.append(seen[path[-1]])
    return " <- ".join(path)


def passes_modules() -> list[str]:
    return sorted(f"sparsecc.passes.{p.stem}" for p in (ROOT / "passes").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", passes_modules() + list(TVM_FREE))
def test_never_reaches_codegen_or_tvm(module):
    seen = reachable(module)
    bad = sorted(m for m in seen if m == "tvm" or m.startswith("tvm.") or m.startswith("sparsecc.codegen"))
    assert not bad, "\n".join(chain(seen, m) for m in bad)


def test_the_check_sees_an_import_inside_a_function():
    # sparsecc.planning.calibration imports codegen inside functions only: the check must still find it.
    seen = reachable("sparsecc.planning.calibration")
    assert any(m.startswith("sparsecc.codegen") for m in seen)


def test_importing_sparsecc_and_its_passes_loads_no_tvm():
    code = ("import sys, sparsecc\n"
            + "".join(f"import {m}\n" for m in passes_modules() + list(TVM_FREE))
            + "print(sorted(m for m in sys.modules if m == 'tvm' or m.startswith(('tvm.', 'sparsecc.codegen'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
