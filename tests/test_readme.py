"""The README and docs/ are true of the code: the settings table names every setting with its
declared default, the options table quotes the command line's defaults, every relative link leads
to a file, every `make <target>` they mention exists, and the README stays a short front door."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.cli import build_parser
from pipeline.config import Settings

README_PATH = REPO / "README.md"
README = README_PATH.read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
# The README's part before "## Results": what a reader meets first.
FRONT_DOOR_LINES = 150


def block(text: str, name: str) -> str:
    """The text between `<!-- name:begin -->` and `<!-- name:end -->`, each on a line of its own."""
    found = re.search(rf"^<!-- {name}:begin -->\n(.*?)^<!-- {name}:end -->$", text, re.M | re.S)
    assert found, f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block"
    return found.group(1)


def table_rows(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """Each row of a `| Make | CLI | default | what |` table: its Make names, CLI flags and quoted
    defaults ("`A`, `B`" rows pair with "1, 2" defaults; an empty default is "")."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] == "Make" or (cells[0] and set(cells[0]) <= {"-"}):
            continue
        names = re.findall(r"`([A-Z_]+)(?:=[^`]*)?`", cells[0])
        flags = re.findall(r"`(--[a-z-]+)`", cells[1])
        values = [v.strip().strip("`").split(" ")[0] for v in cells[2].split(",")]
        rows.append((names, flags, values))
    return rows


def quoted(keys: list[str], values: list[str]) -> dict[str, str]:
    if len(values) == len(keys):
        return dict(zip(keys, values, strict=True))
    return dict.fromkeys(keys, values[0])


def settings_table() -> dict[str, str]:
    """Make variable -> the default the settings table quotes for it."""
    rows = {}
    for names, _, values in table_rows(block(README, "settings")):
        rows.update(quoted(names, values))
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


def test_the_settings_table_names_every_setting_and_no_other() -> None:
    table = set(settings_table())
    declared = {f.name.upper() for f in fields(Settings)}
    assert table == declared, (f"missing: {sorted(declared - table)}", f"unknown: {sorted(table - declared)}")


def test_the_defaults_in_the_settings_table_are_the_declared_ones() -> None:
    rows = settings_table()
    for f in fields(Settings):
        assert rows[f.name.upper()] == shown(f.default), (f.name, rows[f.name.upper()], f.default)


def cli_options() -> dict[str, argparse.Action]:
    """Every option flag of the command line and of each stage -> its action."""
    parser, stages = build_parser()
    found = {}
    for p in (parser, *stages.values()):
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--make"):
                    found.setdefault(flag, action)
    return found


def test_the_options_table_quotes_the_command_lines_defaults() -> None:
    options, checked = cli_options(), []
    for names, flags, values in table_rows(block(README, "options")):
        if not flags:  # a Make-only variable, e.g. ARGS
            continue
        assert not names or len(names) == len(flags), (names, flags)
        for flag, value in quoted(flags, values).items():
            assert flag in options, f"{flag}: no such option of `python -m pipeline`"
            default = options[flag].default
            if default is None or default == "" or value == "":
                continue
            assert value == shown(default), (flag, value, default)
            checked.append(flag)
        for name, flag in zip(names, flags, strict=False):
            assert name == options[flag].dest.upper(), (name, flag)
    assert len(checked) >= 12, checked


def test_the_two_tables_cover_every_option_of_the_command_line() -> None:
    documented = {flag for part in ("settings", "options")
                  for _, flags, _ in table_rows(block(README, part)) for flag in flags}
    options = cli_options()
    missing = {action.option_strings[0] for flag, action in options.items()
               if not documented & set(action.option_strings)}
    assert not missing, f"command-line options neither table names: {sorted(missing)}"


def test_the_readme_is_short_before_its_results() -> None:
    lines = README.splitlines()
    assert "## Results" in lines, "README.md has no '## Results' section"
    before = lines.index("## Results")
    assert before <= FRONT_DOOR_LINES, f"{before} lines before '## Results' (at most {FRONT_DOOR_LINES})"


def links(text: str) -> list[str]:
    """The targets of the Markdown links `[text](target)` outside code."""
    prose = re.sub(r"^    .*$", "", text, flags=re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page: Path) -> None:
    local = [t for t in links(page.read_text(encoding="utf-8"))
             if not re.match(r"[a-z][a-z+.-]*:", t)]  # http:, https:, mailto: ...
    with_anchor = [t for t in local if "#" in t]
    assert not with_anchor, f"{page.name}: links with an anchor, which nothing checks: {with_anchor}"
    broken = [t for t in local if not (page.parent / t).exists()]
    assert not broken, f"{page.name}: links to no file: {broken}"


def test_the_readme_links_every_page_of_docs() -> None:
    assert DOCS, "docs/ has no pages"
    linked = {(README_PATH.parent / t).resolve() for t in links(README)}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README never links: {unlinked}"


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def mentioned_targets(text: str) -> set[str]:
    """The targets of `make <target>` in inline code and in code blocks (indented lines)."""
    code = re.findall(r"`([^`\n]*)`", text) + re.findall(r"^    (.*)$", text, re.M)
    return {m for snippet in code for m in re.findall(r"(?:^|[\s!;&(])make ([a-z][\w-]*)", snippet)}


def test_the_makefile_targets_are_found() -> None:
    assert {"submit", "test", "blend", "upload", "tune", "tune-status"} <= make_targets()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_mentioned_exists(page: Path) -> None:
    named = mentioned_targets(page.read_text(encoding="utf-8"))
    assert named, f"{page.name} names no `make <target>`"
    unknown = sorted(named - make_targets())
    assert not unknown, f"{page.name}: `make` targets the Makefile does not have: {unknown}"
