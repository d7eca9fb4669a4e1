"""Where every benchmark's numbers go: `<out>/<name>.json` (the data) and `<name>.md` (the table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """Write the result and its markdown side by side, and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
