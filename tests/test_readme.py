"""The README's configuration table documents every RELLAX_* setting the service reads."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(RELLAX_[A-Z_]+)` \|", README.read_text(), flags=re.M))
    wanted = {f"RELLAX_{name.upper()}" for name in Settings.model_fields}
    assert wanted <= documented, sorted(wanted - documented)
    assert {"RELLAX_CACHE_DIR", "RELLAX_LOG_LEVEL"} <= documented
