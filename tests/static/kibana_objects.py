"""A validator of Kibana saved-objects NDJSON (images/kibana/saved_objects.ndjson), without Kibana.

It checks what the saved-objects import API requires of each object (id, type, attributes,
references, the JSON-encoded attributes of each type), that every reference resolves inside the
file, that no object claims a newer Kibana than the pinned one, and that every field a
visualization queries exists in the index mapping it reads (es_mappings/images.json).
"""

from __future__ import annotations

import json
from typing import Any

# Attributes each type needs, and which of them are JSON encoded as strings.
REQUIRED = {
    "index-pattern": {"title": False},
    "visualization": {"title": False, "visState": True, "uiStateJSON": True},
    "dashboard": {"title": False, "panelsJSON": True, "optionsJSON": True},
}
SEARCH_SOURCE = ("kibanaSavedObjectMeta", "searchSourceJSON")


def version_tuple(version: str) -> tuple[int, ...]:
    """'8.19.21' -> (8, 19, 21)."""
    return tuple(int(part) for part in version.split("."))


def mapping_fields(mapping: dict[str, Any]) -> set[str]:
    """Dotted paths of every field (and object) of an index template file's mappings."""
    fields: set[str] = set()

    def walk(properties: dict[str, Any], prefix: str) -> None:
        for name, spec in properties.items():
            path = prefix + name
            fields.add(path)
            walk(spec.get("properties", {}), path + ".")

    walk(mapping["mappings"]["properties"], "")
    return fields


def parse_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of an NDJSON text, and an error per line that is not a JSON object."""
    objects, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {number}: not a JSON object")
            continue
        objects.append(obj)
    return objects, errors


def decode(obj: dict[str, Any], name: str, errors: list[str]) -> Any:
    """The JSON-encoded attribute `name` of `obj`, decoded; None (and an error) if it is not."""
    raw = obj.get("attributes", {}).get(name)
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        errors.append(f"{obj.get('type')}/{obj.get('id')}: attributes.{name} is not a JSON string")
        return None


def check_object(obj: dict[str, Any], kibana_version: str, errors: list[str]) -> None:
    """Per-object checks: envelope, required attributes, migration versions, search source."""
    label = f"{obj.get('type')}/{obj.get('id')}"
    for key, kind in (("id", str), ("type", str), ("attributes", dict), ("references", list)):
        if not isinstance(obj.get(key), kind):
            errors.append(f"{label}: `{key}` missing or not a {kind.__name__}")
    if obj.get("type") not in REQUIRED:
        errors.append(f"{label}: unsupported type")
        return
    for name, encoded in REQUIRED[obj["type"]].items():
        if name not in obj.get("attributes", {}):
            errors.append(f"{label}: attributes.{name} is missing")
        elif encoded:
            decode(obj, name, errors)
    for key in ("coreMigrationVersion", "typeMigrationVersion"):
        if key in obj and version_tuple(obj[key]) > version_tuple(kibana_version):
            errors.append(f"{label}: {key} {obj[key]} is newer than Kibana {kibana_version}")
    meta = obj.get("attributes", {}).get(SEARCH_SOURCE[0], {})
    if obj["type"] != "index-pattern":
        try:
            json.loads(meta[SEARCH_SOURCE[1]])
        except (KeyError, TypeError, json.JSONDecodeError):
            errors.append(f"{label}: attributes.kibanaSavedObjectMeta.searchSourceJSON is not a JSON string")


def check_references(objects: list[dict[str, Any]], errors: list[str]) -> None:
    """Every reference names an object of the file; every panel and index ref has its reference."""
    present = {(o.get("type"), o.get("id")) for o in objects}
    for obj in objects:
        label = f"{obj.get('type')}/{obj.get('id')}"
        refs = {r.get("name"): r for r in obj.get("references") or []}
        for ref in refs.values():
            if (ref.get("type"), ref.get("id")) not in present:
                errors.append(
                    f"{label}: reference {ref.get('name')} -> {ref.get('type')}/{ref.get('id')} is not in the file"
                )
        source = json.loads(obj.get("attributes", {}).get(SEARCH_SOURCE[0], {}).get(SEARCH_SOURCE[1]) or "{}")
        if "indexRefName" in source and source["indexRefName"] not in refs:
            errors.append(f"{label}: no reference named {source['indexRefName']}")
        if obj.get("type") == "dashboard":
            for panel in decode(obj, "panelsJSON", []) or []:
                name = f"{panel.get('panelIndex')}:{panel.get('panelRefName')}"
                if name not in refs:
                    errors.append(f"{label}: panel {panel.get('panelIndex')} has no reference {name}")


def vega_fields(spec: dict[str, Any]) -> set[str]:
    """Fields an embedded Vega-Lite spec asks Elasticsearch for (aggregations and _source)."""
    found: set[str] = set()
    body = spec.get("data", {}).get("url", {}).get("body", {})
    walk_aggs(body.get("aggs", {}), found)
    found.update(f for f in body.get("_source", []) if isinstance(f, str))
    return found


def walk_aggs(aggs: dict[str, Any], found: set[str]) -> None:
    """Collect the `field` of every aggregation, nested ones included."""
    for agg in aggs.values():
        for kind, params in agg.items():
            if kind == "aggs":
                walk_aggs(params, found)
            elif isinstance(params, dict) and isinstance(params.get("field"), str):
                found.add(params["field"])


def check_visualizations(objects: list[dict[str, Any]], fields: set[str], errors: list[str]) -> None:
    """visState has title/type/params; Vega specs parse and query only mapped fields."""
    for obj in objects:
        if obj.get("type") != "visualization":
            continue
        label = f"visualization/{obj.get('id')}"
        state = decode(obj, "visState", []) or {}
        if not {"title", "type", "params"} <= set(state):
            errors.append(f"{label}: visState lacks title, type or params")
            continue
        if state["type"] != "vega":
            continue
        try:
            spec = json.loads(state["params"].get("spec", ""))
        except json.JSONDecodeError as exc:
            errors.append(f"{label}: the Vega spec is not JSON ({exc.msg})")
            continue
        for field in sorted(vega_fields(spec) - fields):
            errors.append(f"{label}: queries `{field}`, which es_mappings/images.json does not map")


def validate(text: str, mapping: dict[str, Any], kibana_version: str) -> list[str]:
    """Every problem of a saved-objects NDJSON text; [] means Kibana's import would accept it."""
    objects, errors = parse_lines(text)
    if not objects:
        return errors or ["no saved objects"]
    ids = [(o.get("type"), o.get("id")) for o in objects]
    errors += [f"duplicate object {t}/{i}" for t, i in sorted({x for x in ids if ids.count(x) > 1})]
    for obj in objects:
        check_object(obj, kibana_version, errors)
    if errors:
        return errors
    check_references(objects, errors)
    check_visualizations(objects, mapping_fields(mapping), errors)
    return errors
