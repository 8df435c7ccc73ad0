"""Documents rebuilt from the lake (orchard.spark_app.reindex.document_of): the image's fields from
the images table, the newest prediction and features rows, in the form the uploader, `orchard infer`
and `orchard features` write them."""

from __future__ import annotations

from datetime import datetime

from orchard.core.lake import Field
from orchard.core.settings import Settings
from orchard.spark_app.features import feature_doc
from orchard.spark_app.infer import PredictSpec, prediction_doc
from orchard.spark_app.reindex import F_, G, P, document_of

ID = "ab" * 32
SPEC = PredictSpec(
    Settings(),
    "cnn-1",
    ("apple", "lime"),
    "rescale",
    (4, 4),
    predicted_at="2026-12-06T05:00:00+00:00",
    top=2,
    table_version=9,
    family="cnn",
)


def image_row(**extra) -> dict:
    return {
        "id": ID,
        "key": "fruits/test/apple/1.jpg",
        "dataset": "fruits",
        "split": "test",
        "label": "apple",
        "format": "jpeg",
        "width": 100,
        "height": 100,
        "channels": 3,
        "bytes": 4321,
        "etag": "e1",
        "ingested_at": datetime(2026, 12, 6, 5, 0, 1),
        **extra,
    }


class Projected:
    """A row of `orchard features`' projection (what feature_doc reads)."""

    def __init__(self, embedding, x, y):
        self.embedding, self.x, self.y = embedding, x, y


def test_an_image_without_enrichment_gets_its_fields_and_nothing_else() -> None:
    doc = document_of(image_row(), "images")
    assert doc[Field.ID] == doc[Field.SHA256] == ID and doc[Field.URI] == "s3a://images/fruits/test/apple/1.jpg"
    assert (doc[Field.SPLIT], doc[Field.LABEL], doc[Field.LABEL_TEXT], doc[Field.BYTES]) == (
        "test",
        "apple",
        "apple",
        4321,
    )
    assert doc[Field.UPLOADED_AT] == "2026-12-06T05:00:01.000Z"
    assert not {Field.PREDICTION, Field.EMBEDDING, Field.PCA, Field.PRETRAINED} & set(doc)


def test_a_rebuilt_prediction_and_features_equal_what_infer_and_features_write() -> None:
    written = prediction_doc(SPEC, [("lime", 0.75), ("apple", 0.25)])
    prediction_row = {P + name: value for name, value in written.items()}
    features = {F_ + "model_version": "cnn-1", F_ + "embedding": [0.5, 0.0, 1.5], F_ + "pca_x": 1.0, F_ + "pca_y": -2.0}
    base = {G + "model_version": "imagenet:b0", G + "embedding": [0.0, 0.0], G + "pca_x": 3.0, G + "pca_y": 4.0}
    doc = document_of(image_row(**prediction_row, **features, **base), "images")
    assert doc[Field.PREDICTION] == written
    assert {k: doc[k] for k in (Field.EMBEDDING_MODEL, Field.PCA, Field.EMBEDDING)} == feature_doc(
        "cnn-1", Projected([0.5, 0.0, 1.5], 1.0, -2.0), pretrained=False
    )
    # a zero vector is left out (cosine similarity cannot index it), as `orchard features` does
    assert (
        doc[Field.PRETRAINED]
        == feature_doc("imagenet:b0", Projected([0.0, 0.0], 3.0, 4.0), pretrained=True)[Field.PRETRAINED]
    )
    assert "embedding" not in doc[Field.PRETRAINED]


def test_an_error_prediction_is_rebuilt_with_its_reason() -> None:
    from orchard.spark_app.infer import error_doc

    failed = error_doc(SPEC, "undecodable image: truncated")
    doc = document_of(image_row(**{P + name: value for name, value in failed.items()}), "images")
    assert doc[Field.PREDICTION] == failed and doc[Field.PREDICTION]["top5"] is None
