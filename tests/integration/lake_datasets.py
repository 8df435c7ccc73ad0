"""Test datasets on the real stack, shared by the integration tests that train and predict:
synthesised, uploaded with the real uploader, queried, and cleaned up (objects, table rows,
documents, features and model versions)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from orchard_cli import ok, orchard

from orchard.core.clients import es_client, s3_client
from orchard.core.objects import remove_prefix
from orchard.core.settings import Settings
from orchard.core.table_write import delete_rows


def fresh_seed() -> int:
    """A synth seed of this run's own (>= 100,000: never a module dataset's fixed seed). Fixed seeds
    made the same bytes on every run, and the uploader skips bytes the lake already holds under
    another dataset: the leftovers of one interrupted run made every later run upload nothing."""
    return 100_000 + secrets.randbelow(900_000)


@dataclass
class Dataset:
    """The uploaded test dataset and what the tests created for it (cleaned up afterwards)."""

    name: str
    settings: Settings
    corrupt_key: str
    versions: list[str] = field(default_factory=list)


def delete_documents(s: Settings, dataset: str) -> None:
    """Delete the dataset's image documents (by id: the native distribution has no delete-by-query)."""
    from elasticsearch.helpers import bulk, scan

    es = es_client(s)
    hits = scan(es, index=s.images_index, query={"query": {"term": {"dataset": dataset}}}, _source=False)
    bulk(
        es,
        ({"_op_type": "delete", "_index": s.images_index, "_id": h["_id"]} for h in hits),
        raise_on_error=False,
        refresh=True,
    )


def clean_up(ds: Dataset) -> None:
    """Objects, table rows, documents, features and model versions of the test dataset."""
    s = ds.settings
    es = es_client(s)
    remove_prefix(s3_client(s), s.images_bucket, f"{ds.name}/")
    delete_rows(s, ds.name)
    remove_prefix(s3_client(s), s.features_bucket, f"{ds.name}/")
    delete_documents(s, ds.name)
    hits = es.search(index=s.models_index, query={"term": {"dataset": ds.name}}, size=100, source=False)["hits"]["hits"]
    for version in {h["_id"] for h in hits} | set(ds.versions):
        remove_prefix(s3_client(s), s.models_bucket, f"{version}/")
        es.options(ignore_status=404).delete(index=s.models_index, id=version, refresh=True)


def synth(root: Path, classes: int, per_class: int, test_per_class: int, seed: int) -> Path:
    """A synthetic dataset tree written by `orchard dataset synth`; returns `root`."""
    ok(
        orchard(
            "dataset",
            "synth",
            str(root),
            "--classes",
            str(classes),
            "--per-class",
            str(per_class),
            "--test-per-class",
            str(test_per_class),
            "--seed",
            str(seed),
        )
    )
    return root


def docs_of(ds: Dataset, **terms) -> list[dict]:
    """Every document of the dataset (optionally filtered by term), with _seq_no."""
    es = es_client(ds.settings)
    query = {"bool": {"filter": [{"term": {"dataset": ds.name}}] + [{"term": {k: v}} for k, v in terms.items()]}}
    response = es.search(
        index=ds.settings.images_index, query=query, size=1000, seq_no_primary_term=True, source_excludes=["embedding"]
    )
    return response["hits"]["hits"]


def count(ds: Dataset, *clauses: dict) -> int:
    es = es_client(ds.settings)
    query = {"bool": {"filter": [{"term": {"dataset": ds.name}}, *clauses]}}
    return es.count(index=ds.settings.images_index, query=query)["count"]


def object_count(ds: Dataset) -> int:
    client = s3_client(ds.settings)
    return sum(1 for _ in client.list_objects(ds.settings.images_bucket, prefix=f"{ds.name}/", recursive=True))
