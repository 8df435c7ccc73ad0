"""Elasticsearch: lose one of the 3 nodes during `orchard infer`; then throttle writes to force 429s.

The images index has 3 shards with 1 replica each, so one lost node loses no data: its replicas
are promoted. The killed node is the one holding the most primaries of the index, so writes in
flight really have to fail over. For the 429 test the nodes are restarted with a write queue of
1 (setting es_write_queue_size) while a noisy neighbour keeps the write threads busy with bulk
requests into another index: the uploader's and the Spark app's bulk requests are rejected with
429 and must be retried (visibly in the logs) until every document is written.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import (
    SEEDED_IMAGES,
    ChaosStack,
    Ledger,
    assert_every_image_predicted,
    count_predicted,
    dataset_docs,
    infer_args,
    prediction_problems,
    seeded_dataset,
    synth,
    upload_args,
    wait_for,
)

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.es")

ES_NODES = ["es01", "es02", "es03"]
NOISE_INDEX = "chaos-noise"
RETRY_LINE = re.compile(r"(?i)(429|rejected|throttl|too many requests).*retr|retr.*(429|rejected|throttl)")


@pytest.fixture(scope="module")
def es_stack(chaos: ChaosStack):
    """The chaos stack; Elasticsearch is back to normal (all nodes, default queue) afterwards."""
    chaos.up()
    yield chaos
    if any(chaos.pid(n) is None for n in ES_NODES) or write_queue_sizes(chaos) != {None}:
        restart_es(chaos)


def primaries_by_node(chaos: ChaosStack) -> Counter:
    """Node name -> number of primary shards of the images index it holds."""
    rows = chaos.es().cat.shards(index=chaos.settings.images_index, format="json", h="prirep,node,state")
    return Counter(r["node"] for r in rows if r["prirep"] == "p" and r["state"] == "STARTED")


def write_queue_sizes(chaos: ChaosStack) -> set[int | None]:
    """The write thread pool queue size of every node (None = the default)."""
    nodes = chaos.es().nodes.info(metric="settings")["nodes"].values()
    sizes = set()
    for node in nodes:
        value = node["settings"].get("thread_pool", {}).get("write", {}).get("queue_size")
        sizes.add(int(value) if value is not None else None)
    return sizes


def write_rejections(chaos: ChaosStack) -> int:
    stats = chaos.es().nodes.stats(metric="thread_pool")["nodes"].values()
    return sum(node["thread_pool"]["write"]["rejected"] for node in stats)


def restart_es(chaos: ChaosStack, **overrides) -> None:
    """Stop the 3 Elasticsearch nodes of the chaos stack and start them with `overrides`."""
    threads = [threading.Thread(target=chaos.stop, args=(n,)) for n in ES_NODES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chaos.up(**overrides)


def executor_logs(chaos: ChaosStack, app_id: str) -> str:
    """stderr of every executor of a Spark application (the workers keep them in their work dirs)."""
    parts = []
    for path in sorted(chaos.layout.data.glob(f"spark-worker-*/{app_id}/*/stderr")):
        parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def app_id_of(output: str) -> str:
    match = re.search(r"app id (app-[0-9]+-[0-9]+)", output)
    assert match, "the command did not log its Spark application id"
    return match.group(1)


def test_infer_survives_an_es_node_killed_midway(es_stack: ChaosStack, model_version: str, ledger: Ledger):
    chaos = es_stack
    dataset = seeded_dataset(chaos, "es-kill", 4000)
    es, index, images = chaos.es(), chaos.settings.images_index, SEEDED_IMAGES

    job = chaos.start(*infer_args(dataset, model_version))
    wait_for(
        lambda: count_predicted(es, index, dataset) > 0,
        timeout=600,
        what="the first predictions to be written",
        while_=job.running,
    )
    done_before = count_predicted(es, index, dataset)
    victim, primaries = primaries_by_node(chaos).most_common(1)[0]
    chaos.kill(victim)
    run = job.wait(timeout=900)
    docs = dataset_docs(es, index, dataset)
    problems = prediction_problems(docs, model_version)
    chaos.up()  # restarts the killed node and waits for green with 3 nodes
    health = chaos.es().cluster.health(wait_for_status="green", timeout="120s")
    ledger.record(
        f"SIGKILL {victim} (1 of 3 ES nodes, {primaries} of 3 primaries) during `orchard infer`",
        f"{images} documents ({done_before} predicted before the kill); cluster {health['status']} "
        f"with {health['number_of_nodes']} nodes after restart",
        images - len(docs) + len(problems),
    )

    assert_every_image_predicted(run, docs, problems, images)
    assert health["status"] == "green" and health["number_of_nodes"] == 3, health


class NoisyNeighbour:
    """Threads sending bulk requests into another index until stopped: they keep the write pool busy."""

    def __init__(self, chaos: ChaosStack, threads: int = 6, docs_per_bulk: int = 200) -> None:
        self.chaos = chaos
        self.threads = threads
        self.docs_per_bulk = docs_per_bulk
        self.stopped = threading.Event()
        self.sent = 0
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> NoisyNeighbour:
        es = self.chaos.es()
        if not es.indices.exists(index=NOISE_INDEX):
            es.indices.create(index=NOISE_INDEX, settings={"number_of_shards": 3, "number_of_replicas": 0})
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for w in self._workers:
            w.join(timeout=60)
        self.chaos.es().indices.delete(index=NOISE_INDEX, ignore_unavailable=True)

    def _run(self, worker: int) -> None:
        from elasticsearch import ApiError, TransportError

        es = self.chaos.es(request_timeout=30, max_retries=0)
        body = "x" * 200
        n = 0
        while not self.stopped.is_set():
            ops = []
            for _ in range(self.docs_per_bulk):
                ops += [{"index": {"_index": NOISE_INDEX}}, {"worker": worker, "n": n, "body": body}]
                n += 1
            try:
                es.bulk(operations=ops, refresh=False)
                self.sent += 1
            except (ApiError, TransportError) as exc:  # rejected as a whole: that is the point
                log.debug("noise bulk failed: %s", exc)
                time.sleep(0.05)


def test_tiny_write_queue_forces_429s_and_nothing_is_lost(
    es_stack: ChaosStack, model_version: str, ledger: Ledger, tmp_path: Path
):
    chaos = es_stack
    dataset = chaos.dataset("es-429")
    tree = synth(chaos, dataset, per_class=40, seed=chaos.seed(4100))  # 120 images
    restart_es(chaos, es_write_queue_size=1)
    assert write_queue_sizes(chaos) == {1}
    es, index = chaos.es(), chaos.settings.images_index
    rejected_before = write_rejections(chaos)

    with NoisyNeighbour(chaos):
        wait_for(lambda: write_rejections(chaos) > rejected_before, timeout=120, what="the first 429 rejection")
        up = chaos.cli(*upload_args(tree, dataset, "--batch-size", "8", "--report", str(tmp_path / "up.json")))
        job = chaos.start(*infer_args(dataset, model_version))
        # The noise is for the index writes: once every document holds a prediction, the rest of
        # the run (the lake's MERGE) need not share the 2 cores with it.
        wait_for(lambda: count_predicted(es, index, dataset) == 120 or not job.running(), 900, "the predictions")
    inferred = job.wait(timeout=900)
    rejected = write_rejections(chaos) - rejected_before
    docs = dataset_docs(es, index, dataset)
    problems = prediction_problems(docs, model_version)
    upload_retries = [ln for ln in up.stderr.splitlines() if RETRY_LINE.search(ln)]
    infer_log = inferred.stderr + executor_logs(chaos, app_id_of(inferred.stderr))
    infer_retries = [ln for ln in infer_log.splitlines() if RETRY_LINE.search(ln)]
    restart_es(chaos)  # back to the default queue before anything can fail
    ledger.record(
        "ES write queue of 1 + a noisy bulk neighbour (HTTP 429) during `orchard upload` and `orchard infer`",
        f"120 documents; {rejected} shard writes rejected; 429 retries logged: upload "
        f"{len(upload_retries)}, infer {len(infer_retries)}",
        120 - len(docs) + len(problems),
    )

    assert write_queue_sizes(chaos) == {None}
    assert up.returncode == 0, up.tail()
    assert inferred.returncode == 0, inferred.tail()
    assert len(docs) == 120 and not problems, dict(list(problems.items())[:10])
    assert upload_retries, f"no 429 retry visible in the upload's log ({rejected} writes rejected):\n{up.tail()}"
    assert infer_retries, f"no 429 retry visible in the infer logs ({rejected} writes rejected):\n{inferred.tail()}"
