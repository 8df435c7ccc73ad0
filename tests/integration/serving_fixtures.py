"""Fixtures and helpers shared by the tests of `orchard serve` on the real native stack (its API in
test_serving.py, its web page in test_serving_page.py): a CNN version trained, featurized and
promoted on a fresh synthetic dataset, and an HTTP client of the stack's service once it serves it.

Session-scoped (tests/integration/conftest.py makes them fixtures of every integration test): the
API and page tests share one dataset and version, cleaned up at the end of the session.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from lake_datasets import Dataset, clean_up, synth
from orchard_cli import last_json, ok, orchard

from orchard.core.settings import Settings

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 20, 5


@pytest.fixture(scope="session")
def served(stack: Settings, tmp_path_factory):
    """(dataset, version, the test photos): a CNN version trained and featurized on a fresh
    dataset, promoted, and serving."""
    token = os.urandom(3).hex()
    root = synth(tmp_path_factory.mktemp("serve") / "fruits", CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, int(token, 16))
    ds = Dataset(f"it-serve-{token}", stack, corrupt_key="")
    try:
        ok(orchard("upload", str(root), "--dataset", ds.name))
        trained = last_json(ok(orchard("train", "--dataset", ds.name, "--epochs", "2", "--batch-size", "8", "--json")))
        version = trained["version"]
        ds.versions.append(version)
        ok(orchard("features", "--dataset", ds.name, "--model", version))
        yield ds, version, sorted((root / "Test").rglob("*.jpg"))
    finally:
        clean_up(ds)


@pytest.fixture(scope="session")
def api(stack: Settings, served):
    """An HTTP client of the stack's service, once it serves the promoted version."""
    _, version, _ = served
    with httpx.Client(base_url=stack.serve_url, timeout=60) as client:
        pid_before = service_pid(stack)
        ok(orchard("models", "promote", version))
        health = wait_for_model(client, version)
        assert health["ready"] and service_pid(stack) == pid_before  # picked up without a restart
        yield client


def service_pid(s: Settings) -> int:
    """The pid of the stack's serve service (`orchard stack status`)."""
    rows = json.loads(ok(orchard("stack", "status", "--json")).stdout)
    return next(row["pid"] for row in rows if row["service"] == "serve")


def wait_for_model(client: httpx.Client, version: str, seconds: float = 180) -> dict:
    """/healthz once the service serves `version` (AssertionError after `seconds`)."""
    deadline, health = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        health = client.get("/healthz").json()
        if health.get("model") == version:
            return health
        time.sleep(1)
    raise AssertionError(f"the service did not load {version} in {seconds:.0f}s: {health}")


def posted(client: httpx.Client, paths: list[Path], **params) -> httpx.Response:
    """POST /v1/predict with the files as multipart parts."""
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post("/v1/predict", files=files, params=params)
