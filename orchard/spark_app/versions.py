"""Model versions as Keras models: load a registered version, register a user's model file.

Sits above `registry` (files and documents, no TensorFlow) and `model` (all TensorFlow/Elephas
code, no storage), so neither of those imports the other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from orchard.core.errors import ConfigError
from orchard.core.files import read_names, sha256_file
from orchard.core.lake import utc_timestamp
from orchard.core.settings import Settings
from orchard.spark_app import registry
from orchard.spark_app.preprocess import preprocessor

if TYPE_CHECKING:
    from orchard.spark_app.model import OrchardSparkModel


def load_version(s: Settings, version: str) -> tuple[OrchardSparkModel, dict]:
    """(Elephas-wrapped model, model card) of a registered version, loaded in this (driver) process."""
    card = load_card(s, version)
    return load_model(s, card), card


def load_card(s: Settings, version: str) -> dict:
    """The card of a registered version (labels.json), or of a pretrained base used as-is
    (`imagenet:efficientnet-lite0`: built locally, no registry). ConfigError if unknown."""
    if not registry.is_pretrained(version):
        return registry.load_card(s, version)
    # TensorFlow: loaded only when a pretrained base is used.
    from orchard.spark_app import pretrained  # noqa: PLC0415

    return pretrained.imagenet_card(version)


def load_model(s: Settings, card: dict) -> OrchardSparkModel:
    """The Elephas-wrapped model of a card (registered version or pretrained base), loaded in this
    (driver) process."""
    # TensorFlow: loaded only when a model version is loaded.
    from orchard.spark_app import model as keras_model  # noqa: PLC0415
    from orchard.spark_app import pretrained  # noqa: PLC0415

    if registry.is_pretrained(card["version"]):
        return keras_model.wrap(pretrained.load_lite0(pretrained.models_cache(s)))
    with tempfile.TemporaryDirectory(prefix="orchard-model-") as tmp:
        path = registry.download_model(s, card, Path(tmp))
        return keras_model.wrap(keras_model.load_model_file(path))


def read_class_names(path: Path) -> list[str]:
    """Class names from a JSON list / {"classes": [...]} file or a text file with one name per line."""
    try:
        return read_names(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def import_model_file(s: Settings, path: Path, preprocessing: str, labels_path: Path | None = None) -> str:
    """Register a user-supplied Keras model file as a version (content-addressed); returns the version id.

    The file is loaded once on the driver to check it and read its input size and number of classes.
    """
    # TensorFlow: loaded only when a model file is imported.
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    preprocessor(preprocessing)  # fail fast on an unknown name
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    if path.suffix.lower() not in {".keras", ".h5"}:
        raise ConfigError(f"{path}: expected a .keras (or legacy .h5) Keras model file")
    try:
        facts = keras_model.describe(keras_model.load_model_file(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: not a loadable Keras model: {exc}") from None
    classes = read_class_names(labels_path) if labels_path else [f"class_{i}" for i in range(facts["num_classes"])]
    if len(classes) != facts["num_classes"]:
        raise ConfigError(
            f"{labels_path}: {len(classes)} class names, but the model has {facts['num_classes']} outputs"
        )
    version = registry.user_version(path, sha256_file(path))
    card = {
        "version": version,
        "classes": classes,
        "preprocessing": preprocessing,
        "model_file": f"model{path.suffix.lower()}",
        "architecture": f"user:{path.name}",
        **facts,
    }
    registry_doc = {
        "family": registry.FAMILY_USER,
        "base": None,
        "created_at": utc_timestamp(timespec="auto", zulu=False),
        "classes": classes,
        "num_classes": len(classes),
        "architecture": card["architecture"],
        "params": facts["params"],
    }
    registry.publish(s, version, path, card, None, registry_doc)
    return version
