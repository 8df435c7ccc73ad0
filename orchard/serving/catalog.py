"""What the service reads from the lake for its clients: image documents (Elasticsearch), their
nearest neighbours by embedding, and the image bytes themselves (MinIO). Blocking calls: the API
runs them in worker threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from elasticsearch import NotFoundError
from elasticsearch.helpers import scan
from minio.error import S3Error

from orchard.core import formats
from orchard.core.clients import es_client, s3_client
from orchard.core.lake import Field
from orchard.core.settings import Settings
from orchard.spark_app.search import ROW_FIELDS, filters, quantized, result_row, similar

MAX_WINDOW = 10_000  # Elasticsearch's default max_result_window: pages beyond it are refused
VECTOR_FIELDS = [Field.EMBEDDING, Field.PRETRAINED_EMBEDDING]  # large, and of no use to a client


class ImageNotFound(LookupError):
    """No image document with this id."""


class SearchFailed(RuntimeError):
    """Elasticsearch answered a search with an error."""


@dataclass(frozen=True)
class Page:
    """Which images a listing asks for."""

    dataset: str | None = None
    split: str | None = None
    label: str | None = None
    predicted: str | None = None
    min_confidence: float | None = None
    page: int = 1
    size: int = 50


class Catalog:
    """The images index and bucket of one deployment (one client each, shared by threads)."""

    def __init__(self, s: Settings):
        self.s = s
        self.es = es_client(s)
        self.s3 = s3_client(s)
        self._quantized: bool | None = None

    def images(self, page: Page) -> dict:
        """{"total", "page", "size", "images": [row, ...]}: the page of images matching the filters,
        most confident prediction first, then by key."""
        clauses = filters(page.dataset, page.split, page.label, page.predicted, page.min_confidence)
        response = self.es.search(
            index=self.s.images_index,
            from_=(page.page - 1) * page.size,
            size=page.size,
            query={"bool": {"filter": clauses}},
            sort=[{Field.PREDICTION_CONFIDENCE: {"order": "desc", "missing": "_last"}}, {Field.KEY: "asc"}],
            source_excludes=VECTOR_FIELDS,
            track_total_hits=True,
        )
        hits = response["hits"]
        images = [{**result_row(hit), **_facts(hit["_source"])} for hit in hits["hits"]]
        return {"total": hits["total"]["value"], "page": page.page, "size": page.size, "images": images}

    def image(self, image_id: str) -> dict:
        """The document of one image (without its vectors); ImageNotFound if there is none."""
        try:
            found = self.es.get(index=self.s.images_index, id=image_id, source_excludes=VECTOR_FIELDS)
        except NotFoundError:
            raise ImageNotFound(image_id) from None
        return {"id": found["_id"], **found["_source"]}

    def similar_to_image(self, image_id: str, k: int) -> list[dict]:
        """The k nearest images to one of the lake (itself excluded), by its embedding."""
        if not self.es.exists(index=self.s.images_index, id=image_id):
            raise ImageNotFound(image_id)
        rows = similar(self.es, self.s.images_index, image_id, k + 1)
        return [row for row in rows if row["id"] != image_id][:k]

    def nearest_many(self, model: str, queries: Sequence[tuple[Iterable[float], int]]) -> list[list[dict]]:
        """For each (vector, k): the k images whose embedding by `model` is nearest (cosine), in one
        multi-search round trip; SearchFailed if Elasticsearch failed any of them."""
        if self._quantized is None:
            self._quantized = quantized(self.es, self.s.images_index)
        searches: list[dict] = []
        for vector, k in queries:
            searches += [{}, {"knn": self._knn(vector, model, k), "size": k, "_source": ROW_FIELDS}]
        response = self.es.msearch(index=self.s.images_index, searches=searches)
        failed = [item["error"] for item in response["responses"] if "error" in item]
        if failed:
            raise SearchFailed(f"{len(failed)} of {len(queries)} neighbour searches failed: {failed[0]}")
        return [[result_row(hit) for hit in item["hits"]["hits"]] for item in response["responses"]]

    def embedding_count(self, model: str) -> int:
        """How many documents hold an embedding by `model`."""
        return int(self.es.count(index=self.s.images_index, query=_embedded_by(model))["count"])

    def embeddings(self, model: str) -> tuple[list[str], np.ndarray]:
        """(ids, vectors): every document's embedding by `model`, one row per id (a scroll)."""
        ids: list[str] = []
        vectors: list[list[float]] = []
        hits = scan(
            self.es,
            index=self.s.images_index,
            query={"query": _embedded_by(model)},
            _source=[Field.EMBEDDING],
            size=2000,
        )
        for hit in hits:
            ids.append(hit["_id"])
            vectors.append(hit["_source"][Field.EMBEDDING])
        return ids, np.array(vectors, dtype=np.float32)

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, dict]:
        """The result rows (without a score) of the images `ids`, read in one multi-get of the fields
        a row shows; an id whose document is gone is not in the answer."""
        if not ids:
            return {}
        docs = self.es.mget(index=self.s.images_index, ids=list(ids), source_includes=ROW_FIELDS)["docs"]
        return {doc["_id"]: result_row({**doc, "_score": None}) for doc in docs if doc.get("found")}

    def _knn(self, vector: Iterable[float], model: str, k: int) -> dict:
        """The kNN clause: k nearest by `model`'s embedding (rescored on full vectors if quantized)."""
        knn: dict = {
            "field": Field.EMBEDDING,
            "query_vector": [float(v) for v in vector],  # a numpy row too (the serving model's output)
            "k": k,
            "num_candidates": max(100, 10 * k),
            "filter": _embedded_by(model),
        }
        if self._quantized:
            knn["rescore_vector"] = {"oversample": 3.0}
        return knn

    def content(self, image_id: str) -> tuple[str, Iterator[bytes]]:
        """(content type, the image's bytes as chunks) from the images bucket; ImageNotFound if the
        document or its object is gone."""
        doc = self.image(image_id)
        try:
            response = self.s3.get_object(doc.get(Field.BUCKET) or self.s.images_bucket, doc[Field.KEY])
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket"}:
                raise ImageNotFound(image_id) from None
            raise
        return content_type(doc[Field.KEY]), _chunks(response)


def _embedded_by(model: str) -> dict:
    """The query for documents holding an embedding by `model`."""
    return {"bool": {"filter": [{"term": {Field.EMBEDDING_MODEL: model}}, {"exists": {"field": Field.EMBEDDING}}]}}


def content_type(key: str) -> str:
    """The media type of an image object, from its suffix (orchard.core.formats)."""
    fmt = formats.by_suffix(key)
    return fmt.content_type if fmt is not None else "application/octet-stream"


def _facts(source: dict) -> dict:
    """Fields of a listing row beyond search's result row."""
    return {name: source.get(name) for name in (Field.DATASET, Field.SPLIT, Field.FORMAT, Field.WIDTH, Field.HEIGHT)}


def _chunks(response, size: int = 256 * 1024) -> Iterator[bytes]:
    """The body of a MinIO response in chunks, the connection released at the end."""
    try:
        yield from response.stream(size)
    finally:
        response.close()
        response.release_conn()
