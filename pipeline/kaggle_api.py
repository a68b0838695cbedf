"""Everything that touches the official ``kaggle`` client lives here, imported only on demand.

The client authenticates when it is imported and exits the process when it finds no credentials;
no other module of the pipeline imports it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from pipeline.errors import PipelineError


def credentials_source() -> str | None:
    """Where the client would find credentials, without importing it (None when nowhere)."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    home = Path.home() / ".kaggle"
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or home)
    for candidate in (home / "access_token", home / "access_token.txt", config_dir / "kaggle.json"):
        if candidate.is_file():
            return str(candidate)
    return None


def download_competition(competition: str, dest: Path, timeout: float) -> dict[str, Path]:
    """Download and unpack the competition's files into dest; returns train.csv and test.csv."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    api.competition_download_files(competition, path=str(dest), force=True, quiet=True)
    archive = dest / f"{competition}.zip"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    files = {name: dest / name for name in ("train.csv", "test.csv")}
    for name, path in files.items():
        if not path.is_file():
            raise PipelineError(f"{archive}: has no {name}")
    return files
