"""Transfer learning vs Orchard's CNN from scratch, and the ImageNet featurizer, on one synthetic split.

One run, one dataset (`bench-transfer-<seed>`: --classes x --per-class train + --test-per-class test
100x100 JPEGs written by `orchard dataset synth`, uploaded with the real uploader), every step a
real CLI command on the running stack, in this order:

  features_cold   `orchard features --model imagenet:efficientnet-lite0`: every image through the
                  base (224x224, in the executors) into the embeddings table, PCA, documents;
  features_warm   the same command again: the embeddings come from the table;
  cnn             `orchard train` (the CNN from scratch) for --cnn-epochs;
  transfer        `orchard train --base efficientnet-lite0` for --transfer-epochs (embeddings stored).

Rates are images / the command's own `seconds` (Spark session start excluded, fixed costs such as
the table freshness check included); wall seconds include the session start. Prints one JSON line per
step and, last, one JSON object with the figures and the ratios: `accuracy_transfer_minus_cnn`,
`training_seconds_cnn_over_transfer` (embeddings stored), `..._cold` (the transfer run charged the
cold features run's extra seconds, what a first run on new images costs) and
`features_warm_over_cold` (rates).

  PYTHONPATH=. python bench/transfer.py [--classes 10 --per-class 100 --test-per-class 30]

Needs the stack (`bin/orchard stack up`); leaves the dataset's objects, rows and versions in place
(a re-run with the same --seed reuses them; the embeddings table keeps its rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "efficientnet-lite0"
log = logging.getLogger("bench.transfer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--cnn-epochs", type=int, default=5)
    parser.add_argument("--transfer-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None, help="default: the current time (fresh content)")
    return parser.parse_args(argv)


def orchard(*args: str) -> tuple[dict | None, float]:
    """Run `python -m orchard -q ARGS` (stdout's last line parsed as JSON if it is); returns
    (that JSON or None, wall seconds). SystemExit with the end of stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchard", "-q", *args], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"orchard {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return (json.loads(last) if last.startswith("{") else None), wall


def prepare(o: argparse.Namespace, seed: int, work: Path, prefix: str = "bench-transfer") -> str:
    """Synthesize and upload the dataset `<prefix>-<seed>`; returns its name."""
    dataset = f"{prefix}-{seed}"
    tree = work / "tree"
    counts = ("--classes", str(o.classes), "--per-class", str(o.per_class), "--test-per-class", str(o.test_per_class))
    orchard("dataset", "synth", str(tree), *counts, "--seed", str(seed))
    orchard("upload", str(tree), "--dataset", dataset)
    return dataset


def features_step(name: str, dataset: str) -> dict:
    """One `orchard features --model imagenet:...` run's figures."""
    summary, wall = orchard("features", "--dataset", dataset, "--model", f"imagenet:{BASE}", "--json")
    assert summary is not None
    return {
        "step": name,
        "images": summary["images"],
        "embedded_now": summary["embedded_now"],
        "k": summary["k"],
        "seconds": summary["seconds"],
        "images_per_second": summary["images_per_second"],
        "wall_seconds": round(wall, 1),
    }


def train_step(name: str, dataset: str, epochs: int, *flags: str) -> dict:
    """One `orchard train` run's figures."""
    summary, wall = orchard("train", "--dataset", dataset, "--epochs", str(epochs), *flags, "--json")
    assert summary is not None
    return {
        "step": name,
        "version": summary["version"],
        "epochs": epochs,
        "test_accuracy": summary["test_accuracy"],
        "training_seconds": summary["training_seconds"],
        "base_forward_passes": summary.get("base_forward_passes"),
        "wall_seconds": round(wall, 1),
    }


def report_steps(steps: list[dict]) -> dict[str, dict]:
    """Print one JSON line per step; returns the steps by name."""
    for step in steps:
        print(json.dumps(step), flush=True)
    return {step["step"]: step for step in steps}


def split_facts(o: argparse.Namespace, dataset: str) -> dict:
    """The dataset and split sizes of a run (the head of its last JSON object)."""
    return {
        "dataset": dataset,
        "classes": o.classes,
        "train_images": o.classes * o.per_class,
        "test_images": o.classes * o.test_per_class,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    o = parse_args(argv)
    seed = o.seed if o.seed is not None else int(time.time()) % 1_000_000
    with tempfile.TemporaryDirectory(prefix="orchard-bench-transfer-") as tmp:
        dataset = prepare(o, seed, Path(tmp))
    steps = [
        features_step("features_cold", dataset),
        features_step("features_warm", dataset),
        train_step("cnn", dataset, o.cnn_epochs),
        train_step("transfer", dataset, o.transfer_epochs, "--base", BASE),
    ]
    by = report_steps(steps)
    result = {
        **split_facts(o, dataset),
        "steps": by,
        "accuracy_transfer_minus_cnn": round(by["transfer"]["test_accuracy"] - by["cnn"]["test_accuracy"], 4),
        "training_seconds_cnn_over_transfer": round(
            by["cnn"]["training_seconds"] / by["transfer"]["training_seconds"], 3
        ),
        # the first transfer run on new images also embeds them: charge it the cold features' extra time
        "training_seconds_cnn_over_transfer_cold": round(
            by["cnn"]["training_seconds"]
            / (by["transfer"]["training_seconds"] + by["features_cold"]["seconds"] - by["features_warm"]["seconds"]),
            3,
        ),
        "features_warm_over_cold": round(
            by["features_warm"]["images_per_second"] / by["features_cold"]["images_per_second"], 3
        ),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
