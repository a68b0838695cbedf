"""The README's option table is true of the code: every setting is documented, and the defaults it
quotes are the declared ones."""

from __future__ import annotations

import re
from dataclasses import fields

from conftest import REPO

from pipeline.config import Settings

README = (REPO / "README.md").read_text(encoding="utf-8")


def table_rows() -> dict[str, str]:
    """Make variable -> the default the options table quotes for it ("`A`, `B`" rows pair with
    "1, 2" defaults)."""
    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`--"):
            continue
        names = re.findall(r"`([A-Z_]+)(?:=[^`]*)?`", cells[0])
        values = [v.strip().strip("`").split(" ")[0] for v in cells[2].split(",")]
        for i, name in enumerate(names):
            rows[name] = values[i] if len(values) == len(names) else values[0]
    return rows


def shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_every_setting_is_documented() -> None:
    missing = [f.name.upper() for f in fields(Settings) if f"`{f.name.upper()}" not in README]
    assert not missing, f"settings the README never names: {missing}"


def test_the_defaults_in_the_options_table_are_the_declared_ones() -> None:
    rows = table_rows()
    checked = [f.name for f in fields(Settings) if f.name.upper() in rows]
    for name in checked:
        default = Settings.__dataclass_fields__[name].default
        assert rows[name.upper()] == shown(default), (name, rows[name.upper()], default)
    assert len(checked) >= 15
