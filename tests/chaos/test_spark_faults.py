"""Spark: lose a worker (with its executor and Python workers, like a crashed machine) during
`orchard infer`; the job must finish on the other worker, every image must have exactly one
prediction, and no document may be written twice with different results.

A document is created by the upload (_version 1) and gets its prediction once (_version 2); the
tasks that were running on the lost executor are re-run elsewhere, and re-sending the same
prediction must not write it again, so every document must end at _version 2.
"""

from __future__ import annotations

import logging

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
    wait_for,
)

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.spark")

VICTIM = "spark-worker-1"


@pytest.fixture(scope="module")
def spark_stack(chaos: ChaosStack):
    chaos.up()
    yield chaos
    chaos.up()


def running_app(chaos: ChaosStack, name: str) -> dict | None:
    """The active application called `name` in the master's JSON, if it is RUNNING."""
    for app in chaos.spark_master().get("activeapps", []):
        if app.get("name") == name and app.get("state") == "RUNNING":
            return app
    return None


def executors_on(chaos: ChaosStack, worker_ui_port: int, app_id: str) -> int:
    """Executors of `app_id` that the worker with this UI port runs."""
    from orchard.core.health import get_json

    worker = get_json(f"http://{chaos.settings.bind_host}:{worker_ui_port}/json/")
    return sum(1 for e in worker.get("executors", []) if e.get("appid") == app_id)


def test_infer_survives_a_lost_worker(spark_stack: ChaosStack, model_version: str, ledger: Ledger):
    chaos = spark_stack
    dataset = seeded_dataset(chaos, "spark-kill", 5000)
    es, index, images = chaos.es(), chaos.settings.images_index, SEEDED_IMAGES

    job = chaos.start(*infer_args(dataset, model_version))
    app = wait_for(
        lambda: running_app(chaos, f"orchard-infer-{dataset}"),
        timeout=300,
        what="the infer application to be RUNNING",
        while_=job.running,
    )
    port = chaos.settings.spark_worker_ui_port  # spark-worker-1
    wait_for(
        lambda: executors_on(chaos, port, app["id"]) > 0,
        timeout=300,
        what=f"an executor of {app['id']} on {VICTIM}",
        while_=job.running,
    )
    wait_for(
        lambda: count_predicted(es, index, dataset) > 0,
        timeout=600,
        what="the first predictions to be written",
        while_=job.running,
    )
    done_before = count_predicted(es, index, dataset)
    assert done_before < images and executors_on(chaos, port, app["id"]) > 0, "nothing left to lose"
    chaos.kill(VICTIM)
    run = job.wait(timeout=900)
    docs = dataset_docs(es, index, dataset)
    problems = prediction_problems(docs, model_version)
    twice = sum(1 for p in problems.values() if "written more than once" in p)
    chaos.up()  # the worker rejoins
    ledger.record(
        f"SIGKILL {VICTIM} with its executor and Python workers during `orchard infer`",
        f"{images} documents ({done_before} predicted before the kill), {twice} written twice with different results",
        images - len(docs) + len(problems),
    )

    assert_every_image_predicted(run, docs, problems, images)
    assert int(chaos.spark_master().get("aliveworkers", 0)) >= chaos.settings.spark_workers
