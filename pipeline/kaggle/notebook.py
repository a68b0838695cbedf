"""Inside a Kaggle notebook: where Kaggle keeps the competition's files and the notebook's outputs,
and the set-up check that stands in for the virtual environment there.

Kaggle sets KAGGLE_KERNEL_RUN_TYPE in a notebook and mounts attached data read-only under
/kaggle/input/; what a notebook writes to /kaggle/working/ is its output (and what "Submit to
competition" takes). KAGGLE_ROOT moves that tree elsewhere, for tests. Standard library only:
`make` runs the check (`python -m pipeline.kaggle.notebook`) before anything is known to be installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import COMPETITION  # standard library only, as this module

MIN_KAGGLE = "1.7"  # the client built on kagglesdk (pyproject.toml asks for the same)
# import name -> pip name, for what `make submit` needs.
REQUIRED = {"torch": "torch", "numpy": "numpy", "pandas": "pandas", "sklearn": "scikit-learn",
            "tqdm": "tqdm", "matplotlib": "matplotlib", "filelock": "filelock", "pydantic": "pydantic"}
# import name -> (pip name, what needs it): the rest works without them.
OPTIONAL = {"kaggle": ("kaggle", "make upload, make lb, SOURCE=kaggle"),
            "six": ("six", "make upload, make lb, SOURCE=kaggle"), "optuna": ("optuna", "make tune"),
            "pytest": ("pytest", "make test"), "hypothesis": ("hypothesis", "make test"),
            "xdist": ("pytest-xdist", "make test on every core")}


def kaggle_root() -> Path:
    return Path(os.environ.get("KAGGLE_ROOT") or "/kaggle")


def in_notebook() -> bool:
    """Kaggle sets KAGGLE_KERNEL_RUN_TYPE (Interactive, Batch) in its notebooks; /kaggle/input is
    there in every one."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or (kaggle_root() / "input").is_dir()


def competition_input() -> Path | None:
    """The competition's files attached to this notebook (a folder with train.csv and test.csv)."""
    if not in_notebook():
        return None
    for folder in (kaggle_root() / "input" / COMPETITION,
                   kaggle_root() / "input" / "competitions" / COMPETITION):
        if (folder / "train.csv").is_file() and (folder / "test.csv").is_file():
            return folder
    return None


def working() -> Path | None:
    """The notebook's output folder, /kaggle/working (None outside a notebook)."""
    folder = kaggle_root() / "working"
    return folder if in_notebook() and folder.is_dir() else None


def kaggle_client_too_old() -> str | None:
    """The installed kaggle client's version when it predates the API the pipeline calls."""
    try:
        found = importlib.metadata.version("kaggle")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = [int(part) for part in re.findall(r"\d+", found)[:2]]
    return found if tuple(numbers) < tuple(int(p) for p in MIN_KAGGLE.split(".")) else None


def online(host: str = "pypi.org", timeout: float = 3.0) -> bool:
    """Whether the package index can be reached (a notebook's internet may be off)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def missing(names: list[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def check(is_online: Callable[[], bool] = online, install: Callable[[list[str]], int] | None = None) -> int:
    """Use this Python and what it has installed; install only what is missing, and only when the
    internet is on. Returns the exit status (1 when `make submit` cannot run)."""
    python = f"Python {sys.version.split()[0]} ({sys.executable})"
    # The module itself runs on older Pythons, so it can say why the pipeline will not.
    if sys.version_info < (3, 11):  # noqa: UP036
        print(f"setup: this notebook's {python} is too old: the pipeline (and the current kaggle "
              "client) need Python 3.11 or newer; choose a newer environment in the notebook's "
              "settings (Environment: latest)", file=sys.stderr)
        return 1
    required, optional = missing(list(REQUIRED)), missing(list(OPTIONAL))
    if "torch" in required:
        print(f"setup: PyTorch is missing from {python}; the pipeline uses the notebook's own "
              "PyTorch and does not install one: choose Kaggle's Python image with PyTorch "
              "(Settings > Environment)", file=sys.stderr)
        return 1
    to_install = [REQUIRED[n] for n in required] + [OPTIONAL[n][0] for n in optional]
    if to_install and is_online():
        print(f"setup: installing what this notebook lacks: {' '.join(to_install)}", file=sys.stderr)
        (install or _pip_install)(to_install)
        required, optional = missing(required), missing(optional)
    elif to_install:
        print("setup: the internet is off in this notebook, so nothing is installed", file=sys.stderr)
    for pip_name, needs in (OPTIONAL[name] for name in optional):
        print(f"setup: note: {pip_name} is not installed ({needs} need it)", file=sys.stderr)
    if old_client := kaggle_client_too_old():
        print(f"setup: note: the installed kaggle client is {old_client}; make upload and make lb "
              f"need {MIN_KAGGLE} or newer (with the internet on: pip install -U kaggle)", file=sys.stderr)
    if required:
        names = " ".join(REQUIRED[n] for n in required)
        print(f"setup: missing from {python}: {names}. Turn the notebook's internet on (Settings > "
              "Internet) and rerun, or attach a dataset of wheels and `pip install --no-index "
              f"--find-links <its folder> {names}`", file=sys.stderr)
        return 1
    print(f"setup: Kaggle notebook: using {python} and its installed packages (its own PyTorch); "
          "no virtual environment", file=sys.stderr)
    return 0


def _pip_install(names: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *names]).returncode


if __name__ == "__main__":
    sys.exit(check())
