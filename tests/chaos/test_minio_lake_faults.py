"""The images table: a MinIO node killed while `orchard lake sync` reads the new objects and
commits them must lose nothing (the 4-node erasure set keeps read and write quorum with one node
down; s3a and the executors' reads retry through the load balancer).

Named to run after test_minio_faults.py: its proof of healing reads objects from two healed drives
only, and in CI run ci6 it failed (117 of 360 objects unreadable, SlowDownRead) when this test had
killed and restarted a node just before it; whether that was the cause is not proven yet."""

from __future__ import annotations

import logging

import pytest

from conftest import ChaosStack, Ledger, files_by_key, read_json_line, synth, upload, wait_for

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.lake")

VICTIM = "minio2"


@pytest.fixture
def lake_stack(chaos: ChaosStack):
    """The chaos stack; the killed MinIO node is restarted afterwards, whatever happened."""
    chaos.up()
    yield chaos
    chaos.up()


def test_a_minio_node_killed_during_a_lake_sync_loses_nothing(lake_stack: ChaosStack, ledger: Ledger):
    chaos = lake_stack
    dataset = chaos.dataset("lake-faults")
    tree = synth(chaos, dataset, per_class=150, seed=chaos.seed(7000))  # 450 files
    files = files_by_key(tree, dataset)
    assert upload(chaos, tree, dataset, "--no-table").returncode == 0  # the sync below writes the table

    job = chaos.start("lake", "sync", "--dataset", dataset, "--json")
    wait_for(
        lambda: "objects are new, reading them" in job.stderr_so_far(),
        timeout=600,
        what="the sync to start reading the new objects",
        while_=job.running,
    )
    chaos.kill(VICTIM)
    run = job.wait(timeout=900)
    assert run.returncode == 0, run.tail()
    result = read_json_line(run.stdout)
    again = read_json_line(chaos.cli("lake", "sync", "--dataset", dataset, "--full", "--json").stdout)
    missing = len(files) - result["added"]
    ledger.record(
        f"SIGKILL {VICTIM} (1 of 4 MinIO nodes) during `orchard lake sync`",
        f"{len(files)} objects synced into the images table",
        missing + again["added"],
    )
    assert result["listed"] == len(files) and result["added"] == len(files) and result["failed"] == 0, result
    # The table holds every object: a second sync (with the node still down) finds nothing new.
    assert again["listed"] == len(files) and again["added"] == 0 and again["failed"] == 0, again
