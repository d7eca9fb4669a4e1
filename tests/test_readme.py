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
    assert {"RELLAX_CACHE_DIR", "RELLAX_LOG_LEVEL", "RELLAX_DEVICE", "RELLAX_MALLOC_TUNING"} <= documented


def test_readme_cli_table_lists_every_command() -> None:
    """Every `rellax` command (groups expanded) has a row in the README's CLI table, and no row
    names a command that does not exist."""
    import typer

    from cli.main import app

    def walk(t: typer.Typer, prefix: str) -> set[str]:
        names = {f"{prefix}{c.name or c.callback.__name__}" for c in t.registered_commands}
        for group in t.registered_groups:
            names |= walk(group.typer_instance, f"{prefix}{group.name} ")
        return names

    commands = walk(app, "rellax ")
    rows = re.findall(r"^\| `(rellax [a-z0-9 -]+?)(?: \[| --|`)", README.read_text(), flags=re.M)
    assert commands <= set(rows), sorted(commands - set(rows))
    assert set(rows) <= commands, sorted(set(rows) - commands)
