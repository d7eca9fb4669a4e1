"""No loader of bundles, checkpoints or caches may unpickle: a tampered file must not run code.

A source scan, because the rule is about every call site, present and future: `torch.load` only with
`weights_only=True`, no `pickle`/`joblib`/`dill`, and `np.load` never with `allow_pickle=True`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for d in ("rellax", "data", "index", "training", "service", "cli", "benchmarks")
    for p in (ROOT / d).rglob("*.py")
)


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f"{getattr(f.value, 'id', '?')}.{f.attr}"
                if isinstance(f, ast.Attribute)
                else getattr(f, "id", "")
            )
            found.append((name, node))
    return found


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unsafe_loads(source: str) -> list[str]:
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [
                f"line {node.lineno}: imports {m}"
                for m in mods
                if m.split(".")[0] in ("pickle", "joblib", "dill", "cloudpickle")
            ]
    for name, call in _calls(tree):
        if name == "torch.load" and _kw(call, "weights_only") is not True:
            problems.append(f"line {call.lineno}: torch.load without weights_only=True")
        if name == "np.load" and _kw(call, "allow_pickle") not in (None, False):
            problems.append(f"line {call.lineno}: np.load with allow_pickle")
    return problems


def test_the_scan_catches_what_it_forbids() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "np.load(p, allow_pickle=True)",
        ]
    )
    assert len(unsafe_loads(bad)) == 4
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=True, map_location='cpu')\n") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_loader_unpickles(path: Path) -> None:
    assert unsafe_loads(path.read_text()) == []
