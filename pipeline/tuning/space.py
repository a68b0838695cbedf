"""The search space of `make tune` (tune.toml), checked: every key a setting that changes what a
model learns (never one that moves the folds), every range non-empty and inside the setting's own,
every entry of the right types; choices come back as values of the setting's type.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pipeline.config import FOLD_SETTINGS, Settings, allowed, coerce, validate
from pipeline.errors import PipelineError

Space = dict[str, dict[str, Any]]


def load_space(path: Path) -> Space:
    try:
        space = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"SPACE={path}: cannot read it ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"SPACE={path}: not valid TOML: {exc}") from exc
    known = {f.name: f for f in fields(Settings) if f.metadata["learns"]}
    if not space:
        raise PipelineError(f"SPACE={path}: no parameters to search")
    return {name: _space_entry(f"{path}: [{name}]", name, entry, known) for name, entry in space.items()}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _space_entry(where: str, name: str, entry: Any, known: dict[str, Any]) -> dict[str, Any]:
    if name in FOLD_SETTINGS:
        raise PipelineError(f"{where}: {name} decides which rows each fold holds, and every trial "
                            "is scored on the base's folds; search it as studies of their own "
                            f"(make tune {name.upper()}=... STUDY=...), not inside one")
    if name not in known:
        raise PipelineError(f"{where}: unknown parameter; known: "
                            f"{', '.join(k for k in known if k not in FOLD_SETTINGS)}")
    field = known[name]
    if not isinstance(entry, dict) or ("choices" in entry) == ("low" in entry or "high" in entry):
        raise PipelineError(f"{where}: give either choices = [...] or low = ... and high = ...")
    extra = sorted(set(entry) - {"choices", "low", "high", "log"})
    if extra:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(extra)}; a parameter takes "
                            "choices = [...], or low, high and log = true|false")
    if "log" in entry and not isinstance(entry["log"], bool):
        raise PipelineError(f"{where}: log must be true or false, got {entry['log']!r}")
    if "choices" in entry:
        choices = entry["choices"]
        if entry.get("log"):
            raise PipelineError(f"{where}: log = true is for a low/high range, not for choices")
        if not isinstance(choices, list):
            raise PipelineError(f"{where}: choices must be a list, e.g. choices = [{field.default!r}], "
                                f"got {choices!r}")
        if not choices:
            raise PipelineError(f"{where}: an empty range (choices is empty)")
        values = [coerce(field, value, where) for value in choices]
        for value in values:
            validate(replace(Settings(), **{name: value}), where)
        return {**entry, "choices": values}
    if "low" not in entry or "high" not in entry:
        raise PipelineError(f"{where}: an empty range (low or high is missing)")
    if isinstance(field.default, bool | str):
        raise PipelineError(f"{where}: {name} has no range; give choices = [...] "
                            f"({allowed(field)})")
    for key in ("low", "high"):
        if not _number(entry[key]) or entry[key] != entry[key]:
            raise PipelineError(f"{where}: {key} must be a number, got {entry[key]!r}")
        validate(replace(Settings(), **{name: coerce(field, entry[key], f"{where} {key}")}), where)
    if not entry["low"] < entry["high"]:
        raise PipelineError(f"{where}: an empty range: low = {entry['low']} is not below "
                            f"high = {entry['high']}")
    if entry.get("log") and entry["low"] <= 0:
        raise PipelineError(f"{where}: a log scale needs low > 0")
    return entry


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    params = {}
    for name, entry in space.items():
        if "choices" in entry:
            params[name] = trial.suggest_categorical(name, entry["choices"])
        elif isinstance(Settings.__dataclass_fields__[name].default, int):
            params[name] = trial.suggest_int(name, int(entry["low"]), int(entry["high"]),
                                             log=bool(entry.get("log")))
        else:
            params[name] = trial.suggest_float(name, float(entry["low"]), float(entry["high"]),
                                               log=bool(entry.get("log")))
    return params

