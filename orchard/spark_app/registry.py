"""Model versions: files in the models bucket (`<version>/model.keras|labels.json|metrics.json`) and
one document per version in the models index, its copy kept beside the files (`registry.json`:
`orchard reindex` restores the documents the index lost).

`labels.json` is the model card executors and the driver read: classes in output order,
preprocessing name, input size, architecture. It is written before the index document, so a
version that is in the index is always complete in the bucket.
"""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

from elasticsearch import NotFoundError
from minio.error import S3Error

from orchard.core.clients import es_client, s3_client
from orchard.core.errors import ConfigError
from orchard.core.lake import model_uri, utc_timestamp
from orchard.core.objects import get_bytes
from orchard.core.retry import ES_WRITE, REGISTRY, es_transient, retried, s3_transient, without_transport_retries
from orchard.core.settings import Settings

log = logging.getLogger(__name__)

MODEL_FILE, LABELS_FILE, METRICS_FILE = "model.keras", "labels.json", "metrics.json"
# A copy of the version's registry document, so the models index can be rebuilt from the bucket
# (`orchard reindex`, after the index was lost).
REGISTRY_FILE = "registry.json"

# The models bucket's transfers: throttling, 5xx, dropped connections, timeouts (orchard.core.retry).
_retrying = retried(REGISTRY, s3_transient, log)
# Its documents in the models index: throttling (429) under a busy cluster, 5xx, dropped connections.
_es_retrying = retried(ES_WRITE, es_transient, log)


# Model families, recorded as `family` in the models index (and the prefix of their version ids).
FAMILY_CNN = "cnn"  # Orchard's CNN trained from scratch with Elephas
FAMILY_USER = "user"  # a user's Keras file, imported
FAMILY_TRANSFER = "transfer"  # an ImageNet-pretrained base plus a head trained here (orchard.spark_app.transfer)
FAMILY_BOVW = "bovw"  # SIFT/ORB bag of visual words + PCA + perceptron, fitted with Spark ML (orchard.spark_app.bovw)
LISTED_FIELDS = ("version", "family", "base", "dataset", "created_at", "trained_on_version", "test_images")


def new_version(prefix: str, digest: str, now: datetime | None = None) -> str:
    """A version id `<prefix>-<UTC yyyymmddHHMMSS>-<8 hex of digest>`."""
    now = now or datetime.now(UTC)
    return f"{prefix}-{now.astimezone(UTC):%Y%m%d%H%M%S}-{digest[:8]}"


def user_version(path: Path, digest: str) -> str:
    """Content-addressed version id of a user model file: `user-<stem>-<10 hex>` (re-imports are no-ops)."""
    stem = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")[:40] or "model"
    return f"{FAMILY_USER}-{stem}-{digest[:10]}"


# Models used as published, not registered versions: `imagenet:<base>` (orchard.spark_app.pretrained).
PRETRAINED_PREFIX = "imagenet:"
PRETRAINED_BASES = ("efficientnet-lite0",)  # what `--base` and `imagenet:<base>` accept


def is_pretrained(version: str) -> bool:
    """True if `version` names a pretrained base used as-is (`imagenet:efficientnet-lite0`)."""
    return version.startswith(PRETRAINED_PREFIX)


def family_of(version: str) -> str:
    """The model family a version id names: its prefix (`bovw-...` -> bovw), `imagenet` for a
    pretrained base used as-is."""
    return PRETRAINED_PREFIX.rstrip(":") if is_pretrained(version) else version.split("-", 1)[0]


def uri(s: Settings, version: str, name: str) -> str:
    """s3a URI of one file of a version (in the models bucket of `s`)."""
    return model_uri(s.models_bucket, version, name)


@_retrying
def put_file(s: Settings, key: str, path: Path) -> None:
    """Upload a local file to the models bucket (multipart for big models)."""
    s3_client(s).fput_object(s.models_bucket, key, str(path))


@_retrying
def put_json(s: Settings, key: str, body: dict) -> None:
    """Upload a JSON document to the models bucket."""
    data = json.dumps(body, indent=2, sort_keys=True).encode()
    s3_client(s).put_object(s.models_bucket, key, io.BytesIO(data), len(data), content_type="application/json")


@_retrying
def get_json(s: Settings, version: str, name: str) -> dict:
    """A JSON file of a version; ConfigError if the version does not exist."""
    client = s3_client(s)
    try:
        return json.loads(get_bytes(client, s.models_bucket, f"{version}/{name}"))
    except S3Error as exc:
        if exc.code in {"NoSuchKey", "NoSuchBucket"}:
            raise ConfigError(f"model version {version!r} not found (no {s.models_bucket}/{version}/{name})") from None
        raise


def load_card(s: Settings, version: str) -> dict:
    """The model card (labels.json) of a version: classes, preprocessing, input_size, architecture."""
    card = get_json(s, version, LABELS_FILE)
    card.setdefault("version", version)
    card["model_uri"] = uri(s, version, card.get("model_file", MODEL_FILE))
    return card


@_retrying
def download_model(s: Settings, card: dict, dest_dir: Path) -> Path:
    """Download a version's model file into `dest_dir`; returns its local path."""
    name = card.get("model_file", MODEL_FILE)
    path = dest_dir / name
    s3_client(s).fget_object(s.models_bucket, f"{card['version']}/{name}", str(path))
    return path


def list_versions(s: Settings, dataset: str | None = None, limit: int = 50) -> list[dict]:
    """The newest `limit` registered versions (of one dataset), newest first, each as a summary:
    version, family, base, dataset, creation time, table version, test images and accuracy,
    training seconds, inference images/s (None where a version has no such figure, e.g. an imported
    file or a version never run by `orchard infer`)."""
    query = {"term": {"dataset": dataset}} if dataset else {"match_all": {}}
    hits = es_client(s).search(
        index=s.models_index, query=query, size=limit, sort=[{"created_at": "desc"}, {"version": "desc"}]
    )["hits"]["hits"]
    return [version_summary(hit["_source"]) for hit in hits]


def version_summary(doc: dict) -> dict:
    """The listed fields of one registry document; `family` from the version id for documents
    registered before the field existed."""
    summary = {name: doc.get(name) for name in LISTED_FIELDS}
    summary["family"] = doc.get("family") or family_of(str(doc.get("version", "")))
    summary["test_accuracy"] = (doc.get("metrics") or {}).get("test_accuracy")
    summary["training_seconds"] = doc.get("training_seconds")
    summary["images_per_second"] = (doc.get("inference") or {}).get("images_per_second")
    return summary


def inference_figures(summary: dict) -> dict | None:
    """The `inference` object of a registry document from an `orchard infer` run summary; None if
    the run measured nothing (no image predicted, or no time elapsed)."""
    if not summary.get("images") or summary.get("images_per_second") is None:
        return None
    return {
        "images_per_second": summary["images_per_second"],
        "images": summary["images"],
        "seconds": summary.get("seconds"),
        "measured_at": summary.get("predicted_at") or utc_timestamp(timespec="seconds", zulu=False),
        "table_version": summary.get("table_version"),
    }


def record_inference(s: Settings, version: str, summary: dict) -> None:
    """Record the inference rate of an `orchard infer` run in the version's registry document
    (replacing the previous measurement); pretrained bases and empty runs are not recorded."""
    figures = inference_figures(summary)
    if is_pretrained(version) or figures is None:
        return
    try:
        update_document(s, version, {"inference": figures})
    except NotFoundError:
        # A version whose files exist but whose document does not (e.g. an index rebuilt since):
        # the predictions are written, the rate is only a figure for comparison.
        log.warning("model %s has no document in %s: its inference rate is not recorded", version, s.models_index)
        return
    log.info("recorded %s images/s for model %s", figures["images_per_second"], version)


def register(s: Settings, version: str, card: dict, metrics: dict | None, registry_doc: dict) -> dict:
    """Upload metrics.json (if any), then index the version's registry document; returns that document."""
    doc = {
        "version": version,
        "model_uri": uri(s, version, card.get("model_file", MODEL_FILE)),
        "label_map_uri": uri(s, version, LABELS_FILE),
        **registry_doc,
    }
    if metrics is not None:
        put_json(s, f"{version}/{METRICS_FILE}", metrics)
        doc["metrics_uri"] = uri(s, version, METRICS_FILE)
    put_json(s, f"{version}/{REGISTRY_FILE}", doc)
    index_document(s, version, doc)
    log.info("registered model %s in %s and %s/%s/", version, s.models_index, s.models_bucket, version)
    return doc


@_es_retrying
def index_document(s: Settings, version: str, doc: dict) -> None:
    """Write a version's registry document (whole), visible to searches on return."""
    es = without_transport_retries(es_client(s))
    es.index(index=s.models_index, id=version, document=doc, refresh="wait_for")


def update_document(s: Settings, version: str, fields: dict) -> None:
    """Set fields of a version's registry document (and of its copy in the bucket), visible to
    searches on return; NotFoundError if it has none."""
    update_indexed(s, version, fields)
    try:
        kept = get_json(s, version, REGISTRY_FILE)
    except ConfigError:  # registered before the copy existed: the index alone holds it
        return
    put_json(s, f"{version}/{REGISTRY_FILE}", {**kept, **fields})


@_es_retrying
def update_indexed(s: Settings, version: str, fields: dict) -> None:
    """Set fields of a version's document in the models index; NotFoundError if it has none."""
    es = without_transport_retries(es_client(s))
    es.update(index=s.models_index, id=version, doc=fields, refresh="wait_for")


def restore_documents(s: Settings) -> list[str]:
    """Index the registry document of every version in the bucket whose document the models index
    lacks (from its `registry.json`); returns those versions."""
    es = es_client(s)
    restored = []
    for obj in s3_client(s).list_objects(s.models_bucket, recursive=True):
        version, _, name = obj.object_name.rpartition("/")
        if name != REGISTRY_FILE or not version or es.exists(index=s.models_index, id=version):
            continue
        index_document(s, version, get_json(s, version, REGISTRY_FILE))
        restored.append(version)
    if restored:
        log.info("restored %d model versions' documents in %s", len(restored), s.models_index)
    return restored


def publish(s: Settings, version: str, model_path: Path, card: dict, metrics: dict | None, registry_doc: dict) -> dict:
    """Upload model and card, then register the version; returns the registry document."""
    put_file(s, f"{version}/{card.get('model_file', MODEL_FILE)}", model_path)
    put_json(s, f"{version}/{LABELS_FILE}", card)
    return register(s, version, card, metrics, registry_doc)


# The version `orchard serve` answers with: an object of the models bucket, set by
# `orchard models promote` and re-read by the service every few seconds (no restart).
ALIASES, SERVING_ALIAS = "_aliases", "serving.json"
SERVING_ALIAS_KEY = f"{ALIASES}/{SERVING_ALIAS}"


def promote(s: Settings, version: str) -> dict:
    """Make `version` the serving model (it must exist in the bucket); returns the alias body."""
    load_card(s, version)  # ConfigError naming the version if it does not exist
    body = {"version": version, "promoted_at": utc_timestamp(timespec="seconds", zulu=False)}
    put_json(s, SERVING_ALIAS_KEY, body)
    log.info("model %s now serves (%s/%s)", version, s.models_bucket, SERVING_ALIAS_KEY)
    return body


def promoted_version(s: Settings) -> str | None:
    """The version `orchard models promote` set, or None if no version was ever promoted."""
    try:
        return get_json(s, ALIASES, SERVING_ALIAS).get("version")
    except ConfigError:  # no alias object (or no bucket yet)
        return None


def serving_version(s: Settings) -> str | None:
    """The version that serves: the promoted one while its files exist, else the newest registered
    version (None if none)."""
    promoted = promoted_version(s)
    if promoted:
        try:
            load_card(s, promoted)
            return promoted
        except ConfigError as exc:  # deleted since its promotion: serve the newest rather than nothing
            log.debug("the promoted model cannot serve (%s): serving the newest version", exc)
    newest = [v["version"] for v in list_versions(s, limit=20) if not is_pretrained(str(v.get("version")))]
    return newest[0] if newest else None
