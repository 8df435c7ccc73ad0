"""The lake is the source of truth: losing Elasticsearch loses no enrichment work.

1. `orchard infer` SIGKILLed between its index writes and its predictions-table write: a re-run
   converges (the table holds exactly what the documents hold, field by field).
2. All 3 Elasticsearch nodes SIGKILLed and their data directories deleted; `stack up` starts an
   empty cluster; `orchard reindex` brings every document back from the lake with the prediction,
   embedding and PCA it had (compared field by field), and the model registry's documents too.

The second test runs last in this module and leaves a working stack behind (the later modules use
the same stack and model).
"""

from __future__ import annotations

import logging
import shutil

import pytest

from conftest import (
    SEEDED_IMAGES,
    SPARK_CONF,
    ChaosStack,
    Ledger,
    infer_args,
    read_json_line,
    seeded_dataset,
    wait_for,
)
from orchard.spark_app.infer import INDEX_WRITTEN

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.es_lost")

ES_NODES = ["es01", "es02", "es03"]
COMPARED = ("key", "split", "label", "width", "height", "bytes", "prediction", "embedding_model")


@pytest.fixture(scope="module")
def lake_stack(chaos: ChaosStack) -> ChaosStack:
    chaos.up()
    return chaos


def documents(chaos: ChaosStack, dataset: str) -> dict[str, dict]:
    """id -> _source of every document of the dataset (after a refresh)."""
    es, index = chaos.es(), chaos.settings.images_index
    es.indices.refresh(index=index)
    hits = es.search(index=index, query={"term": {"dataset": dataset}}, size=10_000)["hits"]["hits"]
    return {h["_id"]: h["_source"] for h in hits}


def table_predictions(chaos: ChaosStack, dataset: str, version: str) -> dict[str, dict]:
    """id -> the predictions table's row of `version` for the dataset's images (read with delta-rs)."""
    from deltalake import DeltaTable

    from orchard.core.lake import object_store_uri
    from orchard.core.table_log import storage_options

    s = chaos.settings
    uri, options = object_store_uri(s.predictions_table_uri), storage_options(s)
    if not DeltaTable.is_deltatable(uri, options):  # the first run was killed before creating it
        return {}
    table = DeltaTable(uri, storage_options=options)
    rows = table.to_pyarrow_table(filters=[("dataset", "=", dataset), ("model_version", "=", version)]).to_pylist()
    return {row["id"]: row for row in rows}


def as_document(row: dict) -> dict:
    """A table row in the form of the document's `prediction` object."""
    names = ("label", "confidence", "top5", "model_version", "model_family", "predicted_at", "table_version", "error")
    return {name: row[name] for name in names}


def differences(before: dict[str, dict], after: dict[str, dict]) -> dict[str, str]:
    """id -> the first field that differs, for every document of `before` (missing ones included).
    Exact equality: vectors and coordinates go through the lake as the same float32/float64 values."""
    problems = {}
    for doc_id, old in before.items():
        new = after.get(doc_id)
        if new is None:
            problems[doc_id] = "missing"
            continue
        for name in (*COMPARED, "embedding", "pca", "pretrained"):
            if new.get(name) != old.get(name):
                problems[doc_id] = f"{name}: {str(old.get(name))[:80]} -> {str(new.get(name))[:80]}"
                break
    return problems


def row_problem(row: dict | None, document: dict) -> str:
    """Why a predictions table row does not say what the document's `prediction` says ("" if it does)."""
    if row is None:
        return "no row"
    return "" if as_document(row) == document["prediction"] else f"{as_document(row)} != {document['prediction']}"


def test_an_infer_killed_between_its_index_and_lake_writes_converges_on_a_rerun(
    lake_stack: ChaosStack, model_version: str, ledger: Ledger
):
    chaos = lake_stack
    dataset = seeded_dataset(chaos, "chaos-lake-kill", seed=7100)
    # --force rewrites every document (a new predicted_at), so the table must follow the documents
    run = chaos.start(*infer_args(dataset, model_version, "--force"))
    wait_for(lambda: INDEX_WRITTEN in run.stderr_so_far(), 900, "the index writes", interval=0.1, while_=run.running)
    run.kill()  # the lake's MERGE (seconds) has not committed yet
    rows_at_kill = table_predictions(chaos, dataset, model_version)
    docs = documents(chaos, dataset)
    written_at = {d["prediction"]["predicted_at"] for d in docs.values()}
    behind = sum(rows_at_kill.get(i, {}).get("predicted_at") not in written_at for i in docs)
    log.info("killed after the index writes: %d of %d table rows lag their documents", behind, len(docs))

    rerun = chaos.cli(*infer_args(dataset, model_version), timeout=900)
    assert rerun.returncode == 0, rerun.tail()
    summary = read_json_line(rerun.stdout)
    assert summary["unchanged"] == SEEDED_IMAGES and summary["failed"] == 0, summary
    rows, docs = table_predictions(chaos, dataset, model_version), documents(chaos, dataset)
    lagging = {i: problem for i, d in docs.items() if (problem := row_problem(rows.get(i), d))}
    ledger.record(
        "orchard infer SIGKILLed between its index and lake writes, then re-run",
        f"{SEEDED_IMAGES} images",
        len(lagging),
        rows_lagging_at_kill=behind,
        rows_after_rerun=len(rows),
        lake_writes_of_rerun=summary["lake"],
    )
    assert len(rows) == SEEDED_IMAGES and not lagging, dict(list(lagging.items())[:5])


def test_every_es_node_lost_then_reindex_brings_every_document_back(
    lake_stack: ChaosStack, model_version: str, ledger: Ledger
):
    chaos = lake_stack
    dataset = seeded_dataset(chaos, "chaos-es-lost", seed=7200)
    features = ("features", "--dataset", dataset, "--model", model_version, "--json", *SPARK_CONF)
    for args in (infer_args(dataset, model_version), features):
        run = chaos.cli(*args, timeout=900)
        assert run.returncode == 0, run.tail()
    before = documents(chaos, dataset)
    assert len(before) == SEEDED_IMAGES and all("prediction" in d and "pca" in d for d in before.values())
    total_before = chaos.es().count(index=chaos.settings.images_index)["count"]

    for node in ES_NODES:
        chaos.kill(node)
    for node in ES_NODES:
        shutil.rmtree(chaos.layout.data / node)
    chaos.up()  # an empty cluster: the templates, an empty index behind the alias
    es = chaos.es()
    assert es.count(index=chaos.settings.images_index)["count"] == 0
    assert not es.exists(index=chaos.settings.models_index, id=model_version)

    run = chaos.cli("reindex", "--json", *SPARK_CONF, timeout=1800)
    assert run.returncode == 0, run.tail()
    summary = read_json_line(run.stdout)
    after = documents(chaos, dataset)
    lost = differences(before, after)
    ledger.record(
        "all 3 Elasticsearch nodes SIGKILLed, their data deleted; stack up; orchard reindex",
        f"{total_before} documents ({SEEDED_IMAGES} compared field by field)",
        len(lost),
        documents_before=total_before,
        documents_after=summary["documents"],
        reindex_documents_per_second=summary["documents_per_second"],
        models_restored=summary["models_restored"],
    )
    ledger.figures["reindex after every Elasticsearch node was lost: documents before / after"] = (
        f"{total_before} / {summary['documents']}"
    )
    ledger.figures["reindex documents/s (Spark application start included)"] = summary["documents_per_second"]
    assert not lost, dict(list(lost.items())[:5])
    assert es.exists(index=chaos.settings.models_index, id=model_version)  # the registry is back too
