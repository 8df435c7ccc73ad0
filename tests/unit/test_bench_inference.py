"""The pure helpers of bench/inference.py: figures of a measurement, ratios, summary, child commands."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def full_row(bench, images: int, orchard_rss: float) -> dict:
    """A size's row as measure_size builds it, every approach measured."""
    row: dict = {"images": images, "sync_seconds": 3.0}
    for i, approach in enumerate(bench.APPROACHES):
        rss = {"driver_rss_mb": orchard_rss if approach == "orchard" else 100.0, "driver_jvm_rss_mb": 50.0}
        if approach == "train":
            result = {"train_ieps": 40.0, "train_binaryfile_ieps": 20.0, "train_images": images, **rss}
        elif approach in bench.CLI_COMMANDS:
            result = {"images": images, "seconds": 2.0, "images_per_second": 100.0, "table_version": 4, **rss}
        else:
            result = {"ips": 10.0 * (i + 1), "images": images, "seconds": 1.0, **rss}
        row.update(bench.figures(approach, result))
    return row


def test_figures_prefixes_keys_and_reads_cli_summaries(bench):
    r = bench.figures(
        "orchard",
        {
            "images": 10,
            "seconds": 2.0,
            "images_per_second": 5.2,
            "driver_rss_mb": 1.0,
            "driver_jvm_rss_mb": 2.0,
            "updated": 10,
        },
    )
    assert r == {
        "orchard_ips": 5.2,
        "orchard_images": 10,
        "orchard_seconds": 2.0,
        "orchard_table_version": None,
        "orchard_driver_rss_mb": 1.0,
        "orchard_driver_jvm_rss_mb": 2.0,
    }


def test_features_rate_is_images_over_seconds(bench):
    r = bench.figures("features", {"images": 10, "seconds": 4.0, "driver_rss_mb": 1.0, "driver_jvm_rss_mb": 2.0})
    assert r["features_ips"] == 2.5


def test_train_keeps_its_own_keys(bench):
    r = bench.figures(
        "train", {"train_ieps": 3.0, "train_binaryfile_ieps": 1.5, "driver_rss_mb": 1.0, "driver_jvm_rss_mb": 2.0}
    )
    assert r == {
        "train_ieps": 3.0,
        "train_binaryfile_ieps": 1.5,
        "train_driver_rss_mb": 1.0,
        "train_driver_jvm_rss_mb": 2.0,
    }


def test_summary_has_every_key(bench):
    final = bench.summarise({200: full_row(bench, 200, 400.0), 800: full_row(bench, 800, 500.0)})
    row = final["sizes"]["800"]
    for approach in bench.APPROACHES:
        assert f"{approach}_driver_rss_mb" in row
    for key in (
        "model_only_ips",
        "orchard_ips",
        "binaryfile_ips",
        "elephas_ips",
        "pandas_udf_ips",
        "predict_batch_udf_ips",
        "features_ips",
        "features_binaryfile_ips",
        "train_ieps",
        "train_binaryfile_ieps",
    ):
        assert row[key] is not None, key
    ratios = final["ratios"]["200"]
    assert set(ratios) == set(bench.RATIOS)
    assert all(v is not None for v in ratios.values())
    assert ratios["orchard_over_model_only"] == 10.0  # 100 / 10
    assert ratios["train_speedup"] == 2.0
    assert final["driver_rss_growth_pct"] == 25.0
    assert final["driver_rss_growth_pct_by_approach"]["elephas"] == 0.0


def test_missing_or_failed_approaches_give_none(bench):
    rows = {200: {"orchard_ips": 5.0, "orchard_driver_rss_mb": 300.0, "elephas_error": "boom"}}
    final = bench.summarise(rows)
    assert final["ratios"]["200"]["orchard_over_elephas"] is None
    assert final["driver_rss_growth_pct"] is None  # one size only
    assert final["driver_rss_growth_pct_by_approach"] == {"orchard": None}


def test_child_commands(bench):
    job = bench.Job("ds", "v1", images_per_partition=512, epochs=3)
    infer = bench.child_argv("orchard", job)
    assert infer[2:3] == ["infer"] and "--force" in infer and "--json" in infer
    assert infer[infer.index("--images-per-partition") + 1] == "512"
    assert "--force" not in bench.child_argv("features", job)
    train = bench.child_argv("train", job)
    assert "--child" in train and train[train.index("--train-epochs") + 1] == "3"
    args = bench.parse_args(train[2:])
    assert (args.child, args.dataset, args.model, args.images_per_partition, args.train_epochs) == (
        "train",
        "ds",
        "v1",
        512,
        3,
    )


def test_apps_between_and_contended(bench, monkeypatch):
    state = {
        "activeapps": [{"name": "other", "starttime": 5_000, "duration": 1_000}],
        "completedapps": [
            {"name": "bench-elephas", "starttime": 1_000, "duration": 2_000},
            {"name": "before", "starttime": 0, "duration": 500},
        ],
    }
    monkeypatch.setattr(bench, "master_state", lambda s: state)
    assert bench.apps_between(None, 900, 4_000) == ["bench-elephas"]
    assert bench.apps_between(None, 900, 5_500) == ["bench-elephas", "other"]
    rows = {
        200: {"elephas_cluster_apps": ["bench-elephas"], "model_only_cluster_apps": []},
        800: {"elephas_cluster_apps": ["bench-elephas", "other"], "model_only_cluster_apps": ["other"]},
    }
    assert bench.contended(rows) == ["800:model_only", "800:elephas"]
