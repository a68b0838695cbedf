"""The report: reports/index.html and its figures, drawn from a run's files and the prepared images
(nothing is retrained). The PNGs sit next to index.html, referenced by relative name, so the folder
opens from disk and can be copied or zipped whole.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import Paths, Settings, changed_settings
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared, load_prepared
from pipeline.store.io import atomic_path, atomic_write_text
from pipeline.store.ledger import format_seconds
from pipeline.store.run import RunDir, RunRecord, all_runs, complete, latest, run_dir

if TYPE_CHECKING:
    from markupsafe import Markup

CLASSES = 10
MISTAKES = 32  # images in the grid of confident mistakes: enough to see a pattern, few enough to read
DPI = 100
MAX_PIXELS = 3800  # the tallest figure we draw; many folds shrink the resolution instead


@dataclass
class Run:
    """Everything the report shows, read (and checked) from the run's files."""

    folder: RunDir
    record: RunRecord  # its run.json
    cv: pd.DataFrame  # cv.csv: a row per fold, then the row `all`
    histories: dict[int, pd.DataFrame]  # fold -> its log per epoch (none for a blend)
    oof: np.ndarray  # (N, 10): every train row's out-of-fold probabilities, in order
    test_pred: np.ndarray  # the test rows' most likely digits (test.csv)
    data: Prepared  # the prepared images and labels the run was made from


def load_run(paths: Paths, run: RunDir) -> Run:
    """Read a run's files; a clear PipelineError when it is missing, incomplete or damaged."""
    try:
        record = run.completed()
    except PipelineError as exc:
        raise PipelineError(f"RUN={run.id}: its record is damaged ({exc}); {run.remake()}") from None
    if record is None:
        raise PipelineError(f"RUN={run.id}: no complete run of that name in {paths.runs} (`make runs` "
                            "lists them)")
    data = load_prepared(paths)
    if record.data != data.data_key:
        raise PipelineError(f"RUN={run.id} was made from other data than input/*.csv now hold, so "
                            "its mistakes cannot be drawn from them")
    cv = run.cv_table(record.n_folds)
    histories = {} if run.is_blend else {k: _log(run, k) for k in range(record.n_folds)}
    oof, test = run.probabilities(len(data.train_y), len(data.test_x))
    return Run(run, record, cv, histories, oof, test.argmax(1), data)


def _log(run: RunDir, fold: int) -> pd.DataFrame:
    if not run.log(fold).is_file():
        raise PipelineError(f"{run.log(fold)}: missing (the training log of fold {fold}); "
                            f"`make train RUN={run.id} FORCE=1` remakes it")
    try:
        return pd.read_csv(run.log(fold))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise PipelineError(f"{run.log(fold)}: not a readable CSV ({exc}); `make train RUN={run.id} "
                            "FORCE=1` remakes it") from exc


# -- the numbers -------------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(np.asarray(labels, np.int64), np.asarray(predicted, np.int64),
                        labels=list(range(classes)))


def oof_confusion(run: Run) -> np.ndarray:
    """The out-of-fold confusion matrix of a run (sums to its number of train rows)."""
    return confusion_matrix(run.data.train_y, run.oof.argmax(1))


def per_class(matrix: np.ndarray) -> pd.DataFrame:
    """Per true class: rows, correct, accuracy (recall); per predicted class: count, precision."""
    rows, predicted, correct = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"class": np.arange(len(matrix)), "rows": rows, "correct": correct,
                             "accuracy": correct / rows, "predicted": predicted,
                             "precision": correct / predicted})


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, limit: int = MISTAKES) -> pd.DataFrame:
    """The wrong out-of-fold predictions the ensemble was surest of: row, label, predicted, confidence."""
    frame = pd.DataFrame({"row": np.arange(len(labels)), "label": labels.astype(np.int64),
                          "predicted": probs.argmax(1), "confidence": probs.max(1)})
    wrong = frame[frame["label"] != frame["predicted"]]
    return wrong.sort_values(["confidence", "row"], ascending=[False, True]).head(limit)


def class_balance(train_y: np.ndarray, test_pred: np.ndarray) -> pd.DataFrame:
    train, test = (np.bincount(np.asarray(y, np.int64), minlength=CLASSES) / max(len(y), 1)
                   for y in (train_y, test_pred))
    return pd.DataFrame({"class": np.arange(CLASSES), "train": train, "test predicted": test})


# -- the figures -------------------------------------------------------------------------------

def pyplot() -> Any:
    """pyplot on the file-only Agg backend, chosen here so importing the package never touches it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, height_in: float) -> str:
    plt = pyplot()
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=min(DPI, MAX_PIXELS / height_in))
    finally:
        plt.close(fig)
    return path.name


def plot_learning_curves(run: Run, path: Path) -> str:
    """One row per fold: loss and accuracy by epoch, train and validation, best epoch marked."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = pd.to_numeric(run.cv.get("best_epoch", pd.Series([None] * len(run.cv))), errors="coerce")
    best = {int(f): e for f, e in zip(run.cv["fold"], epochs, strict=True) if f != "all"}
    folds = sorted(run.histories)
    height = 2.4 * len(folds) + 0.4
    fig, axes = plt.subplots(len(folds), 2, figsize=(10, height), squeeze=False)
    for (ax_loss, ax_acc), k in zip(axes, folds, strict=True):
        log = run.histories[k]
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(log["epoch"], log[f"train_{metric}"], "o-", ms=3, label="train")
            ax.plot(log["epoch"], log[f"valid_{metric}"], "s-", ms=3, label="validation")
            if pd.notna(best.get(k)):
                ax.axvline(float(best[k]), color="grey", ls=":", lw=1, label="best epoch")
            ax.set_title(f"fold {k}: {'loss' if metric == 'loss' else 'accuracy'}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=8, loc="lower right")
    return _save(fig, path, height)


def plot_confusion(matrix: np.ndarray, path: Path) -> str:
    """Colour by the share of each true class, so rare classes read as clearly as common ones."""
    plt = pyplot()
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(matrix)), yticks=range(len(matrix)), xlabel="predicted", ylabel="true",
           title=f"out-of-fold confusion matrix ({matrix.sum()} train rows)")
    fig.colorbar(image, ax=ax, label="share of the true class")
    return _save(fig, path, 6)


def plot_bars(frame: pd.DataFrame, path: Path, xlabel: str, ylabel: str, **bars: Any) -> str:
    """Bars per class (one colour per other column, side by side): pandas' own bar plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    frame.plot.bar(x="class", ax=ax, rot=0, xlabel=xlabel, ylabel=ylabel, **bars)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, 3.5)


def plot_mistakes(run: Run, mistakes: pd.DataFrame, path: Path) -> str:
    """The images themselves, so a wrong label in the data looks different from a model error: one
    montage in one axes (32 separate axes would take seconds to lay out)."""
    plt = pyplot()
    cols, cell_w, cell_h, band = 8, 34, 46, 16  # pixels per cell; the band above a digit holds its text
    nrows = max(1, -(-len(mistakes) // cols))
    canvas = np.zeros((nrows * cell_h, cols * cell_w), np.uint8)
    height = 1.6 * nrows + 0.2
    fig, ax = plt.subplots(figsize=(cols * 1.25, height))
    for i, m in enumerate(mistakes.itertuples()):
        top, left = (i // cols) * cell_h, (i % cols) * cell_w
        canvas[top + band:top + band + 28, left + 3:left + 31] = run.data.train_x[m.row]
        ax.text(left + cell_w / 2, top + band / 2, f"row {m.row}\n{m.label} → {m.predicted} "
                f"({m.confidence:.0%})", ha="center", va="center", fontsize=7)
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    if mistakes.empty:
        ax.text(canvas.shape[1] / 2, canvas.shape[0] / 2, "no out-of-fold mistakes", ha="center",
                fontsize=12)
    ax.set_title("true → predicted (confidence)", fontsize=9)
    ax.axis("off")
    return _save(fig, path, height)


# -- the page ----------------------------------------------------------------------------------

# One template for both pages (a run's and a study's); Jinja2 escapes every value put into it.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>digits: {{ title }}</title><style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6em 1em}.changed{font-weight:bold;
background:#eef6ff}code{background:#f3f3f3;padding:0 .2em}</style></head><body>
{% if study %}<h1>Study {{ study }}</h1><pre>{{ status }}</pre>
{% for name, src, why in figures %}<h2>{{ name }}</h2>{% if src %}<img src="{{ src }}" alt="{{ name }}">
{% else %}<p>not drawn yet ({{ why }})</p>{% endif %}{% endfor %}
{% else %}<h1>Run report</h1><p>{{ root }}, written {{ written }}</p>
{% if sample %}<p class=warn>This run used the built-in SAMPLE (scikit-learn's digits), not the competition
data: its numbers say nothing about the leaderboard.</p>{% endif %}
<ul>{% for name, value in facts %}<li><b>{{ name }}:</b> {{ value }}</li>{% endfor %}</ul>
<h2>Cross-validation (cv.csv)</h2>{{ cv }}
{% for title, key, alt, text in figures %}<h2>{{ title }}</h2>{% if text %}<p>{{ text }}</p>{% endif %}
<img src="{{ images[key] }}" alt="{{ alt }}">{% if key == "per_class" %}{{ per_class }}{% endif %}
{% endfor %}<h2>Settings (config.json)</h2><p>Settings that differ from the defaults are highlighted.</p>
<table><tr><th>setting</th><th>this run</th><th>default</th></tr>
{% for name, value, default, changed in settings %}<tr{% if changed %} class=changed{% endif %}><td class=l>{{
name }}</td><td class=l>{{ value }}</td><td class=l>{{ default }}</td></tr>{% endfor %}</table>{% endif %}
</body></html>
"""
FIGURES = (  # a run page's figures: title, image, alt text, note
    ("Learning curves", "curves", "learning curves per fold", ""),
    ("Out-of-fold confusion matrix", "confusion", "confusion matrix",
     "Rows are the true class, columns the predicted one."),
    ("Per-class accuracy", "per_class", "per-class accuracy", ""),
    ("Most confident out-of-fold mistakes", "mistakes", "most confident mistakes",
     "{n} shown, surest first; row counts the images of input/train.csv from 0 (it is on line row + 2 "
     "of the file)."),
    ("Class balance: train labels and test predictions", "balance", "class balance",
     "Test predictions: {test_from}."))


def page(**values: Any) -> str:
    from jinja2 import Environment

    return Environment(autoescape=True).from_string(PAGE).render(**values)


def table(frame: pd.DataFrame, **digits: int) -> Markup:
    """A plain HTML table of a frame; floats get 4 decimals unless digits names the column."""
    from markupsafe import Markup

    return Markup(frame.to_html(index=False, border=0, na_rep="", float_format="{:.4f}".format,
                                formatters={c: f"{{:.{n}f}}".format for c, n in digits.items()}))


def facts(run: Run) -> list[tuple[str, str]]:
    record = run.record
    overall = run.cv[run.cv["fold"] == "all"]
    acc = float(overall["valid_acc"].iloc[0]) if len(overall) else float("nan")
    said = [("run", run.folder.id), ("OOF accuracy", f"{acc:.4f}"), ("folds", str(len(run.cv) - 1)),
            ("model", record.model), ("train rows", str(len(run.oof))), ("data source", record.source),
            ("device", record.where), ("time", format_seconds(record.seconds))]
    if record.kaggle:
        said.append(("trained on Kaggle", f"kernel {record.kaggle.url} (version "
                     f"{record.kaggle.version}, {record.kaggle.accelerator})"))
    if run.folder.is_blend:  # the honest figure first, as make runs shows it
        said[1] = ("OOF accuracy", f"{record.accuracy:.4f} honest (selection refitted "
                   f"without each fold; in-sample {acc:.4f})")
        said.append(("members", record.members()))
    return said + ([("submission", f"submissions/{record.kept}")] if record.kept else [])


def render(run: Run, paths: Paths, images: dict[str, str], per_class_frame: pd.DataFrame,
           mistakes: pd.DataFrame) -> str:
    config = run.record.config or run.folder.settings()
    changed, defaults = changed_settings(config), asdict(Settings())
    notes = {"n": len(mistakes), "test_from": f"runs/{run.folder.id}/test.csv"}
    return page(title="run report", root=paths.root, written=time.strftime("%Y-%m-%d %H:%M:%S"),
                sample=run.record.source == "sample", facts=facts(run), cv=table(run.cv, seconds=1),
                figures=[(t, k, a, n.format(**notes)) for t, k, a, n in FIGURES if k in images],
                images=images, per_class=table(per_class_frame),
                settings=[(k, v, defaults.get(k, ""), k in changed) for k, v in sorted(config.items())])


def pick(paths: Paths, name: str | None) -> RunDir:
    """The run named, else runs/latest; a report never trains, so without one it lists the runs."""
    if name:
        return run_dir(paths, name)
    name, why = latest(paths), "runs/latest is missing or unreadable"
    if name is not None:
        try:
            if run_dir(paths, name).completed() is not None:
                return run_dir(paths, name)
            why = f"runs/latest names {name}, which is not a complete run (forgotten or unfinished?)"
        except PipelineError as exc:
            why = f"runs/latest names {name}, whose record is damaged ({exc})"
    done = [r.id for r in all_runs(paths) if complete(r) is not None]
    if not done:
        raise PipelineError(f"report: no complete run in {paths.runs} to draw ({why}); "
                            "`make submit` makes one")
    raise PipelineError(f"report: {why}; name the run to draw: `make report RUN=<id>`, one of "
                        f"{', '.join(done)}")


def run(paths: Paths, run_dir: RunDir) -> Path:
    """Write reports/index.html and its figures for a run; returns the page's path."""
    try:
        return _draw(paths, run_dir)
    except (KeyError, ValueError, TypeError) as exc:  # a column or value missing from a damaged file
        fix = run_dir.remake() if run_dir.is_blend else (
            f"`make predict RUN={run_dir.id} FORCE=1` remakes its predictions, "
            f"`make train RUN={run_dir.id} FORCE=1` its models")
        raise PipelineError(f"RUN={run_dir.id}: a file of the run is damaged ({type(exc).__name__}: "
                            f"{exc}); {fix}") from exc


def _draw(paths: Paths, run_dir: RunDir) -> Path:
    started, run, out = time.perf_counter(), load_run(paths, run_dir), paths.reports
    matrix = oof_confusion(run)
    per_class_frame = per_class(matrix)
    mistakes = confident_mistakes(run.oof, run.data.train_y)
    accuracy = per_class_frame[["class", "accuracy"]].fillna(0)
    low = max(0.0, float(np.nan_to_num(per_class_frame["accuracy"].min(), nan=0.05)) - 0.05)
    images = {
        **({"curves": plot_learning_curves(run, out / "learning_curves.png")} if run.histories else {}),
        "confusion": plot_confusion(matrix, out / "confusion_matrix.png"),
        "per_class": plot_bars(accuracy, out / "per_class_accuracy.png", "true class",
                               "out-of-fold accuracy", legend=False, ylim=(low, 1)),
        "mistakes": plot_mistakes(run, mistakes, out / "confident_mistakes.png"),
        "balance": plot_bars(class_balance(run.data.train_y, run.test_pred), out / "class_balance.png",
                             "class", "share of rows"),
    }
    written = out / "index.html"
    atomic_write_text(written, render(run, paths, images, per_class_frame, mistakes))
    accuracy = f"{np.trace(matrix) / matrix.sum():.4f}"
    if run_dir.is_blend:
        accuracy = f"{run.record.accuracy:.4f} honest, {accuracy} in-sample"
    print(f"report: {run_dir.id}: wrote {written} and {len(images)} figures in "
          f"{time.perf_counter() - started:.1f}s (OOF accuracy {accuracy})")
    return written


# -- a tuning study --------------------------------------------------------------------------------

def draw_study(paths: Paths, study: str, url: str | None) -> Path:
    """reports/study-<name>/index.html: Optuna's own plots of the history and the importances."""
    from optuna.visualization import matplotlib as plots

    from pipeline.tuning.study import load, status

    made = load(paths, study, url)
    pyplot()  # the file-only backend, before Optuna's plots draw
    out = paths.reports / f"study-{study}"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, draw in (("history", plots.plot_optimization_history),
                       ("importances", plots.plot_param_importances)):
        try:
            axes = draw(made)
        except (ValueError, RuntimeError) as exc:  # importances need two complete trials and more
            figures.append((name, "", str(exc)))
            continue
        figure: Any = axes.figure  # a Figure (mypy also allows a SubFigure, which has no savefig)
        figure.set_size_inches(8, 4.5)
        figures.append((name, _save(figure, out / f"{name}.png", 4.5), ""))
    written = out / "index.html"
    atomic_write_text(written, page(title=f"study {study}", study=study, figures=figures,
                                    status=status(paths, study, url, made)))
    print(f"report: study {study}: wrote {written}")
    return written

