"""Benchmark: files/s of `orchard upload` (MinIO + Elasticsearch + the images table) vs `mc mirror` (MinIO only).

Both upload the same synthetic tree (default 50 classes x 100 = 5,000 JPEGs of 100x100) to the
same cluster in the same run, each into a fresh prefix of the images bucket that is deleted
(objects and documents) right after its round. Rounds run in ABBA order (orchard, mc, mc,
orchard) so background load drifting during the run affects both tools alike; files/s is total
files over total seconds per tool. Wall-clock time of each whole command is measured, process
start-up included. Logs go to stderr; the last line of stdout is one JSON object with files,
orchard_files_per_s, mc_files_per_s and ratio (orchard / mc).

    ~/.cache/orchard/venv/bin/python bench/upload.py [--classes 50 --per-class 100 --workers 8 --rounds 2]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elasticsearch.helpers import bulk, scan

from orchard.core.clients import es_client, s3_client
from orchard.core.objects import DeletesRefused, remove_prefix
from orchard.core.settings import Settings, load_settings
from orchard.core.table_write import delete_rows
from orchard.core.toolchain import Toolchain
from orchard.stack.mc import ALIAS as MC_ALIAS
from orchard.stack.mc import mc_env
from orchard.uploader.synth import synthesize

log = logging.getLogger("bench.upload")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8, help="orchard upload --workers")
    parser.add_argument("--rounds", type=int, default=2, help="uploads per tool, in ABBA order")
    parser.add_argument("--seed", type=int, default=None, help="default: the current time (fresh content)")
    return parser.parse_args(argv)


def timed(command: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run `command` to completion (output to `log_path`); returns wall-clock seconds."""
    started = time.perf_counter()
    with log_path.open("wb") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} ... failed with {result.returncode}:\n{log_path.read_text()[-3000:]}")
    return elapsed


def run_orchard(tree: Path, dataset: str, workers: int, work: Path) -> tuple[float, dict]:
    """`orchard upload`; returns (seconds, report)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    report = work / "orchard-report.json"
    command = [
        sys.executable,
        "-m",
        "orchard",
        "-q",
        "upload",
        str(tree),
        "--dataset",
        dataset,
        "--workers",
        str(workers),
        "--report",
        str(report),
    ]
    seconds = timed(command, env, work / "orchard.log")
    return seconds, json.loads(report.read_text())


def run_mc(settings: Settings, tree: Path, prefix: str, work: Path) -> float:
    """`mc mirror` of the tree under `prefix` of the images bucket; returns seconds.

    The alias comes from orchard.stack.mc.mc_env (a private config file), so no key is on the command line
    and any secret works, one that starts with `-` included.
    """
    mc = Toolchain.from_cache(settings.cache_dir).mc
    if not mc.exists():
        raise SystemExit(f"{mc} is missing: run `make deps`")
    target = f"{MC_ALIAS}/{settings.images_bucket}/{prefix}"
    with mc_env(settings) as env:
        return timed([str(mc), "--quiet", "mirror", str(tree), target], env, work / "mc.log")


def count_objects(settings: Settings, prefix: str) -> int:
    client = s3_client(settings)
    return sum(1 for _ in client.list_objects(settings.images_bucket, prefix=f"{prefix}/", recursive=True))


def clean_up(settings: Settings, name: str) -> None:
    """Delete a round's objects (prefix `name`), table rows and documents (dataset `name`)."""
    from orchard.core.lake import Field

    try:
        remove_prefix(s3_client(settings), settings.images_bucket, f"{name}/")
    except DeletesRefused as exc:
        log.warning("could not delete the objects under %s: %s", name, exc)
    delete_rows(settings, name)
    es = es_client(settings)
    es.indices.refresh(index=settings.images_index)
    hits = scan(es, index=settings.images_index, query={"query": {"term": {Field.DATASET: name}}}, _source=False)
    bulk(es, ({"_op_type": "delete", "_index": settings.images_index, "_id": h["_id"]} for h in hits))
    es.indices.refresh(index=settings.images_index)


def schedule(rounds: int) -> list[str]:
    """ABBA order (orchard, mc, mc, orchard, ...): drifting background load hits both tools alike."""
    order = []
    for index in range(rounds):
        order += ["orchard", "mc"] if index % 2 == 0 else ["mc", "orchard"]
    return order


def run_round(tool: str, settings: Settings, tree: Path, name: str, workers: int, work: Path) -> float:
    """Upload the tree once with `tool` under prefix `name`, check it is complete, delete it; returns seconds."""
    try:
        if tool == "orchard":
            seconds, report = run_orchard(tree, name, workers, work)
            stored = report["counts"]["uploaded"]
        else:
            seconds = run_mc(settings, tree, name, work)
            stored = count_objects(settings, name)
        log.info("%s: %.1f s, %d files stored", tool, seconds, stored)
    finally:
        clean_up(settings, name)
    expected = sum(1 for p in tree.rglob("*.jpg"))
    if stored != expected:
        raise SystemExit(f"{tool} stored {stored} of {expected} files")
    return seconds


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("elastic_transport", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    settings = load_settings()
    stamp = time.strftime("%Y%m%d%H%M%S")
    seed = args.seed if args.seed is not None else int(time.time())
    timings: dict[str, list[float]] = {"orchard": [], "mc": []}
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        summary = synthesize(tree, args.classes, args.per_class, 0, seed=seed, workers=min(4, os.cpu_count() or 1))
        log.info("synthesized %d files (%.1f MB)", summary.files, summary.bytes / 1e6)
        for index, tool in enumerate(schedule(args.rounds)):
            name = f"bench-{tool}-{stamp}-{index}"
            timings[tool].append(run_round(tool, settings, tree, name, args.workers, work))
    orchard_rate = summary.files * len(timings["orchard"]) / sum(timings["orchard"])
    mc_rate = summary.files * len(timings["mc"]) / sum(timings["mc"])
    result = {
        "files": summary.files,
        "bytes": summary.bytes,
        "rounds": args.rounds,
        "orchard_seconds": [round(t, 2) for t in timings["orchard"]],
        "mc_seconds": [round(t, 2) for t in timings["mc"]],
        "orchard_files_per_s": round(orchard_rate, 1),
        "mc_files_per_s": round(mc_rate, 1),
        "ratio": round(orchard_rate / mc_rate, 3),
        "orchard_workers": args.workers,
        "orchard_indexes_elasticsearch": True,
        "endpoint": settings.s3_url,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
