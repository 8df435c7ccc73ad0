"""The lake's schema, in one place: how objects are keyed, how Spark addresses them, what the fields
of an image document are called, and how stored times are written.

Owned here (and built or parsed nowhere else):
- Object keys of the images bucket: `<dataset>/<split>/<label>/<file>`. The uploader builds them
  (`object_key`), the Spark app reads them back (`parse_key`, `key_of`, and `LABEL_PATTERN` for
  Spark SQL, which extracts the label without Python). The label is the file's parent folder.
  Which objects are images (their suffixes) is orchard.core.formats' (`is_image_key`).
- Split names: train, val, test; `normalise_split` maps folder names (Training, Test, ...) to them.
- URIs: `s3a_uri` (what Spark reads an object with, stored as the document's `uri`), the
  directories and files the Spark app reads and writes: `dataset_uri`, `features_uri`, `model_uri`,
  and the two spellings of one object's URI (`object_store_uri` for delta-rs, `hadoop_uri` for Spark).
- Field names of an image document: `Field` (dotted paths for nested fields, as queries use them),
  `Prediction`, `Pca`, `Pretrained` and `Quality` (the names inside those objects, as documents
  are built and read), exactly the fields of es_mappings/images.json (tests/unit/test_lake.py checks both ways).
- The Delta table of images (`Column`, `TABLE_SCHEMA`, `PARTITION_COLUMNS`): one row per image
  object, derived from the bucket (docs/lake.md); its location is `Settings.images_table_uri`.
- Stored times: `utc_timestamp`, the one ISO-8601 UTC formatter (uploaded_at, predicted_at,
  created_at, upload reports).

Plain constants and pure functions: imported by the uploader, the Spark app (executors included),
the report and the benches.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

# --- object keys ------------------------------------------------------------------------------------

KEY_LAYOUT: Final = "<dataset>/<split>/<label>/<file>"
# The label folder of a key or of an s3a path (group 1), for Spark SQL's regexp_extract: the same
# label as parse_key (the file's parent folder).
LABEL_PATTERN: Final = r"^.*/([^/]+)/[^/]+$"


def object_key(dataset: str, split: str, label: str, name: str) -> str:
    """The key of file `name` of class `label` in a dataset split: `<dataset>/<split>/<label>/<name>`."""
    return f"{dataset}/{split}/{label}/{name}"


def parse_key(key: str) -> tuple[str, str, str]:
    """(dataset, split, label) from a `<dataset>/<split>/<label>/<file>` key; ValueError otherwise."""
    parts = key.split("/")
    if len(parts) < 4 or not all(parts[:4]):
        raise ValueError(f"key {key!r} is not {KEY_LAYOUT}")
    return parts[0], parts[1], parts[-2]


def in_layout(key: str) -> bool:
    """True if `parse_key` accepts the key: `<dataset>/<split>/<label>/<file>` (or deeper)."""
    try:
        parse_key(key)
    except ValueError:
        return False
    return True


# --- splits -----------------------------------------------------------------------------------------

TRAIN: Final = "train"
VAL: Final = "val"
TEST: Final = "test"
SPLITS: Final = (TRAIN, VAL, TEST)  # in reading order
SPLIT_ALIASES: Final = {
    "train": TRAIN,
    "training": TRAIN,
    "test": TEST,
    "testing": TEST,
    "val": VAL,
    "valid": VAL,
    "validation": VAL,
}


def normalise_split(name: str) -> str | None:
    """train/test/val for a recognised split folder name, else None."""
    return SPLIT_ALIASES.get(name.strip().lower())


# --- URIs -------------------------------------------------------------------------------------------

S3A: Final = "s3a://"
_SCHEMES = (S3A, "s3://", "s3n://")


def s3a_uri(bucket: str, key: str) -> str:
    """The URI Spark reads object `key` of `bucket` with (a key ending in / names a directory)."""
    return f"{S3A}{bucket}/{key}"


def key_of(uri: str, bucket: str) -> str:
    """The object key of an s3a/s3 URI in `bucket` (Spark's `path` column is not percent-encoded)."""
    for scheme in _SCHEMES:
        prefix = f"{scheme}{bucket}/"
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    raise ValueError(f"{uri} is not in bucket {bucket}")


def object_store_uri(uri: str) -> str:
    """A URI as delta-rs (Rust's object_store) addresses it (s3://); Hadoop's s3a:// names the same
    objects."""
    return "s3://" + uri.removeprefix(S3A) if uri.startswith(S3A) else uri


def hadoop_uri(uri: str) -> str:
    """A URI from delta-rs (s3://) as Spark reads it (s3a://)."""
    return S3A + uri.removeprefix("s3://") if uri.startswith("s3://") else uri


def dataset_uri(bucket: str, dataset: str, split: str | None = None) -> str:
    """The s3a directory holding a dataset's images (or one split of them)."""
    if not dataset or "/" in dataset:
        raise ValueError(f"bad dataset name {dataset!r}")
    return s3a_uri(bucket, f"{dataset}/{split}/" if split else f"{dataset}/")


def features_uri(bucket: str, dataset: str, version: str, part: str) -> str:
    """The s3a directory of one output (embeddings, pca, pca_csv) of a dataset and model version
    (`imagenet:efficientnet-lite0` is written `imagenet-efficientnet-lite0`: Hadoop paths take no colon)."""
    return s3a_uri(bucket, f"{dataset}/{version.replace(':', '-')}/{part}/")


def model_uri(bucket: str, version: str, name: str) -> str:
    """The s3a URI of one file (model, labels.json, metrics.json) of a model version."""
    return s3a_uri(bucket, f"{version}/{name}")


# --- image documents (es_mappings/images.json) ----------------------------------------------------


def path(*names: str) -> str:
    """The dotted path of a nested field: `path(Field.PREDICTION, Prediction.LABEL)` is `prediction.label`."""
    return ".".join(names)


class Prediction:
    """Names inside a document's `prediction` object (the entries of `top5` have label and confidence)."""

    LABEL: Final = "label"
    CONFIDENCE: Final = "confidence"
    TOP5: Final = "top5"
    MODEL_VERSION: Final = "model_version"
    MODEL_FAMILY: Final = "model_family"  # cnn, transfer, bovw, user, imagenet (the version's registry family)
    PREDICTED_AT: Final = "predicted_at"
    TABLE_VERSION: Final = "table_version"  # the images table version the prediction read
    ERROR: Final = "error"


class Pca:
    """Names inside a document's `pca` object: the first two principal components."""

    X: Final = "x"
    Y: Final = "y"


class Pretrained:
    """Names inside a document's `pretrained` object: a pretrained base's features of the image
    (`orchard features --model imagenet:<base>`), beside the trained model's `embedding` and `pca`
    (a dense_vector's dims are fixed per index: 1280 for the base, the trained models' own width)."""

    EMBEDDING: Final = "embedding"
    MODEL: Final = "model"
    PCA: Final = "pca"  # object: see Pca


class Quality:
    """Names inside a document's `quality` object: whether the image carries information, measured at
    upload from its decoded pixels (orchard.core.quality; absent when the pixels were not decoded)."""

    EMPTY: Final = "empty"  # black, constant or no-data: left out of training by default
    DARK_FRACTION: Final = "dark_fraction"  # pixels whose every band is black
    NODATA_FRACTION: Final = "nodata_fraction"  # pixels without a value (NaN, inf, the TIFF's no-data)
    STD: Final = "std"  # largest per-band standard deviation, as a fraction of the value scale


class Tile:
    """Names inside a tile document's `tile` object: one fixed-size window of a large raster
    (orchard.spark_app.tiles), predicted like any image; the document's key is the raster's."""

    PARENT: Final = "parent"  # the raster's id (its document's _id)
    ROW: Final = "row"  # the tile's row and column in the raster's tile grid
    COL: Final = "col"
    TOP: Final = "top"  # its pixel window in the raster
    LEFT: Final = "left"
    HEIGHT: Final = "height"
    WIDTH: Final = "width"
    BOUNDS: Final = "bounds"  # [west, south, east, north] in the raster's CRS, when georeferenced


class Tiles:
    """Names inside a tiled raster's `tiles` object: what its tiles were predicted as."""

    COUNT: Final = "count"  # tiles predicted
    ROWS: Final = "rows"  # the tile grid's shape
    COLS: Final = "cols"
    CLASSES: Final = "classes"  # [{label, count}], most tiles first; failed tiles are not counted
    LABEL: Final = "label"  # the class of most tiles
    MODEL_VERSION: Final = "model_version"


class Field:
    """Field names of an image document; nested fields as the dotted paths queries use (built from the
    names inside their objects, `Prediction`, `Pca`, `Pretrained`, `Quality`, `Tile` and `Tiles`)."""

    ID: Final = "id"  # = the content sha256 = the document _id
    DATASET: Final = "dataset"
    SPLIT: Final = "split"
    LABEL: Final = "label"
    LABEL_TEXT: Final = "label_text"
    BUCKET: Final = "bucket"
    KEY: Final = "key"
    URI: Final = "uri"
    BYTES: Final = "bytes"
    FORMAT: Final = "format"
    WIDTH: Final = "width"
    HEIGHT: Final = "height"
    CHANNELS: Final = "channels"
    COLOR_MODE: Final = "color_mode"
    SHA256: Final = "sha256"
    ETAG: Final = "etag"
    UPLOADED_AT: Final = "uploaded_at"
    SOURCE_PATH: Final = "source_path"
    PREDICTION: Final = "prediction"  # object: see Prediction
    PREDICTION_LABEL: Final = path(PREDICTION, Prediction.LABEL)
    PREDICTION_CONFIDENCE: Final = path(PREDICTION, Prediction.CONFIDENCE)
    PREDICTION_TOP5: Final = path(PREDICTION, Prediction.TOP5)
    PREDICTION_MODEL_VERSION: Final = path(PREDICTION, Prediction.MODEL_VERSION)
    PREDICTION_MODEL_FAMILY: Final = path(PREDICTION, Prediction.MODEL_FAMILY)
    PREDICTION_PREDICTED_AT: Final = path(PREDICTION, Prediction.PREDICTED_AT)
    PREDICTION_TABLE_VERSION: Final = path(PREDICTION, Prediction.TABLE_VERSION)
    PREDICTION_ERROR: Final = path(PREDICTION, Prediction.ERROR)
    EMBEDDING: Final = "embedding"
    EMBEDDING_MODEL: Final = "embedding_model"
    PCA: Final = "pca"  # object: see Pca
    PCA_X: Final = path(PCA, Pca.X)
    PCA_Y: Final = path(PCA, Pca.Y)
    PRETRAINED: Final = "pretrained"  # object: see Pretrained
    PRETRAINED_EMBEDDING: Final = path(PRETRAINED, Pretrained.EMBEDDING)
    PRETRAINED_MODEL: Final = path(PRETRAINED, Pretrained.MODEL)
    PRETRAINED_PCA: Final = path(PRETRAINED, Pretrained.PCA)
    QUALITY: Final = "quality"  # object: see Quality
    QUALITY_EMPTY: Final = path(QUALITY, Quality.EMPTY)
    QUALITY_DARK_FRACTION: Final = path(QUALITY, Quality.DARK_FRACTION)
    QUALITY_NODATA_FRACTION: Final = path(QUALITY, Quality.NODATA_FRACTION)
    QUALITY_STD: Final = path(QUALITY, Quality.STD)
    TILE: Final = "tile"  # object: see Tile (tile documents only)
    TILE_PARENT: Final = path(TILE, Tile.PARENT)
    TILE_ROW: Final = path(TILE, Tile.ROW)
    TILE_COL: Final = path(TILE, Tile.COL)
    TILE_TOP: Final = path(TILE, Tile.TOP)
    TILE_LEFT: Final = path(TILE, Tile.LEFT)
    TILE_HEIGHT: Final = path(TILE, Tile.HEIGHT)
    TILE_WIDTH: Final = path(TILE, Tile.WIDTH)
    TILE_BOUNDS: Final = path(TILE, Tile.BOUNDS)
    TILES: Final = "tiles"  # object: see Tiles (tiled rasters only)
    TILES_COUNT: Final = path(TILES, Tiles.COUNT)
    TILES_ROWS: Final = path(TILES, Tiles.ROWS)
    TILES_COLS: Final = path(TILES, Tiles.COLS)
    TILES_CLASSES: Final = path(TILES, Tiles.CLASSES)
    TILES_LABEL: Final = path(TILES, Tiles.LABEL)
    TILES_MODEL_VERSION: Final = path(TILES, Tiles.MODEL_VERSION)


# --- the images table (Delta Lake) -------------------------------------------------------------------


class Column:
    """Columns of the images table: one row per image object of the bucket, derived from it."""

    ID: Final = "id"  # content sha256 = the document _id
    KEY: Final = "key"  # object key in the images bucket (what sync merges rows by)
    DATASET: Final = "dataset"  # partition column
    SPLIT: Final = "split"
    LABEL: Final = "label"
    FORMAT: Final = "format"  # orchard.core.formats name (jpeg, png, tiff, npy, ...)
    WIDTH: Final = "width"
    HEIGHT: Final = "height"
    CHANNELS: Final = "channels"
    BYTES: Final = "bytes"  # object size
    ETAG: Final = "etag"  # the object's ETag when it was read: an overwritten object is read again
    CONTENT: Final = "content"  # the object's bytes; null above Settings.lake_inline_max_bytes (read by key)
    INGESTED_AT: Final = "ingested_at"


# The table's columns with their Spark SQL types, in storage order (the binary column last keeps
# the small columns of a row group together); the DDL and the name list are derived from it.
TABLE_COLUMNS: Final = (
    (Column.ID, "STRING NOT NULL"),
    (Column.KEY, "STRING NOT NULL"),
    (Column.DATASET, "STRING NOT NULL"),
    (Column.SPLIT, "STRING"),
    (Column.LABEL, "STRING"),
    (Column.FORMAT, "STRING"),
    (Column.WIDTH, "INT"),
    (Column.HEIGHT, "INT"),
    (Column.CHANNELS, "INT"),
    (Column.BYTES, "BIGINT"),
    (Column.ETAG, "STRING"),
    (Column.INGESTED_AT, "TIMESTAMP"),
    (Column.CONTENT, "BINARY"),
)
TABLE_SCHEMA: Final = ", ".join(f"{name} {kind}" for name, kind in TABLE_COLUMNS)  # Spark DDL
COLUMN_NAMES: Final = tuple(name for name, _ in TABLE_COLUMNS)
PARTITION_COLUMNS: Final = (Column.DATASET,)
# Spark DDL of the rows as read (files make every column nullable), and of the table's Parquet
# files: every column but the partition columns, whose values are in the directory names.
READ_SCHEMA: Final = TABLE_SCHEMA.replace(" NOT NULL", "")
DATA_SCHEMA: Final = ", ".join(
    f"{name} {kind.replace(' NOT NULL', '')}" for name, kind in TABLE_COLUMNS if name not in PARTITION_COLUMNS
)


# --- the predictions table ----------------------------------------------------------------------------
# Every prediction `orchard infer` writes into a document, also kept in the lake: one row per (image,
# model version), every version kept, so the index can be rebuilt and "which model said what, when"
# is one query. The prediction's fields have the names they have in the document (Prediction).
PREDICTION_COLUMNS: Final = (
    (Column.ID, "STRING NOT NULL"),
    (Column.DATASET, "STRING NOT NULL"),
    (Column.KEY, "STRING"),
    (Prediction.MODEL_VERSION, "STRING NOT NULL"),
    (Prediction.MODEL_FAMILY, "STRING"),
    (Prediction.LABEL, "STRING"),
    (Prediction.CONFIDENCE, "DOUBLE"),
    (Prediction.TOP5, f"ARRAY<STRUCT<{Prediction.LABEL}: STRING, {Prediction.CONFIDENCE}: DOUBLE>>"),
    (Prediction.ERROR, "STRING"),
    (Prediction.PREDICTED_AT, "STRING"),  # as in the document, so a rebuilt index has the same text
    (Prediction.TABLE_VERSION, "BIGINT"),  # the images table version the prediction read
)
PREDICTION_SCHEMA: Final = ", ".join(f"{name} {kind}" for name, kind in PREDICTION_COLUMNS)
PREDICTION_KEY: Final = (Column.ID, Prediction.MODEL_VERSION)  # a row per image and model version
# A new prediction is the same as the stored one (the document and the row left as they are, its
# first `predicted_at` kept) when these fields are equal.
SAME_PREDICTION: Final = (Prediction.MODEL_VERSION, Prediction.LABEL, Prediction.ERROR)


# --- the features table ------------------------------------------------------------------------------
# Every `orchard features` run's embeddings and 2-D PCA, also kept in the lake: one row per (image,
# model version) of a dataset, a run replacing its own (dataset, version) slice, every version kept.
# `orchard reindex` rebuilds a document's `embedding`/`pca` (or `pretrained`) from the newest run.
FEATURE_VERSION: Final = "model_version"
FEATURE_EMBEDDING: Final = "embedding"
FEATURE_PCA_X: Final = "pca_x"
FEATURE_PCA_Y: Final = "pca_y"
FEATURE_COMPUTED_AT: Final = "computed_at"
FEATURE_COLUMNS: Final = (
    (Column.ID, "STRING NOT NULL"),
    (Column.DATASET, "STRING NOT NULL"),
    (FEATURE_VERSION, "STRING NOT NULL"),
    (Column.KEY, "STRING"),
    (FEATURE_EMBEDDING, "ARRAY<FLOAT>"),
    (FEATURE_PCA_X, "DOUBLE"),
    (FEATURE_PCA_Y, "DOUBLE"),
    (FEATURE_COMPUTED_AT, "STRING"),  # utc_timestamp of the run: the newest run per dataset is rebuilt
)
FEATURE_SCHEMA: Final = ", ".join(f"{name} {kind}" for name, kind in FEATURE_COLUMNS)
FEATURE_PARTITIONS: Final = (Column.DATASET, FEATURE_VERSION)


# --- stored times -----------------------------------------------------------------------------------


def utc_timestamp(moment: datetime | None = None, *, timespec: str = "milliseconds", zulu: bool = True) -> str:
    """`moment` (default: now) as ISO-8601 UTC; `timespec` as datetime.isoformat, `zulu=False` keeps `+00:00`.

    Stored times keep the form each has always had (all parse as an Elasticsearch `date`):
      uploaded_at, upload reports: utc_timestamp()                      2026-01-02T03:04:05.678Z
      prediction.predicted_at, created_at of a trained model version:
                        utc_timestamp(timespec="seconds", zulu=False)   2026-01-02T03:04:05+00:00
      created_at of an imported model file:
                        utc_timestamp(timespec="auto", zulu=False)      2026-01-02T03:04:05.678901+00:00
    """
    text = (moment or datetime.now(UTC)).astimezone(UTC).isoformat(timespec=timespec)
    return text.removesuffix("+00:00") + "Z" if zulu else text
