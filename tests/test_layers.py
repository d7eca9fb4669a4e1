"""Import layering between the top-level packages, checked on the source with `ast`.

    cli/        the `rellax` command line: the top, may import everything; nothing imports it
    service/    online scoring          -> rellax, data (never training)
    training/   offline model build     -> rellax, data, index
    index/      offline item embeddings -> rellax, data
    data/       data sets, CTR samples  -> rellax only (and no torch)
    rellax/     shared model code       -> plain libraries only

Every `import x` and `from x import y` counts, at module level or inside a function (a lazy import
is still a dependency), and so does `importlib.import_module("x")` / `__import__("x")` with a literal
name. A failure names the file, the line and the imported module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rellax", "data", "index", "training", "service", "cli")

# package -> top-level modules it must not import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "rellax": frozenset({"index", "training", "service", "cli", "data"}),
    "data": frozenset({"torch", "training", "index", "service", "cli"}),
    "index": frozenset({"training", "service", "cli"}),
    "training": frozenset({"service", "cli"}),
    "service": frozenset({"training", "cli"}),
    "cli": frozenset(),
}


def _resolve_relative(module: str | None, level: int, file: Path) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `file`."""
    package = list(file.relative_to(ROOT).with_suffix("").parts)
    if file.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([module] if module else [])])


def imported_modules(source: str, file: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `source`, wherever it sits in the file."""
    for node in ast.walk(ast.parse(source, filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, _resolve_relative(node.module, node.level, file)
            elif node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def violations_in(file: Path, source: str) -> list[str]:
    """'path:line: imports module (why)' for each import in `source` that its package may not make."""
    package = file.relative_to(ROOT).parts[0]
    banned = FORBIDDEN[package]
    found = []
    for line, module in sorted(imported_modules(source, file)):
        top = module.split(".")[0]
        if top in banned:
            rule = f"{package}/ must not import {top}"
            found.append(f"{file.relative_to(ROOT)}:{line}: imports {module} ({rule})")
    return found


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def violations(package: str) -> list[str]:
    return [v for file in _sources(package) for v in violations_in(file, file.read_text())]


def test_every_top_level_package_has_a_rule() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert on_disk - {"tests", "benchmarks"} <= set(FORBIDDEN), sorted(on_disk - set(FORBIDDEN))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_respect_the_layers(package: str) -> None:
    assert _sources(package), f"{package}/ has no .py files: is ROOT right?"
    found = violations(package)
    assert not found, "imports across the layers:\n" + "\n".join(found)


def test_service_never_imports_training() -> None:
    """Stated on its own: the online service must run without the offline training code."""
    found = [v for v in violations("service") if "must not import training" in v]
    assert not found, "service/ imports training/:\n" + "\n".join(found)


def test_the_checker_sees_lazy_relative_and_dynamic_imports() -> None:
    """The scan itself: an import inside a function, a relative one and importlib all count."""
    source = (
        "import numpy\n"
        "def f():\n"
        "    from training.llm.stage1 import x\n"
        "    import importlib\n"
        "    importlib.import_module('index.embed')\n"
        "from . import features\n"
        "from .. import elsewhere\n"
    )
    file = ROOT / "rellax" / "sub" / "probe.py"  # never written: only its place in the tree matters
    assert sorted(imported_modules(source, file)) == [
        (1, "numpy"), (3, "training.llm.stage1"), (4, "importlib"), (5, "index.embed"),
        (6, "rellax.sub"), (7, "rellax"),
    ]  # fmt: skip
    assert violations_in(file, source) == [
        "rellax/sub/probe.py:3: imports training.llm.stage1 (rellax/ must not import training)",
        "rellax/sub/probe.py:5: imports index.embed (rellax/ must not import index)",
    ]


def test_data_layer_stays_light_at_run_time() -> None:
    """Importing the data layer loads neither torch nor any higher package (transitive imports too)."""
    banned = ("torch", "transformers", "training", "index", "service", "cli")
    code = (
        "import sys, data, data.loading, data.movielens, data.samples;"
        f"bad = [m for m in {banned!r} if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
