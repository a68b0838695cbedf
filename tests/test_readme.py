"""The README and docs/ are true of the code: every relative link leads to a file, every `make
<target>` they mention exists, and the README stays a short front door. (Its option tables are
generated from the declarations: tests/test_options.py compares them.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

README_PATH = REPO / "README.md"
README = README_PATH.read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
# The README's part before "## Results": what a reader meets first.
FRONT_DOOR_LINES = 150


def test_the_readme_is_short_before_its_results_and_links_every_page_of_docs() -> None:
    lines = README.splitlines()
    assert "## Results" in lines, "README.md has no '## Results' section"
    before = lines.index("## Results")
    assert before <= FRONT_DOOR_LINES, f"{before} lines before '## Results' (at most {FRONT_DOOR_LINES})"
    assert DOCS, "docs/ has no pages"
    linked = {(README_PATH.parent / t).resolve() for t in links(README)}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README never links: {unlinked}"


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


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def mentioned_targets(text: str) -> set[str]:
    """The targets of `make <target>` in inline code and in code blocks (indented lines)."""
    code = re.findall(r"`([^`\n]*)`", text) + re.findall(r"^    (.*)$", text, re.M)
    return {m for snippet in code for m in re.findall(r"(?:^|[\s!;&(])make ([a-z][\w-]*)", snippet)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_mentioned_exists(page: Path) -> None:
    assert {"submit", "test", "blend", "upload", "tune", "tune-status"} <= make_targets()
    named = mentioned_targets(page.read_text(encoding="utf-8"))
    assert named, f"{page.name} names no `make <target>`"
    unknown = sorted(named - make_targets())
    assert not unknown, f"{page.name}: `make` targets the Makefile does not have: {unknown}"
