"""Pure pieces of `orchard demo`: stage failures, log reading, the terminal summary, the seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchard.app.demo import DemoOptions, StageFailed, dataset_dir, last_error, stderr_to, summary_lines
from orchard.app.report import ReportData, Stage
from orchard.core.errors import ExitStatus
from orchard.core.settings import load_settings


def test_stage_failure_names_the_stage_and_keeps_the_exit_status() -> None:
    exc = StageFailed("train", "no executors", ExitStatus.UNAVAILABLE)
    assert str(exc) == "demo failed at stage 'train': no executors"
    assert exc.exit_status == ExitStatus.UNAVAILABLE
    assert StageFailed("infer", "killed", -9).exit_status == ExitStatus.FAILURES  # a signal is no exit status


def test_last_error_prefers_the_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "upload.log"
    log.write_text(
        "09:00:01 INFO    uploader: started\n"
        "09:00:02 ERROR   orchard: MinIO unreachable at http://127.0.0.1:9000\n"
        "09:00:03 INFO    uploader: report: /tmp/r.json\n"
    )
    assert last_error(log) == "MinIO unreachable at http://127.0.0.1:9000"
    log.write_text("some output\nlast words\n\n")
    assert last_error(log) == "last words"
    log.write_text("")
    assert last_error(log) == "no output"


def test_synth_seed_is_stable_per_dataset_and_overridable(tmp_path: Path) -> None:
    assert DemoOptions("demo").synth_seed == DemoOptions("demo").synth_seed
    assert DemoOptions("demo").synth_seed != DemoOptions("other").synth_seed
    assert DemoOptions("demo", seed=7).synth_seed == 7
    s = load_settings(home=tmp_path)
    assert dataset_dir(s, DemoOptions("demo", 3, 10, 5, seed=1)) == tmp_path / "datasets" / "demo-3x10+5-seed1"


def test_stderr_to_captures_fd2_and_restores_it(tmp_path: Path) -> None:
    target = tmp_path / "spark.log"
    before = os.fstat(2).st_ino
    with stderr_to(target):
        os.write(2, b"from this process\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('from a child\\n')"], check=True)
    assert os.fstat(2).st_ino == before
    assert target.read_text() == "from this process\nfrom a child\n"


def test_summary_lines_show_counts_accuracy_and_every_stage(tmp_path: Path) -> None:
    data = ReportData(
        dataset="demo",
        generated_at="now",
        splits=["train", "test"],
        split_rows=[],
        totals={"train": 320, "test": 120, "total": 440},
        classes=8,
        model={
            "version": "cnn-1",
            "architecture": "cnn",
            "params": 1000,
            "epochs": 5,
            "metrics": {"test_accuracy": 0.9},
        },
        predicted=120,
        correct=108,
        accuracy=0.9,
    )
    stages = [Stage("upload", 10.0, 440, "files"), Stage("train", 100.0, 1600, "image-epochs")]
    text = "\n".join(summary_lines(data, stages, tmp_path / "index.html"))
    assert "440 (train 320 · test 120) in 8 classes" in text
    assert "90.0% on test (108/120 predictions in Elasticsearch)" in text
    assert "1,600 image-epochs" in text and "16.0" in text and "44.0" in text
    assert "1 min 50 s" in text  # the total
    assert str(tmp_path / "index.html") in text


def failing_pipeline(self, native: bool = True) -> None:
    raise StageFailed("upload", "MinIO unreachable", ExitStatus.UNAVAILABLE)


@pytest.mark.parametrize(("flags", "stops"), [([], 1), (["--keep"], 0)])
def test_a_failed_stage_exits_with_its_status_and_stops_the_stack_unless_keep(
    monkeypatch, tmp_path: Path, capfd, flags: list[str], stops: int
) -> None:
    from orchard.app.cli import main
    from orchard.stack import launcher

    stopped = []
    monkeypatch.setattr("orchard.app.demo.DemoRun.run_pipeline", failing_pipeline)
    monkeypatch.setattr(launcher, "down", lambda s, purge=False: stopped.append(s.home) or [])
    status = main(["--home", str(tmp_path), "demo", "--out", str(tmp_path / "out"), *flags])
    assert status == ExitStatus.UNAVAILABLE
    assert stopped == [tmp_path] * stops
    assert "demo failed at stage 'upload': MinIO unreachable" in capfd.readouterr().err
    assert not (tmp_path / "out" / "index.html").exists()


def test_report_only_keeps_the_stage_times_of_the_same_model_only(tmp_path: Path) -> None:
    from orchard.app.demo import previous_stages
    from orchard.app.report import stage_rows

    data = ReportData(
        dataset="demo", generated_at="now", splits=[], split_rows=[], totals={}, classes=0, model={"version": "cnn-2"}
    )
    stages = [Stage("train", 100.0, 1600, "image-epochs", command="orchard train"), Stage("report", 2.0, 440)]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"dataset": "demo", "model": {"version": "cnn-2"}, "stages": stage_rows(stages)}))
    assert previous_stages(summary, data) == stages[:1]
    summary.write_text(json.dumps({"dataset": "demo", "model": {"version": "cnn-1"}, "stages": stage_rows(stages)}))
    assert previous_stages(summary, data) == []
    assert previous_stages(tmp_path / "missing.json", data) == []


METRICS = {"test_loss": 0.3, "test_accuracy": 0.9, "train_accuracy": 0.95, "train_loss": 0.2}
EMPTY_STACK = {"software": {}, "machine": {}, "s3": {"buckets": []}, "elasticsearch": {}, "spark": {}, "indices": []}


def report_data(dataset: str, split: str, version: str, **more) -> ReportData:
    """A report of one image in `split`, the latest model `version`, and `more` fields."""
    model = {"version": version, "metrics": METRICS, "params": 10, "train_images": 8, "test_images": 2}
    totals = {"total": 1, split: 1}
    return ReportData(dataset, "now", [split], [], totals, 1, model=model, stack=EMPTY_STACK, **more)


def test_the_models_table_shows_each_versions_inference_rate_or_a_dash() -> None:
    from orchard.app.report import render_html

    listed = {"family": "cnn", "base": None, "test_accuracy": 0.9, "training_seconds": 61.5, "trained_on_version": 3}
    data = report_data(
        "fruits",
        "train",
        "cnn-2",
        models=[
            {**listed, "version": "cnn-2", "images_per_second": 123.45},
            {**listed, "version": "cnn-1", "images_per_second": None},
        ],
    )
    html = render_html(data, {}, [], None, {})
    table = html[html.index('id="model-table"') : html.index("</table>", html.index('id="model-table"'))]
    assert "<th>images/s (inference)</th>" in table
    measured, unmeasured = table.split('data-version="cnn-2"')[1].split('data-version="cnn-1"')
    assert "<td>123.5</td>" in measured and "<td>61.5</td>\n        <td>-</td>" in unmeasured


def test_a_tiled_raster_gets_its_class_map_and_counts() -> None:
    import numpy as np

    from orchard.app.report import plot_class_map, render_html

    grid = np.array([["water", "forest", ""], ["water", "water", "crop"]], dtype=object)
    png = plot_class_map(grid, ["crop", "forest", "water"])
    assert png.startswith("data:image/png;base64,") and len(png) > 500
    summary = {"count": 5, "rows": 2, "cols": 3, "label": "water", "model_version": "cnn-1"}
    classes = [{"label": "water", "count": 3}, {"label": "forest", "count": 1}, {"label": "crop", "count": 1}]
    data = report_data(
        "scenes", "test", "cnn-1", rasters=[{"key": "scenes/test/forest/a.tif", **summary, "classes": classes}]
    )
    html = render_html(data, {"class_maps": [png]}, [], None, {})
    section = html[html.index('id="rasters"') :]
    assert "scenes/test/forest/a.tif" in section and "5 tiles (2 \u00d7 3)" in section and png in section
    assert "water 3 · forest 1 · crop 1" in section
    html = render_html(data, {"class_maps": [None]}, [], None, {})
    assert "Too many tiles to draw" in html
