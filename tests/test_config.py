"""Settings: presets, config files, validation and the settings that differ from the defaults."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import VALUES, run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import NO_LEGACY, PRESETS, Settings, changed_settings, resolve
from pipeline.errors import PipelineError
from pipeline.store.run import run_id
from pipeline.tuning import space as tune_space


def test_changed_settings_are_the_hyperparameters_off_their_defaults() -> None:
    cfg = Settings(epochs=3, model="gru", device="cuda", jobs=4)
    assert changed_settings(cfg) == {"epochs": 3, "model": "gru"}
    assert changed_settings(Settings()) == {}


CONFIG_NAMES = ["preset", "hidden", "lr", "model", "augment", "device", "view", "seed"]


@given(values=st.dictionaries(st.sampled_from(CONFIG_NAMES), VALUES, min_size=1, max_size=3))
def test_any_config_file_gives_typed_settings_or_names_the_file(
        tmp_path_factory: pytest.TempPathFactory, values: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("config") / "settings.json"
    path.write_text(json.dumps(values))
    try:
        cfg = resolve(file=path)
    except PipelineError as exc:
        assert str(path) in str(exc)
        return
    for f in fields(Settings):
        assert type(getattr(cfg, f.name)) is type(f.default), f.name


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_or_space_file_that_is_not_text_is_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        resolve(file=path)
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        tune_space.load_space(path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "text", "words"), [
    ("x.yaml", "epochs: 3\n", ["TOML (.toml) or JSON (.json)", "x.yaml"]),
    ("x.toml", "epochs = 'many'\n", ["x.toml: epochs must be a whole number", "'many'"]),
    ("x.toml", "hiden = 3\n", ["x.toml: unknown setting(s) hiden"]),
    ("x.json", '{"lr": -1}', ["x.json: LR=-1.0 is out of range", "lr must be a number from"]),
    ("x.toml", "model = [", ["x.toml: not valid TOML"]),
])
def test_config_file_errors_name_file_key_and_range(tmp_path: Path, name: str, text: str,
                                                   words: list[str]) -> None:
    (tmp_path / name).write_text(text)
    result = run_cli(tmp_path, "folds", "--config", str(tmp_path / name), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_tutorial_preset_is_the_tutorial_recipe() -> None:
    cfg = resolve(preset="tutorial")
    assert (cfg.model, cfg.hidden, cfg.layers, cfg.optimizer, cfg.lr, cfg.batch, cfg.epochs) == \
        ("rnn", 150, 1, "adam", 1e-3, 64, 10)
    assert cfg.drop_last and not cfg.normalize and not cfg.augment
    assert cfg.schedule == "none" and cfg.clip == 0 and cfg.label_smoothing == 0
    assert set(PRESETS["tutorial"]) <= set(Settings().learned())


def test_config_layers_merge_in_order(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('preset = "tutorial"\nepochs = 4\nhidden = 64\n')
    cfg = resolve(file=file, overrides={"hidden": 32, "lr": None})
    assert (cfg.epochs, cfg.hidden, cfg.lr, cfg.batch) == (4, 32, 1e-3, 64)
    saved = tmp_path / "config.json"
    saved.write_text(pd.Series(vars(cfg)).to_json())
    assert resolve(file=saved) == cfg
    file.write_text('preset = ["tuned"]\n')
    with pytest.raises(PipelineError, match=rf"run\.toml: preset must be one of {', '.join(PRESETS)}"):
        resolve(file=file)


@pytest.mark.parametrize("overrides, message", [
    ({"model": "cnn"}, "model must be one of"),
    ({"epochs": 0}, "EPOCHS=0 is out of range; epochs must be a whole number from 1"),
    ({"dropout": 1.5}, "dropout must be a number from 0 up to"), ({"folds": 1}, "FOLDS=1 is out of range"),
    ({"hidden": "big"}, "hidden must be a whole number"), ({"bogus": 1}, "unknown setting"),
])
def test_bad_config_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        resolve(overrides=overrides)


OLDER_RUNS = json.loads((Path(__file__).parent / "data" / "runs_before_reading_settings.json").read_text())


@pytest.mark.parametrize("older", OLDER_RUNS, ids=[r["id"] for r in OLDER_RUNS])
def test_a_run_recorded_before_newer_settings_keeps_its_id(older: dict[str, Any]) -> None:
    """Settings recorded by an older pipeline (its config.json, its checkpoints) lack the settings
    added since: they read as those settings' legacy values, and the run's id is the one it has."""
    cfg = resolve(overrides=older["config"])
    assert run_id(cfg, older["data_key"]) == older["id"]
    # A few settings given (not a run's full record) leave the others at today's defaults.
    partial = resolve(overrides={"hidden": older["config"]["hidden"]})
    assert (partial.readout, partial.rows_per_step) == (Settings.readout, Settings.rows_per_step)


def test_every_setting_added_since_the_first_recorded_runs_has_a_legacy_value() -> None:
    """A new setting that changes what a model learns must say which value reproduces the runs made
    before it (legacy=): without it every existing run would get a new id and be trained again."""
    recorded = set(OLDER_RUNS[0]["config"])
    for f in fields(Settings):
        if f.name not in recorded and f.metadata["learns"]:
            assert f.metadata["legacy"] is not NO_LEGACY, f"{f.name}: declare legacy=<the old behaviour>"
            cfg = resolve(overrides={**OLDER_RUNS[0]["config"], f.name: f.metadata["legacy"]})
            assert run_id(cfg, "0123456789abcdef") == OLDER_RUNS[0]["id"], f.name
