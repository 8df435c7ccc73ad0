"""`orchard search`: images by similarity (Elasticsearch kNN on `embedding`) and by label, prediction
and confidence filters. Elasticsearch only: no Spark, no TensorFlow."""

from __future__ import annotations

from orchard.core import tables
from orchard.core.errors import ConfigError
from orchard.core.lake import Field, Pca, Prediction

SOURCE_FIELDS = [
    Field.KEY,
    Field.DATASET,
    Field.SPLIT,
    Field.LABEL,
    Field.PREDICTION_LABEL,
    Field.PREDICTION_CONFIDENCE,
    Field.PREDICTION_MODEL_VERSION,
    Field.PREDICTION_ERROR,
    Field.EMBEDDING_MODEL,
    Field.PCA,
]
TABLE_COLUMNS = ["score", "key", "label", "predicted", "confidence", "x", "y"]


def filters(
    dataset: str | None = None,
    split: str | None = None,
    label: str | None = None,
    predicted: str | None = None,
    min_confidence: float | None = None,
) -> list[dict]:
    """Elasticsearch filter clauses for the given criteria (None = no constraint)."""
    clauses: list[dict] = []
    for field, value in (
        (Field.DATASET, dataset),
        (Field.SPLIT, split),
        (Field.LABEL, label),
        (Field.PREDICTION_LABEL, predicted),
    ):
        if value is not None:
            clauses.append({"term": {field: value}})
    if min_confidence is not None:
        clauses.append({"range": {Field.PREDICTION_CONFIDENCE: {"gte": min_confidence}}})
    return clauses


def find_document(es, index: str, key_or_id: str) -> dict:
    """The hit of the image with this key (or document id) including its embedding; ConfigError if none."""
    response = es.search(
        index=index,
        size=2,
        query={"bool": {"should": [{"term": {Field.KEY: key_or_id}}, {"ids": {"values": [key_or_id]}}]}},
        source_includes=[Field.KEY, Field.EMBEDDING, Field.EMBEDDING_MODEL],
    )
    hits = response["hits"]["hits"]
    if not hits:
        raise ConfigError(f"no image with key or id {key_or_id!r} in {index}")
    if Field.EMBEDDING not in hits[0]["_source"]:
        raise ConfigError(f"{key_or_id} has no embedding yet: run `orchard features` on its dataset first")
    return hits[0]


def similar(es, index: str, key_or_id: str, k: int = 10, clauses: list[dict] | None = None) -> list[dict]:
    """The k nearest images (cosine) to an image, itself first, as result rows."""
    own = find_document(es, index, key_or_id)
    source = own["_source"]
    # k + 1: the image itself is among the neighbours, and is put first explicitly below, because
    # with exact ties (identical embeddings) the ANN order between equal scores is arbitrary.
    knn = {
        "field": Field.EMBEDDING,
        "query_vector": source[Field.EMBEDDING],
        "k": k + 1,
        "num_candidates": max(100, 10 * (k + 1)),
    }
    if clauses:
        knn["filter"] = {"bool": {"filter": clauses}}
    if source.get(Field.EMBEDDING_MODEL):  # compare only embeddings of the same model
        knn.setdefault("filter", {"bool": {"filter": []}})["bool"]["filter"].append(
            {"term": {Field.EMBEDDING_MODEL: source[Field.EMBEDDING_MODEL]}}
        )
    if quantized(es, index):
        # Scores from int8/int4/bbq HNSW are approximate (an image could score below its own near
        # duplicate); rescoring the candidates with the stored float vectors makes them exact.
        knn["rescore_vector"] = {"oversample": 3.0}
    response = es.search(index=index, knn=knn, size=k + 1, source_includes=SOURCE_FIELDS)
    hits = response["hits"]["hits"]
    itself = next((h for h in hits if h["_id"] == own["_id"]), None)
    if itself is None:  # cut off by ties: fetch it, with the cosine score of a vector to itself
        itself = {**es.get(index=index, id=own["_id"], source_includes=SOURCE_FIELDS).body, "_score": 1.0}
    others = [h for h in hits if h["_id"] != own["_id"]]
    return [result_row(hit) for hit in [itself, *others][:k]]


def quantized(es, index: str) -> bool:
    """True if the index stores `embedding` quantized (int8/int4/bbq HNSW or flat, ES' default is int8_hnsw)."""
    mapping = es.indices.get_mapping(index=index).body
    for body in mapping.values():
        options = body["mappings"].get("properties", {}).get(Field.EMBEDDING, {}).get("index_options", {})
        if str(options.get("type", "")).startswith(("int8", "int4", "bbq")):
            return True
    return False


def matching(es, index: str, clauses: list[dict], limit: int = 20) -> list[dict]:
    """Images matching the filters, most confident prediction first, then by key."""
    response = es.search(
        index=index,
        size=limit,
        query={"bool": {"filter": clauses}},
        sort=[{Field.PREDICTION_CONFIDENCE: {"order": "desc", "missing": "_last"}}, {Field.KEY: "asc"}],
        source_includes=SOURCE_FIELDS,
        track_total_hits=True,
    )
    return [result_row(hit) for hit in response["hits"]["hits"]]


def result_row(hit: dict) -> dict:
    """One flat result row from a search hit."""
    src = hit["_source"]
    pred = src.get(Field.PREDICTION) or {}
    pca = src.get(Field.PCA) or {}
    return {
        "score": hit.get("_score"),
        "id": hit["_id"],
        "key": src.get(Field.KEY),
        "label": src.get(Field.LABEL),
        "predicted": pred.get(Prediction.LABEL),
        "confidence": pred.get(Prediction.CONFIDENCE),
        "model_version": pred.get(Prediction.MODEL_VERSION),
        "error": pred.get(Prediction.ERROR),
        "x": pca.get(Pca.X),
        "y": pca.get(Pca.Y),
    }


def format_table(rows: list[dict]) -> str:
    """Result rows as an aligned text table for the terminal."""
    return tables.format_table(TABLE_COLUMNS, ([_cell(row.get(c)) for c in TABLE_COLUMNS] for row in rows))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
