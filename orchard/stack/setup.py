"""One-shot, re-runnable setup of a running stack: buckets, index templates, indices.

Shared by `orchard stack up` and the compose setup service: both call `setup_stack(settings)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch
from minio import Minio
from minio.notificationconfig import NotificationConfig, QueueConfig

from orchard.core import index_alias
from orchard.core.clients import es_client, s3_client
from orchard.core.errors import ServiceUnavailable
from orchard.core.retry import ES_SETUP, S3_SETUP, es_transient, retried, s3_transient, without_transport_retries
from orchard.core.settings import Settings
from orchard.core.table_write import create_table
from orchard.core.toolchain import REPO_ROOT
from orchard.stack.services import WEBHOOK_ARN

log = logging.getLogger(__name__)

MAPPINGS_DIR = REPO_ROOT / "es_mappings"
# mapping file -> the settings field naming the index it templates
TEMPLATES = {"images.json": "images_index", "models.json": "models_index"}
ALIASED = "images_index"  # behind an alias of numbered indices (orchard.core.index_alias)
OBJECT_CREATED = "s3:ObjectCreated:*"  # puts, copies and completed multipart uploads
GREEN_WAIT_SECONDS = 60  # Elasticsearch waits this long for a green cluster; the client a bit longer


def load_mapping(path: Path) -> dict[str, Any]:
    """A mapping file without its documentation keys (those starting with `_`)."""
    body = json.loads(path.read_text())
    return {k: v for k, v in body.items() if not k.startswith("_")}


def template_bodies(s: Settings, mappings_dir: Path = MAPPINGS_DIR) -> dict[str, dict[str, Any]]:
    """Index template name -> put_index_template body, one per file in es_mappings/."""
    bodies = {}
    for filename, field in TEMPLATES.items():
        index = getattr(s, field)
        bodies[index] = {
            "index_patterns": [index, f"{index}-*"] if field == ALIASED else [index],
            "priority": 500,
            "template": load_mapping(mappings_dir / filename),
            "_meta": {"managed_by": "orchard", "source": f"es_mappings/{filename}"},
        }
    return bodies


@retried(S3_SETUP, s3_transient, log)  # MinIO may still be starting (orchard.core.retry)
def ensure_bucket(client: Minio, bucket: str) -> bool:
    """Create `bucket` unless it exists; True if it was created."""
    if client.bucket_exists(bucket):
        return False
    client.make_bucket(bucket)
    return True


def ensure_buckets(s: Settings) -> None:
    """The images, features, models and lake buckets exist."""
    client = s3_client(s)
    for bucket in (s.images_bucket, s.features_bucket, s.models_bucket, s.lake_bucket):
        if ensure_bucket(client, bucket):
            log.info("created bucket %s", bucket)


def apply_templates(s: Settings) -> None:
    """Put every index template from es_mappings/ and create the indices (idempotent)."""
    put_templates(es_client(s), template_bodies(s), aliased=s.images_index)


@retried(ES_SETUP, es_transient, log)  # Elasticsearch may still be starting (orchard.core.retry)
def put_templates(es: Elasticsearch, bodies: dict[str, dict[str, Any]], aliased: str | None = None) -> None:
    """Put the index templates, create the indices they template (or add new fields to existing
    ones), wait for green (redone as a whole). `aliased`: the index name that is an alias of
    numbered indices (its first one, `<name>-1`, created with it)."""
    es = without_transport_retries(es)
    for name, body in bodies.items():
        es.indices.put_index_template(name=name, **body)
        if not es.indices.exists(index=name):  # true for an alias too
            create_index(es, name, name == aliased)
        else:  # an index made by an older release gets the fields added since
            add_new_fields(es, name, body["template"]["mappings"])
    es.options(request_timeout=GREEN_WAIT_SECONDS + 15).cluster.health(
        wait_for_status="green", timeout=f"{GREEN_WAIT_SECONDS}s"
    )


def create_index(es: Elasticsearch, name: str, aliased: bool) -> None:
    """Create index `name`, or `<name>-1` with the alias `name` when `aliased` (the template applies)."""
    if aliased:
        first = index_alias.numbered(name, 1)
        es.indices.create(index=first, aliases={name: {"is_write_index": True}})
        log.info("created index %s behind the alias %s", first, name)
    else:
        es.indices.create(index=name)
        log.info("created index %s", name)


def add_new_fields(es: Elasticsearch, index: str, mappings: dict[str, Any]) -> None:
    """Put the fields of `mappings` that `index` (an index, or every index of an alias) does not have
    yet (existing fields are left as they are: e.g. the embedding's dims, fixed by the first document)."""
    for concrete, body in es.indices.get_mapping(index=index).items():
        new = missing_properties(mappings.get("properties", {}), body["mappings"].get("properties", {}))
        if new:
            es.indices.put_mapping(index=concrete, properties=new)
            log.info("added fields %s to index %s", ", ".join(sorted(new)), concrete)


def missing_properties(wanted: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any]:
    """The part of the `wanted` properties tree that `existing` lacks (objects recursed into)."""
    missing: dict[str, Any] = {}
    for name, spec in wanted.items():
        if name not in existing:
            missing[name] = spec
        elif "properties" in spec and "properties" in existing[name]:
            below = missing_properties(spec["properties"], existing[name]["properties"])
            if below:
                missing[name] = {"properties": below}
    return missing


def setup_stack(s: Settings) -> None:
    """Buckets, the (empty) images table, and index templates; raises ServiceUnavailable naming what failed."""
    s.require("s3_access_key", "s3_secret_key")
    try:
        ensure_buckets(s)
        create_table(s)  # so that uploads add their rows from the start (orchard.uploader.table_feed)
    except Exception as exc:
        raise ServiceUnavailable(f"minio setup at {s.s3_url} failed: {exc}") from exc
    try:
        apply_templates(s)
    except Exception as exc:
        raise ServiceUnavailable(f"elasticsearch setup at {s.es_urls[0]} failed: {exc}") from exc


@retried(S3_SETUP, s3_transient, log)  # MinIO may still be starting (orchard.core.retry)
def subscribe_images_bucket(s: Settings) -> None:
    """Send the images bucket's object creations to the nodes' webhook target (`orchard serve`'s
    auto-enrichment; native stack: orchard.stack.services.webhook_env). Idempotent."""
    rule = QueueConfig(queue=WEBHOOK_ARN, events=[OBJECT_CREATED], config_id="orchard-enrichment")
    s3_client(s).set_bucket_notification(s.images_bucket, NotificationConfig(queue_config_list=[rule]))
    log.info("images bucket events go to %s", WEBHOOK_ARN)
