"""`orchard search`: images by similarity (Elasticsearch kNN on `embedding`, or on
`pretrained.embedding` with --pretrained) and by label, prediction and confidence filters.
Elasticsearch only: no Spark, no TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass

from orchard.core import tables
from orchard.core.errors import ConfigError
from orchard.core.lake import Field, Pca, Prediction


@dataclass(frozen=True)
class Space:
    """Where one kind of embedding lives in a document: the vector, the model that made it, its 2-D PCA."""

    vector: str
    model: str
    pca: str


TRAINED = Space(Field.EMBEDDING, Field.EMBEDDING_MODEL, Field.PCA)  # `orchard features --model VERSION`
PRETRAINED = Space(Field.PRETRAINED_EMBEDDING, Field.PRETRAINED_MODEL, Field.PRETRAINED_PCA)  # imagenet:<base>


def value_at(source: dict, dotted: str):
    """The value of a dotted field path in a document source (None if absent)."""
    value: object = source
    for name in dotted.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


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
    Field.PRETRAINED_MODEL,
    Field.PRETRAINED_PCA,
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


def find_document(es, index: str, key_or_id: str, space: Space = TRAINED) -> dict:
    """The hit of the image with this key (or document id) including its embedding; ConfigError if none."""
    response = es.search(
        index=index,
        size=2,
        query={"bool": {"should": [{"term": {Field.KEY: key_or_id}}, {"ids": {"values": [key_or_id]}}]}},
        source_includes=[Field.KEY, space.vector, space.model],
    )
    hits = response["hits"]["hits"]
    if not hits:
        raise ConfigError(f"no image with key or id {key_or_id!r} in {index}")
    if value_at(hits[0]["_source"], space.vector) is None:
        model = " --model imagenet:efficientnet-lite0" if space == PRETRAINED else ""
        raise ConfigError(f"{key_or_id} has no {space.vector} yet: run `orchard features{model}` on its dataset first")
    return hits[0]


def similar(
    es, index: str, key_or_id: str, k: int = 10, clauses: list[dict] | None = None, space: Space = TRAINED
) -> list[dict]:
    """The k nearest images (cosine) to an image in one embedding space, itself first, as result rows."""
    own = find_document(es, index, key_or_id, space)
    source = own["_source"]
    # k + 1: the image itself is among the neighbours, and is put first explicitly below, because
    # with exact ties (identical embeddings) the ANN order between equal scores is arbitrary.
    knn = {
        "field": space.vector,
        "query_vector": value_at(source, space.vector),
        "k": k + 1,
        "num_candidates": max(100, 10 * (k + 1)),
    }
    filters = list(clauses or [])
    if model := value_at(source, space.model):  # compare only embeddings of the same model
        filters.append({"term": {space.model: model}})
    if filters:
        knn["filter"] = {"bool": {"filter": filters}}
    if quantized(es, index, space.vector):
        # Scores from int8/int4/bbq HNSW are approximate (an image could score below its own near
        # duplicate); rescoring the candidates with the stored float vectors makes them exact.
        knn["rescore_vector"] = {"oversample": 3.0}
    response = es.search(index=index, knn=knn, size=k + 1, source_includes=SOURCE_FIELDS)
    hits = response["hits"]["hits"]
    itself = next((h for h in hits if h["_id"] == own["_id"]), None)
    if itself is None:  # cut off by ties: fetch it, with the cosine score of a vector to itself
        itself = {**es.get(index=index, id=own["_id"], source_includes=SOURCE_FIELDS).body, "_score": 1.0}
    others = [h for h in hits if h["_id"] != own["_id"]]
    return [result_row(hit, space) for hit in [itself, *others][:k]]


def quantized(es, index: str, vector: str = Field.EMBEDDING) -> bool:
    """True if the index stores the `vector` field quantized (int8/int4/bbq HNSW or flat, ES' default
    is int8_hnsw)."""
    mapping = es.indices.get_mapping(index=index).body
    for body in mapping.values():
        field: dict = {"properties": body["mappings"].get("properties", {})}
        for name in vector.split("."):
            field = field.get("properties", {}).get(name, {})
        if str(field.get("index_options", {}).get("type", "")).startswith(("int8", "int4", "bbq")):
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


# The document fields a result row (of the trained space) is made of: what a read for rows asks for.
ROW_FIELDS = [Field.KEY, Field.LABEL, Field.PREDICTION, TRAINED.pca]


def result_row(hit: dict, space: Space = TRAINED) -> dict:
    """One flat result row from a search hit (x, y: the 2-D PCA of `space`)."""
    src = hit["_source"]
    pred = src.get(Field.PREDICTION) or {}
    pca = value_at(src, space.pca) or {}
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
