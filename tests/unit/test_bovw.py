"""The bag-of-visual-words family's pure parts: descriptor inputs, word counts, the Keras form of a
fitted pipeline against a numpy reference, Spark ML's perceptron weight layout, the CLI's family
choice. (Fitting with Spark ML and Spark's agreement with the Keras form: tests/integration/test_bovw_training.py.)"""

from __future__ import annotations

import click
import numpy as np
import pytest
from PIL import Image, ImageDraw

from orchard.app.spark_cli import chosen_family
from orchard.core.errors import UnusableImage
from orchard.spark_app import descriptors
from orchard.spark_app.bovw import BovwPlan, check_plan, perceptron_layers
from orchard.spark_app.preprocess import prepare, preprocessor
from orchard.spark_app.registry import family_of


def textured(seed: int = 0, size: int = 256) -> np.ndarray:
    """A uint8 RGB image with corners and blobs (keypoints for SIFT and ORB)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, w, h = (int(v) for v in rng.integers(0, size, 4))
        colour = tuple(int(c) for c in rng.integers(60, 255, 3))
        draw.rectangle((x, y, x + w // 4, y + h // 4), fill=colour)
        draw.ellipse((y, x, y + h // 5, x + w // 5), fill=colour[::-1])
    return np.asarray(image)


@pytest.mark.parametrize(("kind", "width"), [("sift", 128), ("orb", 256)])
def test_model_input_holds_the_strongest_descriptors_and_flags_real_rows(kind: str, width: int):
    x = descriptors.model_input(textured(), kind, 50)
    assert x.shape == (50, width + 1) and x.dtype == np.float32
    real = x[:, -1] > 0.5
    assert real.sum() >= 10
    assert np.all(x[~real] == 0)  # padding rows are zero, flag 0
    assert np.array_equal(real, np.sort(real)[::-1])  # real rows first
    if kind == "orb":
        assert set(np.unique(x[real, :-1])) <= {0.0, 1.0}  # bits unpacked
    assert np.array_equal(descriptors.model_input(textured(), kind, 50), x)  # deterministic


@pytest.mark.parametrize("kind", descriptors.KINDS)
def test_a_flat_image_has_no_keypoints_and_is_unusable_not_a_crash(kind: str):
    flat = np.full((120, 100, 3), 128, dtype=np.uint8)
    with pytest.raises(UnusableImage, match=f"no {kind} keypoints"):
        descriptors.model_input(flat, kind, 50)
    x, error = prepare(preprocessor(f"{kind}-50"), flat)
    assert x is None and error is not None and "keypoints" in error


def test_preprocessing_names_parse_and_reject_what_they_do_not_know():
    assert descriptors.preprocessing_name("sift", 50) == "sift-50"
    assert descriptors.parse_name("orb-200") == ("orb", 200)
    for bad in ("sift-0", "surf-5", "sift", "sift-05", "orb-x"):
        assert descriptors.parse_name(bad) is None
        with pytest.raises(ValueError, match="sift-N / orb-N"):
            preprocessor(bad)
    with pytest.raises(ValueError):
        descriptors.preprocessing_name("surf", 5)
    assert preprocessor("scale01") is not None  # fixed names unchanged


def test_word_counts_count_each_real_row_once_at_its_nearest_centre():
    centres = np.array([[0.0, 0.0], [10.0, 10.0], [0.0, 10.0]], dtype=np.float32)
    rows = np.array([[1, 1, 1], [9, 9, 1], [9.5, 11, 1], [0, 8, 1], [10, 10, 0]], dtype=np.float32)
    assert descriptors.word_counts(rows, centres).tolist() == [1.0, 2.0, 1.0]  # the unflagged row is not counted


def reference_probabilities(x: np.ndarray, w: dict) -> tuple[np.ndarray, np.ndarray]:
    """(embedding, probabilities) computed with numpy the way Spark ML's stages do."""
    counts = np.stack([descriptors.word_counts(one, w["centers"]) for one in x])
    tfidf = counts * w["idf"]
    norm = np.linalg.norm(tfidf, axis=1, keepdims=True)
    normalised = tfidf / np.where(norm > 0, norm, 1)
    embedding = normalised @ w["embedding"][0] + w["embedding"][1]
    (k1, b1), (k2, b2) = w["dense"]
    hidden = 1 / (1 + np.exp(-(embedding @ k1 + b1)))
    z = hidden @ k2 + b2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return embedding, e / e.sum(axis=1, keepdims=True)


def test_the_keras_form_computes_the_pipeline_and_survives_save_load_and_json(tmp_path):
    from orchard.spark_app import model as keras_model

    rng = np.random.default_rng(1)
    x = np.stack([descriptors.model_input(textured(seed), "orb", 40) for seed in range(6)])
    words, k, padded = 24, 6, 16
    embedding_kernel = np.zeros((words, padded))
    embedding_kernel[:, :k] = rng.normal(size=(words, k))
    embedding_bias = np.zeros(padded)
    embedding_bias[:k] = rng.normal(size=k)
    w = {
        "keypoints": 40,
        "centers": rng.integers(0, 2, (words, 256)).astype(np.float32),
        "idf": rng.random(words),
        "embedding": (embedding_kernel, embedding_bias),
        "dense": [(rng.normal(size=(padded, 8)), rng.normal(size=8)), (rng.normal(size=(8, 3)), rng.normal(size=3))],
    }
    net = keras_model.build_bovw(**w)
    embedding, probs = reference_probabilities(x, w)
    assert np.allclose(net.predict_on_batch(x), probs, atol=1e-5)
    embedder = keras_model.embedding_layer(net)
    assert embedder.name == "embedding" and embedder.output.shape[-1] == padded
    assert keras_model.describe(net)["embedding_dim"] == padded
    saved = keras_model.load_model_file(keras_model.save_model(net, tmp_path / "model.keras"))
    assert np.allclose(saved.predict_on_batch(x), probs, atol=1e-5)
    import keras

    shipped = keras.models.model_from_json(net.to_json())  # how executors rebuild a version
    shipped.set_weights(net.get_weights())
    assert np.allclose(shipped.predict_on_batch(x), probs, atol=1e-5)
    assert np.allclose(np.asarray(keras.Model(net.inputs, embedder.output).predict_on_batch(x)), embedding, atol=1e-5)


def test_perceptron_layers_follow_spark_ml_weight_layout():
    sizes = [3, 4, 2]
    flat = np.arange(3 * 4 + 4 + 4 * 2 + 2, dtype=float)
    (k1, b1), (k2, b2) = perceptron_layers(sizes, flat, padded_input=5)
    # Spark: per layer an out x in matrix stored column-major (element (o, i) at o + i * out), then the bias
    assert k1.shape == (5, 4) and k1[1, 2] == flat[2 + 1 * 4] and np.all(k1[3:] == 0)
    assert b1.tolist() == flat[12:16].tolist()
    assert k2.shape == (4, 2) and k2[3, 1] == flat[16 + 1 + 3 * 2] and b2.tolist() == flat[24:26].tolist()
    with pytest.raises(ValueError, match="weights"):
        perceptron_layers(sizes, flat[:-1], padded_input=5)


def test_train_family_flags_and_plan_checks():
    assert chosen_family(None, None, 0) == "cnn"
    assert chosen_family(None, "efficientnet-lite0", 2) == "transfer"
    assert chosen_family("bovw", None, 0) == "bovw"
    with pytest.raises(click.UsageError, match="--base is for --family transfer"):
        chosen_family("bovw", "efficientnet-lite0", 0)
    with pytest.raises(click.UsageError, match="--fine-tune needs --base"):
        chosen_family(None, None, 2)
    check_plan(BovwPlan("d", "orb", 8, 20))
    with pytest.raises(Exception, match="descriptor"):
        check_plan(BovwPlan("d", "surf"))
    assert BovwPlan("d", "orb", keypoints=20).preprocessing == "orb-20"


def test_family_of_reads_the_version_id():
    assert family_of("bovw-20261203073539-d76ea422") == "bovw"
    assert family_of("cnn-20261203073539-d76ea422") == "cnn"
    assert family_of("user-my-model-0123456789") == "user"
    assert family_of("imagenet:efficientnet-lite0") == "imagenet"


def test_small_samples_lower_the_words_and_components_instead_of_fitting_noise():
    from orchard.spark_app.bovw import component_count, vocabulary_size

    assert vocabulary_size(256, 100_000) == 256
    assert vocabulary_size(256, 1093) == 109  # 10 descriptors per word at least
    assert vocabulary_size(256, 25) == 2
    plan = BovwPlan("d", components=64, words=109)
    assert component_count(plan, 1000) == 64
    assert component_count(plan, 60) == 59  # past the data's rank a component is rounding noise
    assert component_count(BovwPlan("d", components=64, words=20), 1000) == 20
    with pytest.raises(Exception, match="usable train images"):
        component_count(plan, 1)
