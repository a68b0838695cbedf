"""The one rule for "is this output current", as every stage applies it.

An output records the inputs it was made from (with their fingerprint, the key) in a JSON record. It
is stale when the record is missing, its inputs differ from the current ones, one of its files is
missing, or a file fails its check (damaged). A stage declares its output once, as an Output, asks
rerun() (which says in one line why it reruns or that it skips) and, once it has made the files,
mark() writes the record that makes them current.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import fingerprint
from pipeline.errors import PipelineError
from pipeline.store.io import read_json, write_json


@dataclass(frozen=True)
class Output:
    """An output of a stage: its record, the inputs it is made from, its files, and a check that
    raises PipelineError when a file is damaged (its message becomes the reason to rerun)."""

    record: Path
    inputs: Mapping[str, Any]
    files: Sequence[Path] = ()
    check: Callable[[], object] | None = None

    def stale(self) -> str:
        """'' when the output is current; else why not, in words ("train.csv changed")."""
        if not self.record.exists():
            return "not made yet"
        if missing := [p.name for p in self.files if not p.is_file()]:
            return f"{missing[0]} is missing"
        if not isinstance(made := read_json(self.record), dict) or not isinstance(made.get("inputs"), dict):
            return f"{self.record.name} is missing or unreadable"
        if made.get("key") != fingerprint(self.inputs):
            before = made["inputs"]
            changed = [k for k in sorted(set(self.inputs) | set(before))
                       if self.inputs.get(k) != before.get(k)]
            return f"{', '.join(changed) or 'its inputs'} changed"
        try:
            if self.check is not None:
                self.check()
        except PipelineError as exc:
            return f"damaged ({exc})"
        return ""

    def rerun(self, said: str, current: str = "current", force: bool = False) -> str:
        """Why the output must be made again ('' when it is current; FORCE=1 is a reason too), said
        in one line: `<said> reruns: <why>` or `<said> skipped: <current>`."""
        why = "FORCE=1" if force else self.stale()
        print(f"{said} reruns: {why}" if why else f"{said} skipped: {current}")
        return why

    def mark(self, **facts: Any) -> dict[str, Any]:
        """Write the record that makes the output current: the facts, the inputs and their key."""
        made = {**facts, "inputs": dict(self.inputs), "key": fingerprint(self.inputs)}
        write_json(self.record, made)
        return made
