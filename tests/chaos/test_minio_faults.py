"""MinIO: lose one of the 4 nodes during an upload, then a second one, then heal.

The 4 nodes form one erasure set of 4 drives (2 data + 2 parity shards per object): one node down
leaves read and write quorum; two down leave read quorum only, so writes must fail, clearly and
without hanging; once both are back, healing must restore every shard on every drive. The proof
of the healing is a read with the *other* two nodes down: it can only succeed from healed shards.

The tests of this module run in order on one dataset (module-scoped state).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import ClassVar

import pytest
from minio.error import S3Error

from conftest import (
    READ_ERRORS,
    ChaosStack,
    Ledger,
    count_docs,
    files_by_key,
    object_keys,
    object_sha256,
    sha256_file,
    synth,
    unreadable_objects,
    upload_args,
    wait_for,
)
from orchard.core.retry import S3_TRANSIENT_CODES

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.minio")

FIRST, SECOND = "minio3", "minio4"  # killed in this order
OTHERS = ["minio1", "minio2"]  # never killed until the proof of healing
MINIO_NODES = ["minio1", "minio2", "minio3", "minio4"]


class State:
    """What the ordered tests of this module hand on to each other."""

    expected: ClassVar[dict[str, str]] = {}  # key -> sha256 of every uploaded file
    dataset = ""


@pytest.fixture(scope="module")
def minio_stack(chaos: ChaosStack):
    """The chaos stack; every MinIO node is restarted after the module, whatever happened."""
    chaos.up()
    yield chaos
    chaos.up()


def drive_holders(chaos: ChaosStack, key: str) -> list[str]:
    """The nodes whose drive holds the object's metadata (one shard each)."""
    bucket = chaos.settings.images_bucket
    return [n for n in MINIO_NODES if (chaos.layout.data / n / bucket / key / "xl.meta").is_file()]


def offline_drives(chaos: ChaosStack, check: bool = True) -> int:
    """Drives MinIO reports offline (`mc admin info`); -1 if it gave no answer (with check=False)."""
    info = chaos.mc_json("admin", "info", "orchard", check=check)
    if not info or "backend" not in info[0].get("info", {}):
        return -1
    return int(info[0]["info"]["backend"]["offlineDisks"])


def healing_drives(chaos: ChaosStack) -> list[str]:
    """Endpoints of the drives MinIO reports as healing (`mc admin info`); all of them if no answer."""
    info = chaos.mc_json("admin", "info", "orchard", check=False)
    servers = info[0].get("info", {}).get("servers", []) if info else []
    if not servers:
        return list(MINIO_NODES)
    return [d.get("endpoint", "?") for s in servers for d in s.get("drives", []) if d.get("healing")]


def test_upload_survives_a_node_killed_midway(minio_stack: ChaosStack, ledger: Ledger, tmp_path: Path):
    chaos = minio_stack
    State.dataset = dataset = chaos.dataset("minio-faults")
    tree = synth(chaos, dataset, per_class=120, seed=chaos.seed(3000))  # 360 files
    files = files_by_key(tree, dataset)
    State.expected = {key: sha256_file(path) for key, path in files.items()}
    client, bucket = chaos.s3(), chaos.settings.images_bucket
    report = tmp_path / "report.json"

    job = chaos.start(*upload_args(tree, dataset, "--workers", "2", "--batch-size", "10", "--report", str(report)))
    wait_for(
        lambda: len(object_keys(client, bucket, f"{dataset}/")) >= len(files) // 10,
        timeout=300,
        what="a tenth of the objects to be stored",
        while_=job.running,
    )
    chaos.kill(FIRST)
    before = len(object_keys(client, bucket, f"{dataset}/"))
    assert before < len(files), "the upload finished before the node was killed"
    run = job.wait(timeout=600)
    lost = unreadable_objects(client, bucket, State.expected)
    docs = count_docs(chaos.es(), chaos.settings.images_index, dataset)
    ledger.record(
        f"SIGKILL {FIRST} (1 of 4 MinIO nodes) during `orchard upload`",
        f"{len(files)} files ({before} stored before the kill, {len(files) - before} after)",
        len(lost) + len(files) - docs,
    )

    assert run.returncode == 0, run.tail()
    counts = json.loads(report.read_text())["counts"]
    assert counts["uploaded"] == len(files) and counts["failed"] == 0, counts
    assert object_keys(client, bucket, f"{dataset}/") == set(files)
    assert not lost, f"{len(lost)} objects unreadable or changed: {dict(list(lost.items())[:5])}"
    assert docs == len(files)


def test_two_nodes_down_reads_work_writes_fail_clearly(minio_stack: ChaosStack, ledger: Ledger, tmp_path: Path):
    chaos = minio_stack
    assert State.expected, "needs the upload of the previous test"
    assert chaos.pid(FIRST) is None, f"{FIRST} should still be down"
    chaos.kill(SECOND)
    assert offline_drives(chaos) == 2

    lost = unreadable_objects(chaos.s3(), chaos.settings.images_bucket, State.expected)
    assert not lost, f"{len(lost)} objects unreadable with 2 nodes down: {dict(list(lost.items())[:5])}"

    probe_name = chaos.dataset("minio-write-probe")
    probe = synth(chaos, probe_name, per_class=6, seed=chaos.seed(3001))  # 18 files
    report = tmp_path / "probe.json"
    began = time.monotonic()
    run = chaos.start(*upload_args(probe, probe_name, "--report", str(report)))
    result = run.wait(timeout=300)  # a hang fails the test here
    took = time.monotonic() - began  # reported, not asserted
    # Exit 4 (service unavailable) with MinIO's reason: no write quorum (checked before and during writes).
    assert result.returncode == 4, f"a write without quorum did not stop the upload:\n{result.tail()}"
    assert "no write quorum" in result.stderr, result.tail()
    assert "Traceback" not in result.output, result.tail()
    assert report.exists(), f"no (partial) report:\n{result.tail()}"
    body = json.loads(report.read_text())
    reasons = [f["reason"] for f in body["failures"]]
    assert len(reasons) + body["not_attempted"] == 18, body  # every file accounted: failed or not attempted
    errors = [ln for ln in result.stderr.splitlines() if " ERROR " in ln or "upload failed" in ln]
    assert errors, f"no readable error line:\n{result.tail()}"
    assert reasons or result.returncode == 4, f"exit 1 without failures in the report:\n{result.tail()}"
    why = (reasons[0] if reasons else errors[-1]).split("Caused by ")[-1][:90]
    assert not any("502" in r for r in reasons), f"the load balancer hid MinIO's answer: {reasons[:3]}"

    mc_put = chaos.mc(
        "cp",
        str(sorted(probe.rglob("*.jpg"))[0]),
        f"orchard/{chaos.settings.images_bucket}/{probe_name}/mc.jpg",
        timeout=180,
        check=False,
    )
    assert mc_put.returncode != 0, "mc wrote an object without write quorum"
    ledger.record(
        f"SIGKILL {SECOND} too (2 of 4 down): reads, and a write attempt",
        f"{len(State.expected)} objects read back; "
        f"18-file upload stopped after {took:.0f} s, exit {result.returncode}, "
        f'{len(reasons)} failed with a reason, {body["not_attempted"]} not attempted ("{why}")',
        len(lost),
    )


def test_restarted_nodes_heal_and_nothing_is_lost(minio_stack: ChaosStack, ledger: Ledger):
    chaos = minio_stack
    assert State.expected, "needs the upload of the first test"
    chaos.up()  # restarts exactly the two killed nodes
    # A heal started before every node has reconnected to the restarted drives heals nothing
    # ("Yellow -> Yellow"): wait until each node sees all 4 peers and drives online.
    wait_for(lambda: fully_connected(chaos), timeout=180, interval=2, what="all 4 MinIO nodes to see each other")
    probe_key, probe_sha = put_probe(chaos)
    attempts, summary = heal_until_complete(chaos, [*State.expected, probe_key])
    # MinIO also heals a rejoining drive in the background, and uses no drive marked `healing` for
    # reads meanwhile (cmd/erasure-common.go, getOnlineDisks): the proof waits until none is, or it
    # would measure that heal's progress rather than the heal above (seen once: every read refused
    # with SlowDownRead, i.e. read quorum, right after the kill).
    wait_for(lambda: not healing_drives(chaos), timeout=300, interval=2, what="MinIO's background heal to finish")

    # Proof: with the two nodes that never went down stopped, only healed shards can serve reads.
    for node in OTHERS:
        chaos.kill(node)
    # Asked before they noticed, the survivors would still count on their peers' drives.
    wait_for(lambda: offline_drives(chaos, check=False) == 2, timeout=120, interval=1, what="2 drives seen offline")
    # A node that started before its peer was listening places the peer's drive in its erasure set
    # only on its next reconnect cycle (every 15 s, cmd/erasure-sets.go connectDisks); until then it
    # has 1 drive of 2 and refuses every read (SlowDownRead; seen in CI for 238 of 360 objects, all
    # served by one node). The probe, written with all 4 up, shows each survivor uses both drives.
    wait_for(
        lambda: survivors_read(chaos, probe_key, probe_sha),
        timeout=120,
        interval=1,
        what=f"{FIRST} and {SECOND} each to read the probe from both their drives",
    )
    lost = unreadable_objects(chaos.s3(), chaos.settings.images_bucket, State.expected)
    chaos.up()
    assert not lost, f"{len(lost)} objects unreadable from the healed nodes: {dict(list(lost.items())[:5])}"
    ledger.record(
        f"restart {FIRST}+{SECOND}, `mc admin heal -r orchard`, then SIGKILL {'+'.join(OTHERS)} "
        "and read everything from the healed drives",
        f"{len(State.expected)} objects on 4/4 drives after {attempts} heal run(s) ({summary})",
        len(lost),
    )


def put_probe(chaos: ChaosStack) -> tuple[str, str]:
    """Write a small object outside the dataset; returns (key, sha256 of its bytes).

    `mc admin info` answers with one node's view: the node nginx sends the PUT to may still count
    the restarted drive out of its erasure set until its next reconnect cycle (every 15 s,
    cmd/erasure-sets.go connectDisks) and refuse writes meanwhile (503 SlowDownWrite, seen once in
    CI right after fully_connected). The probe is written once that node has its quorum back, as
    any client retrying a 503 would."""
    body = f"probe {time.time_ns()}".encode()
    key = f"{State.dataset}-probe/probe.txt"

    def written() -> bool:
        try:
            chaos.s3().put_object(chaos.settings.images_bucket, key, io.BytesIO(body), len(body))
        except S3Error as exc:
            if exc.code not in S3_TRANSIENT_CODES:
                raise
            log.info("the probe write is refused for now: %s", exc.code)
            return False
        return True

    wait_for(written, timeout=120, interval=2, what="a write through the load balancer (write quorum on every node)")
    return key, hashlib.sha256(body).hexdigest()


def survivors_read(chaos: ChaosStack, key: str, sha: str) -> bool:
    """Whether the object reads back intact through each of FIRST and SECOND directly (no load balancer)."""
    for node in (FIRST, SECOND):
        client = chaos.s3(chaos.node_url(MINIO_NODES.index(node)))
        try:
            if object_sha256(client, chaos.settings.images_bucket, key) != sha:
                return False
        except READ_ERRORS as exc:
            log.info("%s cannot read the probe yet: %s", node, str(exc)[:120])
            return False
    return True


def fully_connected(chaos: ChaosStack) -> bool:
    """Every MinIO node is online, sees every peer online and its drive ok (`mc admin info`)."""
    info = chaos.mc_json("admin", "info", "orchard", check=False)
    servers = info[0].get("info", {}).get("servers", []) if info else []
    return len(servers) == len(MINIO_NODES) and all(
        s.get("state") == "online"
        and set(s.get("network", {}).values()) == {"online"}
        and all(d.get("state") == "ok" for d in s.get("drives", []))
        for s in servers
    )


def heal_until_complete(chaos: ChaosStack, keys: list[str], attempts: int = 5) -> tuple[int, str]:
    """Run `mc admin heal -r orchard` until every key has a shard on all 4 drives.

    Returns (heal runs needed, mc's summary line of the last run); fails after `attempts` runs.
    """
    missing: list[str] = keys
    for attempt in range(1, attempts + 1):
        heal = chaos.mc("admin", "heal", "-r", "orchard", timeout=600)
        summary = next((ln.strip() for ln in reversed(heal.stdout.splitlines()) if ln.startswith("Healed")), "")
        log.info("mc admin heal run %d: %s", attempt, summary)
        missing = [key for key in keys if len(drive_holders(chaos, key)) < len(MINIO_NODES)]
        if not missing:
            return attempt, summary.replace("\t", " ")
        time.sleep(5)
    pytest.fail(f"{len(missing)} objects still lack shards after {attempts} heal runs, e.g. {missing[:3]}")
