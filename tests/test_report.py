"""The report (reports/index.html and its figures), and the words it stops with."""

from __future__ import annotations

import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import copy_project, fake_run, run_cli, the_run

from pipeline.cli import main
from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.stages import report
from pipeline.store.run import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_run(sample_run: Path) -> Paths:
    """The suite's finished run on the built-in sample: 2 folds, 2 epochs, 32 units."""
    return Paths(sample_run)


def draw(paths: Paths) -> Path:
    return report.run(paths, the_run(paths.root))


@pytest.fixture(scope="session")
def page(tiny_run: Paths) -> Path:
    return draw(tiny_run)


def copy_run(paths: Paths, target: Path) -> Paths:
    """A private copy of the tiny run, for tests that damage it."""
    return Paths(copy_project(paths.root, target / "run", ignore=shutil.ignore_patterns("reports")))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert (length, kind) == (13, b"IHDR"), f"{path.name} does not start with an IHDR chunk"
    return struct.unpack(">II", head[16:24])


class ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources += [v or "" for k, v in attrs if k == "src"]


def image_sources(page: Path) -> list[str]:
    parser = ImageSources()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.sources


@pytest.mark.slow
def test_report_writes_index_html_in_reports(tiny_run: Paths, page: Path) -> None:
    assert page == tiny_run.reports / "index.html"
    text = page.read_text(encoding="utf-8")
    cv = pd.read_csv(the_run(tiny_run.root).cv, dtype={"fold": str})
    oof_acc = float(cv.loc[cv["fold"] == "all", "valid_acc"].iloc[0])
    assert f"{oof_acc:.4f}" in text  # the overall OOF accuracy of cv.csv
    assert "<th>best_epoch</th>" in text and "<td>all</td>" in text  # the cv.csv table
    assert "<th>setting</th>" in text and "label_smoothing" in text  # the config table
    assert "class=changed><td class=l>epochs</td><td class=l>2</td>" in text  # epochs differs
    assert "SAMPLE" in text  # a run on the sample says so


@pytest.mark.slow
def test_every_figure_is_a_png_of_sensible_size_the_page_references_next_to_it(page: Path) -> None:
    figures = sorted(page.parent.glob("*.png"))
    assert len(figures) == 5
    for figure in figures:
        width, height = png_size(figure)
        assert 100 <= width <= 4000 and 100 <= height <= 4000, (figure.name, width, height)
    sources = image_sources(page)
    assert sorted(sources) == [f.name for f in figures]
    assert not any(src.startswith(("/", "file:", "http")) or ".." in src for src in sources), sources


@pytest.mark.slow
def test_confusion_matrix_counts_every_train_row(tiny_run: Paths) -> None:
    run = report.load_run(tiny_run, the_run(tiny_run.root))
    matrix = report.oof_confusion(run)
    assert matrix.shape == (10, 10)
    assert matrix.sum() == len(run.data.train_y) == len(np.load(tiny_run.prepared / "train_x.npy"))
    assert (matrix.sum(1) == np.bincount(run.data.train_y, minlength=10)).all()
    cv = pd.read_csv(the_run(tiny_run.root).cv, dtype={"fold": str})
    oof_acc = float(cv.loc[cv["fold"] == "all", "valid_acc"].iloc[0])
    assert np.trace(matrix) / matrix.sum() == pytest.approx(oof_acc)


def test_confusion_matrix_and_per_class_accuracy_and_precision_by_hand() -> None:
    matrix = report.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], classes=3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    table = report.per_class(matrix)
    np.testing.assert_allclose(table["accuracy"], [1 / 2, 1, 2 / 3])
    np.testing.assert_allclose(table["precision"], [1 / 2, 1 / 2, 1])
    assert table["rows"].tolist() == [2, 1, 3]


def test_confident_mistakes_are_wrong_and_surest_first() -> None:
    probs = np.full((4, 10), 0.0)
    probs[0, 1], probs[0, 0] = 0.6, 0.4  # label 0 -> 1 at 0.6
    probs[1, 0] = 1.0  # right
    probs[2, 3], probs[2, 2] = 0.9, 0.1  # label 2 -> 3 at 0.9
    probs[3, 5], probs[3, 4] = 0.5, 0.5  # tie: argmax takes the first, 4, which is right
    mistakes = report.confident_mistakes(probs, np.array([0, 0, 2, 4]))
    assert mistakes["row"].tolist() == [2, 0]
    assert mistakes["predicted"].tolist() == [3, 1]
    assert mistakes["confidence"].tolist() == pytest.approx([0.9, 0.6])


def test_report_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"RUN=rnn-x: no complete run of that name"):
        report.run(Paths(tmp_path), RunDir(tmp_path / "runs" / "rnn-x"))
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_report_shows_the_settings_the_ensemble_was_trained_with(tiny_run: Paths,
                                                                 tmp_path: Path) -> None:
    paths = copy_run(tiny_run, tmp_path)
    run = the_run(paths.root)
    assert report.load_run(paths, run).record.config["hidden"] == 32
    text = draw(paths).read_text(encoding="utf-8")
    assert run.id in text and "<td class=l>hidden</td><td class=l>32</td>" in text


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "said"), [
    (lambda run: run.log(1).unlink(), r"fold_1\.csv: missing"),  # a missing file of the run
    (lambda run: pd.read_csv(run.oof).iloc[:5].to_csv(run.oof, index=False), "make predict RUN="),
], ids=["missing-log", "other-data"])
def test_report_names_a_damaged_run(tiny_run: Paths, tmp_path: Path, damage: Any, said: str) -> None:
    paths = copy_run(tiny_run, tmp_path)
    damage(the_run(paths.root))
    with pytest.raises(PipelineError, match=said):
        draw(paths)


@pytest.mark.slow
def test_a_run_without_mistakes_still_gets_its_figure(tiny_run: Paths, tmp_path: Path) -> None:
    run = report.load_run(tiny_run, the_run(tiny_run.root))
    none = report.confident_mistakes(run.oof, run.data.train_y).head(0)
    name = report.plot_mistakes(run, none, tmp_path / "mistakes.png")
    width, height = png_size(tmp_path / name)
    assert 100 <= width <= 4000 and 100 <= height <= 4000


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cv_table_stops_the_report_in_words(run_copy: Path, damage: str) -> None:
    run = the_run(run_copy)
    text = run.cv.read_text()
    run.cv.write_text("fold,valid\nx,\x01\n" if damage == "garbage" else text.splitlines()[0] + "\n"
                      + text.splitlines()[1] + "\n")
    result = run_cli(run_copy, "report", "--run", run.id, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cv.csv" in result.stderr and f"make predict RUN={run.id} FORCE=1" in result.stderr


def test_a_blend_report_headlines_the_honest_accuracy() -> None:
    from types import SimpleNamespace

    from pipeline.store.run import RunRecord

    cv = pd.DataFrame({"fold": ["0", "1", "all"], "valid_acc": [0.9, 0.9, 0.95]})
    blend = RunRecord(kind="blend", model="blend", oof_acc=0.95, oof_loss=0.2, fold_min=0.9,
                      fold_max=0.9, seconds=1.0, finished=1.7e9, data="d", n_folds=2, fold_seed=42,
                      oof_acc_honest=0.91, weights={"a": 1, "b": 2})
    run = SimpleNamespace(cv=cv, folder=RunDir(Path("runs/blend-x")), oof=np.zeros((4, 10)), record=blend)
    said = dict(report.facts(run))  # type: ignore[arg-type]
    assert said["OOF accuracy"].startswith("0.9100 honest") and "in-sample 0.9500" in said["OOF accuracy"]


GOOD, OTHER, BAD = "rnn-h32-e2-good00", "gru-h32-e2-bbbbbb", "rnn-h32-e2-bad000"
PICK = [f"{BAD}/run.json: not valid JSON", "damaged"], ["no complete run", "not a complete run"]
PICKS = {  # runs (None: a record cut short), runs/latest, RUN=; what the error says, and never says
    "no-latest": ({GOOD: {}, OTHER: {}, BAD: {"key": ""}}, None, [],
                  ["make report RUN=<id>", "runs/latest is missing", GOOD, OTHER], [BAD]),
    "latest-garbage": ({GOOD: {}, OTHER: {}}, "garbage/\n", [], ["make report RUN=<id>", GOOD, OTHER], []),
    "latest-gone": ({GOOD: {}, OTHER: {}}, "rnn-h32-e2-gone00", [], ["make report RUN=<id>", GOOD, OTHER],
                    ["RUN=rnn-h32-e2-gone00:"]),  # never a RUN= the user did not give
    "no-run-at-all": ({}, None, [], ["make submit"], []),
    "latest-damaged": ({GOOD: {}, BAD: {"fold_min": "x"}}, BAD, [], [GOOD, f"runs/latest names {BAD}, "
                       f"whose record is damaged", f"{BAD}/run.json: missing or not valid: fold_min"], []),
    "latest-truncated": ({GOOD: {}, BAD: None}, BAD, [], *PICK),
    "named-truncated": ({GOOD: {}, BAD: None}, BAD, ["--run", BAD], *PICK),
}


@pytest.mark.parametrize("case", list(PICKS))
def test_a_report_without_a_run_to_draw_says_why_and_makes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    runs, latest, named, said, unsaid = PICKS[case]
    for name, changes in runs.items():
        record = fake_run(tmp_path, name, **(changes or {})) / "run.json"
        if changes is None:
            record.write_bytes(record.read_bytes()[:40])
    if latest is not None:
        (tmp_path / "runs" / "latest").write_text(latest)
    assert main(["--root", str(tmp_path), "report", *named]) == 1
    err = capsys.readouterr().err
    assert all(words in err for words in said) and not any(words in err for words in unsaid), err
    assert not (tmp_path / "input").exists() and not (tmp_path / "reports").exists()
