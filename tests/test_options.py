"""Every option is declared once (pipeline/options.py, and the settings in pipeline/config.py): the
command line, `make help` and the README's option tables all come from there."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest
from conftest import REPO, run_make

from pipeline.cli import STAGES, build_parser
from pipeline.config import Settings
from pipeline.options import ALL_STAGES, EVERY, OPTIONS, markdown

SETTINGS = {f.name for f in fields(Settings)}
CLI_ONLY = {"help", "make"}  # argparse's and the Makefile's own switch


def declared(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in CLI_ONLY}


def test_every_stage_takes_exactly_the_options_declared_for_it() -> None:
    parser, stages = build_parser()
    assert set(stages) == set(STAGES) and list(ALL_STAGES) == list(STAGES)
    for name, stage in stages.items():
        assert name in stage.format_help()  # each stage's --help renders (argparse formats it with %)
        actions = declared(stage)
        others = {k for k in actions if k not in SETTINGS}
        assert others == {o.name for o in OPTIONS if name in o.stages}, name
        for option in OPTIONS:
            if name not in option.stages:
                continue
            action = actions[option.name]
            assert action.option_strings == [option.flag_name]
            assert action.default == (False if option.flag else option.default_in(name)), (name, option)
            assert tuple(action.choices or ()) == tuple(option.choices or ()), (name, option)
    assert set(declared(parser)) == {o.name for o in OPTIONS if EVERY in o.stages}


def test_make_help_lists_the_targets_and_every_setting_and_option_from_the_declarations() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    help_recipe = makefile[makefile.index("help:"):makefile.index("$(VENV)/.installed:")]
    assert "RUNS=" not in help_recipe and "PRUNER" not in help_recipe  # nothing restated by hand
    shown = run_make("-s", "help", check=True).stdout
    assert run_make("-s", check=True).stdout == shown  # `make` alone is `make help`
    listed = set(re.findall(r"^  ([A-Za-z_-]+) ", shown, flags=re.M))
    assert {f.upper() for f in SETTINGS} | {o.name.upper() for o in OPTIONS if o.make} <= listed
    assert {*ALL_STAGES, "test", "test-fast", "bench", "lint", "clean"} <= listed


@pytest.mark.parametrize("table", ["settings", "options"])
def test_the_readme_option_tables_are_the_generated_ones(table: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {table}:begin -->\n(.*?)\n<!-- {table}:end -->", readme, flags=re.S)
    assert found, f"README.md has no generated {table} table (<!-- {table}:begin --> ... end)"
    assert found.group(1).strip() == markdown(table).strip(), (
        f"README.md's {table} table differs from the declarations: paste "
        f"`python -m pipeline.options --markdown {table}` between the markers")


def test_the_generated_tables_name_every_setting_and_option_once() -> None:
    settings, options = markdown("settings"), markdown("options")
    for f in fields(Settings):
        flag = ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert settings.count(f"`{flag}`") == 1, f.name
    for option in OPTIONS:
        assert options.count(f"`{option.flag_name}`") == 1, option.name
