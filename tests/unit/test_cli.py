"""CLI wiring: exit statuses and help, without services."""

from __future__ import annotations

import json
import subprocess
import sys

from orchard.app.cli import main
from orchard.core.errors import ExitStatus
from orchard.core.toolchain import REPO_ROOT


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == ExitStatus.OK
    out = capsys.readouterr().out
    for name in ("stack", "upload", "train", "infer", "features", "search", "demo"):
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == ExitStatus.USAGE


def test_status_of_a_stack_that_never_ran_is_unavailable(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "stack", "status", "--json"]) == ExitStatus.UNAVAILABLE
    assert '"health": "down"' in capsys.readouterr().out


def test_logs_of_an_unknown_service_is_a_config_error(tmp_path):
    assert main(["--home", str(tmp_path), "stack", "logs", "nope"]) == ExitStatus.CONFIG


HEAVY = ("tensorflow", "keras", "pyspark", "elephas")


def test_help_and_status_load_neither_tensorflow_nor_pyspark(tmp_path):
    """`orchard --help` and `orchard stack status` stay fast: no TensorFlow, Keras, Elephas or pyspark."""
    probe = (
        "import sys\n"
        "from orchard.app.cli import main\n"
        f"main(['--help']); main(['--home', {str(tmp_path)!r}, 'stack', 'status', '--json'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]


def test_the_probe_would_see_tensorflow_if_it_were_loaded():
    probe = (
        f"import sys, orchard.spark_app.model\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "tensorflow" in out.stdout


def test_predict_prints_one_line_or_one_json_object_per_file() -> None:
    from orchard.app.predict_cli import as_line
    from orchard.spark_app.local_prediction import FilePrediction

    good = FilePrediction("a b.jpg", "cnn-1", (("apple", 0.91234567), ("pear", 0.05)))
    bad = FilePrediction("notes.txt", "cnn-1", error="undecodable image: UnidentifiedImageError")
    assert as_line(good) == "a b.jpg: apple 0.912, pear 0.050"
    assert as_line(bad) == "notes.txt: error: undecodable image: UnidentifiedImageError"
    assert good.as_dict() == {
        "file": "a b.jpg",
        "model": "cnn-1",
        "top5": [{"label": "apple", "probability": 0.912346}, {"label": "pear", "probability": 0.05}],
    }
    assert bad.as_dict()["top5"] == [] and bad.as_dict()["error"].startswith("undecodable")


def test_models_list_summarises_registry_documents_old_and_new() -> None:
    from orchard.app.models_cli import cell
    from orchard.spark_app.registry import version_summary

    new = {
        "version": "cnn-20261202143000-1a2b3c4d",
        "family": "cnn",
        "base": None,
        "dataset": "fruits",
        "created_at": "2026-12-02T14:30:00+00:00",
        "trained_on_version": 4,
        "test_images": 40,
        "metrics": {"test_accuracy": 0.9125, "test_loss": 0.3},
        "training_seconds": 61.5,
    }
    summary = version_summary(new)
    assert summary["family"] == "cnn" and summary["test_accuracy"] == 0.9125 and summary["training_seconds"] == 61.5
    assert summary["images_per_second"] is None  # never run by `orchard infer`
    measured = version_summary({**new, "inference": {"images_per_second": 123.4, "images": 100, "seconds": 0.8}})
    assert measured["images_per_second"] == 123.4
    old = version_summary({"version": "user-tiny-0123456789", "created_at": "2026-01-01T00:00:00+00:00"})
    assert (old["family"], old["dataset"], old["test_accuracy"], old["training_seconds"]) == ("user", None, None, None)
    assert old["images_per_second"] is None
    assert [cell("test_accuracy", 0.9125), cell("base", None), cell("training_seconds", 61.5)] == ["0.912", "-", "61.5"]
    assert [cell("images_per_second", 123.456), cell("images_per_second", 80), cell("images_per_second", None)] == [
        "123.5",
        "80.0",
        "-",
    ]


def test_models_list_shows_the_inference_rate_column_and_json(monkeypatch, capsys):
    from orchard.app import models_cli

    versions = [
        dict.fromkeys(models_cli.COLUMNS) | {"version": "cnn-2", "images_per_second": 95.27},
        dict.fromkeys(models_cli.COLUMNS) | {"version": "cnn-1"},
    ]
    monkeypatch.setattr(models_cli, "list_versions", lambda s, dataset, limit: versions)
    assert main(["models", "list"]) == ExitStatus.OK
    header, *rows = capsys.readouterr().out.splitlines()
    assert "images_per_second" in header and header.index("training_seconds") < header.index("images_per_second")
    assert "95.3" in rows[0] and "95.27" not in rows[0] and rows[1].split()[6] == "-"
    assert main(["models", "list", "--json"]) == ExitStatus.OK
    assert [v["images_per_second"] for v in json.loads(capsys.readouterr().out)] == [95.27, None]
