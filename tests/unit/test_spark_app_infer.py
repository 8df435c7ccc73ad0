"""orchard.spark_app.infer partition bodies with a stand-in model (no TensorFlow, no services): inputs,
streaming batches, error documents for undecodable bytes, and per-split evaluation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from orchard.spark_app import images, infer
from orchard.spark_app.preprocess import map_batches
from spark_app_settings import CFG

SPEC = infer.PredictSpec(CFG, "v", ("blue", "red"), "scale01", (8, 8), 3, 2, "now")


def red_or_blue(x: np.ndarray) -> np.ndarray:
    """A 'model': red if the red channel dominates (probabilities 0.95 / 0.05)."""
    red = (x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype(float)
    return np.stack([1 - red * 0.9 - 0.05, red * 0.9 + 0.05], axis=1)


def fake_stream(items, batch_size=2):
    """What OrchardSparkModel.predict_stream does in a partition, with red_or_blue as the model."""
    return map_batches(red_or_blue, items, batch_size)


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def rows():
    """(ref, content) pairs, as the images table gives them."""
    for path, content in (
        ("s3a://images/ds/test/red/1.jpg", jpeg((250, 0, 0))),
        ("s3a://images/ds/test/blue/2.jpg", jpeg((0, 0, 250))),
        ("s3a://images/ds/test/red/3.jpg", b"junk"),
        ("s3a://images/ds/train/red/4.jpg", jpeg((0, 0, 250))),  # a wrong prediction
    ):
        yield images.file_pair("images", (path, content))


def test_model_inputs_are_preprocessed_and_errors_carried_along():
    items = list(infer.model_inputs(SPEC, rows()))
    (ref, error), x = items[0]
    assert ref.key == "ds/test/red/1.jpg" and error is None
    assert x.shape == (8, 8, 3) and x.dtype == np.float32 and x.max() <= 1.0
    (ref, error), x = items[2]
    assert x is None and error.startswith("undecodable image")


def test_predictions_stream_and_mark_undecodable_images():
    out = {ref.key: pred for ref, pred in infer.to_predictions(SPEC, fake_stream(infer.model_inputs(SPEC, rows())))}
    assert out["ds/test/red/1.jpg"]["label"] == "red" and out["ds/test/blue/2.jpg"]["label"] == "blue"
    assert out["ds/test/red/3.jpg"]["error"].startswith("undecodable image")
    assert out["ds/test/red/3.jpg"]["label"] is None
    assert out["ds/test/red/1.jpg"]["top5"][0] == {"label": "red", "confidence": 0.95}
    assert len(out) == 4


def test_to_predictions_is_lazy():
    consumed = []

    def outputs():
        for item in fake_stream(infer.model_inputs(SPEC, rows())):
            consumed.append(item)
            yield item

    first = next(infer.to_predictions(SPEC, outputs()))
    assert first[1]["label"] == "red" and len(consumed) <= SPEC.batch_size


def test_score_partition_scores_each_split():
    [scores] = list(infer.score_partition(SPEC, None, fake_stream(infer.model_inputs(SPEC, rows()))))
    assert scores["test"][:2] == (2, 2) and scores["test"][3] == 1  # 2 right, 1 undecodable skipped
    assert scores["train"][:2] == (1, 0)
    assert scores["train"][2] == pytest.approx(-np.log(0.05))
    merged = infer.merge_scores(scores, {"test": (1, 1, 0.5, 0)})
    assert merged["test"][:2] == (3, 3)


def test_score_partition_ignores_unwanted_splits():
    [scores] = list(infer.score_partition(SPEC, frozenset({"train"}), fake_stream(infer.model_inputs(SPEC, rows()))))
    assert scores["train"][:2] == (1, 0) and scores.get("test", (0, 0, 0.0, 0))[:2] == (0, 0)
