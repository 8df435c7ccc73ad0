"""images/kibana/saved_objects.ndjson: what Kibana's saved-objects import requires, checked offline."""

from __future__ import annotations

import json

import pytest

from kibana_objects import validate, vega_fields
from orchard.core.toolchain import REPO_ROOT

SAVED_OBJECTS = REPO_ROOT / "images" / "kibana" / "saved_objects.ndjson"
IMAGES_MAPPING = json.loads((REPO_ROOT / "es_mappings" / "images.json").read_text())
DASHBOARD_FIELDS = {"label", "prediction.label", "prediction.confidence", "pca.x", "pca.y"}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return [json.loads(line) for line in SAVED_OBJECTS.read_text().splitlines() if line.strip()]


def test_saved_objects_are_valid(versions):
    assert validate(SAVED_OBJECTS.read_text(), IMAGES_MAPPING, versions["ES_VERSION"]) == []


def test_data_view_is_the_images_index(objects):
    views = [o for o in objects if o["type"] == "index-pattern"]
    assert [v["attributes"]["title"] for v in views] == ["orchard-images"]


def test_dashboard_shows_the_four_required_panels(objects):
    by_id = {o["id"]: o for o in objects}
    [dashboard] = [o for o in objects if o["type"] == "dashboard"]
    panels = json.loads(dashboard["attributes"]["panelsJSON"])
    assert len(panels) == 4
    shown = {by_id[r["id"]]["attributes"]["title"] for r in dashboard["references"]}
    assert shown == {"Images per label", "Prediction confidence", "Label vs predicted label", "PCA 2-D"}
    queried = set()
    for ref in dashboard["references"]:
        spec = json.loads(json.loads(by_id[ref["id"]]["attributes"]["visState"])["params"]["spec"])
        queried |= vega_fields(spec)
    assert queried >= DASHBOARD_FIELDS


def mutate(objects: list[dict], change) -> str:
    """The NDJSON of a deep copy of `objects` after `change(copy)`."""
    copy = json.loads(json.dumps(objects))
    change(copy)
    return "\n".join(json.dumps(o) for o in copy) + "\n"


def first(objects, kind):
    return next(o for o in objects if o["type"] == kind)


def drop_vis_state(objs):
    del first(objs, "visualization")["attributes"]["visState"]


def dangling_panel(objs):
    first(objs, "dashboard")["references"][0]["id"] = "no-such-visualization"


def unmapped_field(objs):
    vis = first(objs, "visualization")
    vis["attributes"]["visState"] = vis["attributes"]["visState"].replace("label", "lable")


def future_version(objs):
    first(objs, "dashboard")["typeMigrationVersion"] = "99.0.0"


def panels_not_json(objs):
    first(objs, "dashboard")["attributes"]["panelsJSON"] = "[{"


def missing_references(objs):
    del first(objs, "index-pattern")["references"]


BREAKAGES = [drop_vis_state, dangling_panel, unmapped_field, future_version, panels_not_json, missing_references]


@pytest.mark.parametrize("change", BREAKAGES, ids=lambda f: f.__name__)
def test_a_broken_copy_is_rejected(objects, versions, change):
    assert validate(mutate(objects, change), IMAGES_MAPPING, versions["ES_VERSION"]) != []


def test_a_truncated_file_is_rejected(versions):
    text = SAVED_OBJECTS.read_text()
    assert validate(text[: len(text) // 2], IMAGES_MAPPING, versions["ES_VERSION"]) != []
