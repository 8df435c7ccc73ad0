"""Every mapping in es_mappings/ is accepted by the real Elasticsearch the stack runs.

Each file is put as an index template under a unique throwaway name and pattern, exactly as
`orchard setup` builds it (orchard.stack.setup.template_bodies), then an index matching it is
created and its mapping read back; both are deleted afterwards. A deliberately broken copy of a
mapping must be rejected, which shows the check can fail.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from elasticsearch import BadRequestError

from orchard.core.clients import es_client
from orchard.stack.setup import MAPPINGS_DIR, TEMPLATES, load_mapping, template_bodies

pytestmark = pytest.mark.integration

MAPPING_FILES = sorted(MAPPINGS_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def es(stack):
    return es_client(stack)


def throwaway_name(path: Path) -> str:
    return f"orchard-mapcheck-{path.stem}-{uuid.uuid4().hex[:8]}"


def put_and_create(es, name: str, mapping: dict) -> dict:
    """Template `name` (pattern `name`) with `mapping`, an index from it; returns the index mapping."""
    body = {"index_patterns": [name], "priority": 900, "template": mapping}
    try:
        es.indices.put_index_template(name=name, **body)
        es.indices.create(index=name)
        return es.indices.get_mapping(index=name)[name]["mappings"]
    finally:
        es.indices.delete(index=name, ignore_unavailable=True)
        es.options(ignore_status=404).indices.delete_index_template(name=name)


def test_every_mapping_file_is_a_template(stack):
    assert {p.name for p in MAPPING_FILES} == set(TEMPLATES), "es_mappings/ and TEMPLATES disagree"
    assert set(template_bodies(stack)) == {stack.images_index, stack.models_index}


@pytest.mark.parametrize("path", MAPPING_FILES, ids=lambda p: p.name)
def test_mapping_is_accepted_as_written(es, path):
    mapping = load_mapping(path)
    applied = put_and_create(es, throwaway_name(path), mapping)
    assert applied["dynamic"] == mapping["mappings"]["dynamic"]
    assert set(applied["properties"]) == set(mapping["mappings"]["properties"])


def break_mapping(mapping: dict) -> dict:
    """A copy with one field of a type Elasticsearch does not have."""
    broken = json.loads(json.dumps(mapping))
    first_field = next(iter(broken["mappings"]["properties"]))
    broken["mappings"]["properties"][first_field] = {"type": "no_such_type"}
    return broken


@pytest.mark.parametrize("path", MAPPING_FILES, ids=lambda p: p.name)
def test_a_broken_copy_is_rejected(es, path):
    with pytest.raises(BadRequestError):
        put_and_create(es, throwaway_name(path), break_mapping(load_mapping(path)))
