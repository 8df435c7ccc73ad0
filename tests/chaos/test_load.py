"""Load: several concurrent `orchard upload` clients for a bounded time against the 4-node MinIO.

Each client uploads chunks of freshly generated, unique JPEGs into its own dataset, one
`orchard upload` process per chunk, and starts no new chunk once the time budget is spent (so
the whole test stays under 2 minutes). The figure reported is files/s over all clients; the
assertions are 0 errors and 0 lost: every file readable back with its sha256, every document there.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import READ_ERRORS, ChaosStack, Ledger, count_docs, object_sha256, upload_args

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.load")

CLIENTS = 4
CHUNK = 200  # files per `orchard upload` run
BUDGET_S = 60.0  # no new chunk starts after this; a running chunk finishes (timeout below)
CHUNK_TIMEOUT_S = 55.0


@dataclass
class Client:
    """One upload client: its dataset, its files (key -> sha256) and its failures."""

    index: int
    dataset: str
    files: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    chunks: int = 0


def jpeg(rng: np.random.Generator, side: int = 48) -> bytes:
    """A small unique JPEG (noise: every file differs, so no upload is a duplicate)."""
    pixels = rng.integers(0, 255, (side, side, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def write_chunk(root: Path, client: Client, chunk: int, seed: int) -> dict[str, str]:
    """CHUNK files under root/Training/load/; returns their keys -> sha256."""
    import hashlib

    folder = root / "Training" / "load"
    folder.mkdir(parents=True)
    keys = {}
    for i in range(CHUNK):
        data = jpeg(np.random.default_rng([seed, client.index, chunk, i]))
        name = f"c{client.index}-k{chunk:03d}-{i:04d}.jpg"
        (folder / name).write_bytes(data)
        keys[f"{client.dataset}/train/load/{name}"] = hashlib.sha256(data).hexdigest()
    return keys


def run_client(chaos: ChaosStack, client: Client, deadline: float, seed: int, work: Path) -> None:
    """Upload chunk after chunk until the deadline; failures are collected, never raised."""
    chunk = 0
    while time.monotonic() < deadline:
        root = work / f"c{client.index}-k{chunk:03d}"
        keys = write_chunk(root, client, chunk, seed)
        report = root / "report.json"
        job = chaos.start(*upload_args(root, client.dataset, "--report", str(report)))
        try:
            job.proc.wait(timeout=CHUNK_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a hung client is an error, counted below
            job.kill()
        run = job.wait(timeout=5)
        counts = json.loads(report.read_text())["counts"] if report.exists() else {}
        if run.returncode != 0 or counts.get("uploaded") != CHUNK or counts.get("failed"):
            client.errors.append(f"chunk {chunk}: exit {run.returncode}, counts {counts}, log {run.log_path}")
        client.files.update(keys)
        client.chunks += 1
        chunk += 1


def lost_files(chaos: ChaosStack, clients: list[Client]) -> dict[str, str]:
    """key -> why, for every uploaded file that cannot be read back with its sha256."""
    bucket = chaos.settings.images_bucket
    expected = {k: v for c in clients for k, v in c.files.items()}
    local = threading.local()

    def check(item: tuple[str, str]) -> tuple[str, str | None]:
        if not hasattr(local, "client"):
            local.client = chaos.s3()
        key, sha = item
        try:
            got = object_sha256(local.client, bucket, key)
        except READ_ERRORS as exc:  # any read failure is a lost file
            return key, f"{type(exc).__name__}: {exc}"[:200]
        return key, None if got == sha else "sha256 differs"

    with ThreadPoolExecutor(max_workers=8) as pool:
        return {key: why for key, why in pool.map(check, expected.items()) if why}


def test_concurrent_upload_clients(chaos: ChaosStack, ledger: Ledger, tmp_path: Path):
    chaos.up()
    clients = [Client(i, chaos.dataset(f"load-{i}")) for i in range(CLIENTS)]
    began = time.monotonic()
    threads = [
        threading.Thread(target=run_client, args=(chaos, c, began + BUDGET_S, chaos.seed(7000), tmp_path))
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    total = sum(len(c.files) for c in clients)
    rate = total / elapsed
    log.info("load: %d clients uploaded %d files in %.1fs = %.1f files/s", CLIENTS, total, elapsed, rate)
    ledger.figures["load: files/s (4 concurrent upload clients)"] = round(rate, 1)

    errors = [e for c in clients for e in c.errors]
    lost = lost_files(chaos, clients)
    es, index = chaos.es(), chaos.settings.images_index
    missing_docs = sum(len(c.files) - count_docs(es, index, c.dataset) for c in clients)
    ledger.record(
        f"load: {CLIENTS} concurrent `orchard upload` clients for {BUDGET_S:.0f}s against the 4-node MinIO (127.0.0.1)",
        f"{total} files in {elapsed:.0f}s = {rate:.1f} files/s, {len(errors)} errors",
        len(lost) + missing_docs,
    )
    assert total >= CLIENTS * CHUNK, "every client should have uploaded at least one chunk"
    assert not errors, errors
    assert not lost, f"{len(lost)} files lost: {dict(list(lost.items())[:5])}"
    assert missing_docs == 0
