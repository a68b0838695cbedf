"""What the report pages share: their style sheet and matplotlib on its file-only backend."""

from __future__ import annotations

from typing import Any

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6em 1em}.changed{font-weight:bold;
background:#eef6ff}code{background:#f3f3f3;padding:0 .2em}"""


def pyplot() -> Any:
    """pyplot on the file-only Agg backend, chosen here so importing the package never touches it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
