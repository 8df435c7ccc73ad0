"""orchard.core.lake: the field names equal es_mappings/images.json, keys and URIs build and parse back,
stored times keep their forms."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchard.core import lake
from orchard.core.lake import Field, Pca, Prediction, Pretrained, Quality, Tile, Tiles

MAPPING = Path(__file__).resolve().parents[2] / "es_mappings" / "images.json"


def constants(namespace: type) -> dict[str, str]:
    return {name: value for name, value in vars(namespace).items() if name.isupper()}


def mapped_paths(properties: dict, prefix: str = "") -> set[str]:
    """Every field of a mapping as a dotted path (objects and their sub-fields)."""
    paths = set()
    for name, body in properties.items():
        paths.add(prefix + name)
        paths |= mapped_paths(body.get("properties", {}), f"{prefix}{name}.")
    return paths


@pytest.fixture(scope="module")
def properties() -> dict:
    return json.loads(MAPPING.read_text())["mappings"]["properties"]


def test_every_field_constant_is_mapped(properties):
    assert set(constants(Field).values()) - mapped_paths(properties) == set()


def test_every_top_level_mapped_field_has_a_constant(properties):
    assert set(properties) - set(constants(Field).values()) == set()


def test_nested_names_are_the_mapped_sub_fields(properties):
    assert set(constants(Prediction).values()) == set(properties[Field.PREDICTION]["properties"])
    assert set(constants(Pca).values()) == set(properties[Field.PCA]["properties"])
    pretrained = properties[Field.PRETRAINED]["properties"]
    assert set(constants(Pretrained).values()) == set(pretrained)
    assert set(constants(Pca).values()) == set(pretrained[Pretrained.PCA]["properties"])
    assert set(constants(Quality).values()) == set(properties[Field.QUALITY]["properties"])
    assert set(constants(Tile).values()) == set(properties[Field.TILE]["properties"])
    tiles = properties[Field.TILES]["properties"]
    assert set(constants(Tiles).values()) == set(tiles)
    assert set(tiles[Tiles.CLASSES]["properties"]) == {Tiles.LABEL, Tiles.COUNT}
    nested = {value for value in constants(Field).values() if "." in value}
    assert nested == {lake.path(Field.PREDICTION, name) for name in constants(Prediction).values()} | {
        lake.path(Field.PCA, name) for name in constants(Pca).values()
    } | {lake.path(Field.PRETRAINED, name) for name in constants(Pretrained).values()} | {
        lake.path(Field.QUALITY, name) for name in constants(Quality).values()
    } | {lake.path(Field.TILE, name) for name in constants(Tile).values()} | {
        lake.path(Field.TILES, name) for name in constants(Tiles).values()
    }


def test_constant_names_spell_their_values():
    for name, value in constants(Field).items():
        assert name == value.replace(".", "_").upper()


def test_a_built_key_parses_back():
    key = lake.object_key("fruits", lake.TRAIN, "apple_red", "0 100.jpg")
    assert key == "fruits/train/apple_red/0 100.jpg"
    assert lake.parse_key(key) == ("fruits", "train", "apple_red")
    assert lake.key_of(lake.s3a_uri("images", key), "images") == key


@pytest.mark.parametrize(
    "key", ["fruits/train/apple_red/0_100.jpg", "ds/test/x y/a b%41.jpg", "ds/train/deeper/label/f.png"]
)
def test_spark_label_pattern_agrees_with_parse_key(key):
    for path in (key, lake.s3a_uri("images", key)):
        assert re.match(lake.LABEL_PATTERN, path).group(1) == lake.parse_key(key)[2]


def test_uris():
    assert lake.s3a_uri("images", "ds/train/a/1.jpg") == "s3a://images/ds/train/a/1.jpg"
    assert lake.dataset_uri("images", "ds") == "s3a://images/ds/"
    assert lake.dataset_uri("images", "ds", "train") == "s3a://images/ds/train/"
    assert lake.features_uri("features", "ds", "cnn-1", "pca") == "s3a://features/ds/cnn-1/pca/"
    assert lake.model_uri("models", "cnn-1", "model.keras") == "s3a://models/cnn-1/model.keras"
    assert lake.key_of("s3://images/a/b", "images") == "a/b"


def test_split_names():
    assert lake.SPLITS == ("train", "val", "test")
    assert {lake.normalise_split(name) for name in lake.SPLIT_ALIASES} == set(lake.SPLITS)


def test_stored_time_forms():
    moment = datetime(2026, 1, 2, 4, 4, 5, 678901, tzinfo=timezone(timedelta(hours=1)))
    assert lake.utc_timestamp(moment) == "2026-01-02T03:04:05.678Z"
    assert lake.utc_timestamp(moment, timespec="seconds", zulu=False) == "2026-01-02T03:04:05+00:00"
    assert lake.utc_timestamp(moment, timespec="auto", zulu=False) == "2026-01-02T03:04:05.678901+00:00"
    assert lake.utc_timestamp(moment.replace(microsecond=0)) == "2026-01-02T03:04:05.000Z"
    now = datetime.strptime(lake.utc_timestamp(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - now) < timedelta(minutes=1)
