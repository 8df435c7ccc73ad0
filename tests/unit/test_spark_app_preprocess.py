"""Pure logic of orchard.spark_app.preprocess: preprocessing by name, probabilities, top-k, k by explained variance."""

from __future__ import annotations

import numpy as np
import pytest

from orchard.core.iterables import batched
from orchard.spark_app import preprocess as pp


def test_scale01_maps_uint8_to_unit_interval():
    x = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = pp.preprocessor("scale01")(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)


def test_mobilenet_v2_maps_to_minus_one_one():
    x = np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1).repeat(3, axis=3)
    out = pp.preprocessor("mobilenet_v2")(x)
    assert out.min() == pytest.approx(-1.0) and out.max() == pytest.approx(1.0)


def test_caffe_mode_flips_to_bgr_and_subtracts_means():
    x = np.zeros((1, 1, 3), dtype=np.uint8)
    x[..., 0] = 200  # red
    out = pp.preprocessor("resnet50")(x)
    # channel 2 of the output is red (BGR) minus the red mean
    assert out[0, 0, 2] == pytest.approx(200 - 123.68, abs=1e-4)
    assert out[0, 0, 0] == pytest.approx(-103.939, abs=1e-4)


def test_unknown_preprocessing_names_the_choices():
    with pytest.raises(ValueError, match="scale01"):
        pp.preprocessor("nope")


def test_top_k_orders_by_probability_and_breaks_ties_by_index():
    probs = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    out = pp.top_k(probs, ["a", "b", "c"], k=5)
    assert [label for label, _ in out[0]] == ["b", "c", "a"]
    assert [label for label, _ in out[1]] == ["a", "c", "b"]  # tie 0.4/0.4: lower index first
    assert out[0][0][1] == pytest.approx(0.6)


def test_top_k_picks_what_a_stable_sort_picks_with_ties_across_the_cut():
    rng = np.random.default_rng(7)
    cases = [rng.random((50, 1000)), np.round(rng.random((40, 30)) * 4) / 4, np.full((5, 12), 1 / 12)]
    cases.append(np.array([[0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.1]]))  # the 2nd-5th places tie with a 6th
    for probs in cases:
        for k in (1, 3, 5, probs.shape[1] - 1, probs.shape[1]):
            want = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(pp.top_indices(probs, k), want)
    out = pp.top_k(cases[3], list("abcdefg"), k=3)
    assert [label for label, _ in out[0]] == ["a", "b", "c"]


def test_as_probabilities_keeps_softmax_outputs_and_softmaxes_logits():
    probs = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(pp.as_probabilities(probs), probs)
    logits = np.array([[0.0, np.log(3.0)]])
    np.testing.assert_allclose(pp.as_probabilities(logits), [[0.25, 0.75]])


def test_label_map_is_sorted_and_stable():
    assert pp.label_map(["Lime", "Apple Red", "Lime", "Banana"]) == {"Apple Red": 0, "Banana": 1, "Lime": 2}


def test_one_hot_and_cross_entropy():
    assert pp.one_hot(2, 4).tolist() == [0, 0, 1, 0]
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    terms = pp.cross_entropy_terms(probs, np.array([0, 1]))
    assert terms[0] == pytest.approx(np.log(2))
    assert terms[1] == pytest.approx(-np.log(1e-7))  # clipped like Keras, never inf


@pytest.mark.parametrize(
    "explained, threshold, k",
    [
        ([0.5, 0.3, 0.15, 0.05], 0.95, 3),
        ([0.5, 0.3, 0.15, 0.05], 0.80, 2),
        ([0.5, 0.3, 0.15, 0.05], 1.0, 4),
        ([0.96, 0.04], 0.95, 1),
        ([0.4, 0.4], 0.95, 2),  # the total never reaches the threshold: keep everything
    ],
)
def test_choose_k_is_the_smallest_k_reaching_the_threshold(explained, threshold, k):
    assert pp.choose_k(explained, threshold) == k


def test_choose_k_rejects_a_bad_threshold():
    with pytest.raises(ValueError):
        pp.choose_k([1.0], 0.0)


def test_batched_streams_and_keeps_the_remainder():
    consumed = []

    def source():
        for i in range(7):
            consumed.append(i)
            yield i

    batches = batched(source(), 3)
    assert next(batches) == [0, 1, 2]
    assert consumed == [0, 1, 2]  # lazily: nothing beyond the first batch was read
    assert list(batches) == [[3, 4, 5], [6]]


def test_mean_history_averages_the_last_value_per_worker():
    histories = [{"loss": [2.0, 1.0], "accuracy": [0.5]}, {"loss": [3.0], "accuracy": [0.7]}]
    assert pp.mean_history(histories) == pytest.approx({"loss": 2.0, "accuracy": 0.6})
    assert pp.mean_history([]) == {}
