"""`orchard serve` on the real native stack: the `serve` service `orchard stack up` started, with a
CNN version trained, featurized and promoted here (the fixtures are serving_fixtures.py's).

Data: 4 classes x 20 train + 5 test synthetic 100x100 JPEGs (a random synth seed per run). What is
checked: a promotion is picked up by the running service without a restart; predictions for posted
photos equal `orchard predict`'s for the same files (same decoding and preprocessing); a photo of
the lake finds itself first among its neighbours, and neighbours searched in the service's memory
equal Elasticsearch's kNN search; neighbours' URLs give their exact bytes;
concurrent requests share model calls; limits and errors are 4xx JSON naming the problem; bound
beyond loopback, predictions require the API key; new uploads are predicted by the service from
MinIO's notifications (an undecodable one gets an error), uploads made while the service is
down are predicted once it is back, and events it acknowledged are not lost when it is killed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest
from lake_datasets import Dataset, clean_up, count, docs_of, synth
from orchard_cli import ORCHARD, ok, orchard
from serving_fixtures import CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS, posted, service_pid, wait_for_model

from orchard.core.clients import es_client, s3_client
from orchard.core.settings import Settings
from orchard.serving.catalog import Catalog
from orchard.serving.enrichment import ALREADY_PREDICTED
from orchard.stack.process import wait_until

pytestmark = pytest.mark.integration

CONCURRENT = 32


def test_stack_status_lists_the_service_healthy(api):
    rows = {row["service"]: row for row in json.loads(ok(orchard("stack", "status", "--json")).stdout)}
    assert rows["serve"]["health"] == "healthy" and rows["serve"]["pid"]
    assert api.get("/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/images", "/healthz"}
    # numpy's BLAS held to ORCHARD_SERVE_BLAS_THREADS (1) while the service runs (its threads spin)
    assert api.get("/healthz").json()["blas_threads"] == 1


def test_predictions_equal_local_predict_and_find_the_lake_copy_first(api, served):
    _, version, photos = served
    chosen = photos[::TEST_PER_CLASS][:CLASSES]  # one per class
    response = posted(api, chosen, k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == version and len(body["predictions"]) == len(chosen)
    timing = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
    assert list(timing) == ["read", "decode", "model", "similar"] and all(float(v) >= 0 for v in timing.values())
    predicted = ok(orchard("predict", "--model", version, "--json", *map(str, chosen)))
    local = [json.loads(line) for line in predicted.stdout.splitlines()]
    for photo, prediction, expected in zip(chosen, body["predictions"], local, strict=True):
        assert prediction["file"] == photo.name
        assert prediction["id"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        confidences = [entry["confidence"] for entry in prediction["top5"]]
        assert len(confidences) == min(5, CLASSES) and confidences == sorted(confidences, reverse=True)
        assert prediction["top5"][0]["label"] == expected["top5"][0]["label"]
        assert abs(confidences[0] - expected["top5"][0]["probability"]) < 1e-4
        # the photo is in the lake, featurized by the same model: its own copy is its nearest image
        assert len(prediction["similar"]) == 3 and prediction["similar"][0]["id"] == prediction["id"]


def test_neighbour_urls_give_the_exact_bytes(api, served):
    _, _, photos = served
    neighbour = posted(api, photos[:1], k=2).json()["predictions"][0]["similar"][1]
    content = api.get(neighbour["url"])
    assert content.status_code == 200 and content.headers["content-type"] == "image/jpeg"
    assert hashlib.sha256(content.content).hexdigest() == neighbour["id"]


def test_raw_body_and_bad_files_among_good_ones(api, served):
    _, _, photos = served
    raw = api.post("/v1/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["file"] == "body"
    mixed = api.post(
        "/v1/predict",
        files=[
            ("files", ("notes.txt", b"not an image", "text/plain")),
            ("files", (photos[1].name, photos[1].read_bytes())),
        ],
    )
    assert mixed.status_code == 200  # one usable image: answered, the other one says why not
    bad, good = mixed.json()["predictions"]
    assert bad["file"] == "notes.txt" and bad["error"].startswith("undecodable image") and "top5" not in bad
    assert good["top5"] and "error" not in good


def test_concurrent_requests_share_model_calls(api, served):
    _, _, photos = served
    start = threading.Barrier(CONCURRENT)

    def one(i: int) -> dict:
        start.wait()
        response = posted(api, [photos[i % len(photos)]], k=2)  # neighbour searches batched too
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]

    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(one, range(CONCURRENT)))
    assert all(r["top5"] and len(r["similar"]) == 2 for r in results)
    assert max(r["batched_with"] for r in results) > 1  # requests joined another's model call
    assert api.get("/healthz").json()["largest_batch"] > 1


def test_neighbours_searched_in_memory_equal_elasticsearch_knn(api, served, stack: Settings):
    ds, version, photos = served
    catalog = Catalog(stack)
    embedded = catalog.embedding_count(version)
    assert embedded == count(ds) == CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    held = held_neighbours(api, photos[0], version)
    assert held == {
        "searched_in": "memory",
        "model": version,
        "vectors": embedded,
        "max_vectors": stack.serve_local_knn_max,
    }
    chosen = photos[1::TEST_PER_CLASS][:CLASSES]
    body = posted(api, chosen, k=6).json()
    for prediction in body["predictions"]:
        own = es_client(stack).get(index=stack.images_index, id=prediction["id"])["_source"]["embedding"]
        [expected] = catalog.nearest_many(version, [(own, 6)])  # Elasticsearch's kNN search
        assert [row["id"] for row in prediction["similar"]] == [row["id"] for row in expected]
        for got, want in zip(prediction["similar"], expected, strict=True):
            assert abs(got["score"] - want["score"]) < 1e-4 and got["label"] == want["label"]


def held_neighbours(api: httpx.Client, photo: Path, version: str, seconds: float = 60) -> dict:
    """/healthz's `neighbours` once the service holds `version`'s embeddings (a search starts the
    load; AssertionError after `seconds`)."""
    deadline, held = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        assert posted(api, [photo], k=1).status_code == 200
        held = api.get("/healthz").json()["neighbours"]
        if held.get("model") == version:
            return held
        time.sleep(0.5)
    raise AssertionError(f"the service did not hold the embeddings of {version} in {seconds:.0f}s: {held}")


def test_images_listing_document_and_similar(api, served):
    ds, _, _ = served
    listing = api.get("/v1/images", params={"dataset": ds.name, "split": "test", "size": 7, "page": 2}).json()
    assert listing["total"] == CLASSES * TEST_PER_CLASS and len(listing["images"]) == 7
    assert {row["dataset"] for row in listing["images"]} == {ds.name}
    first = listing["images"][0]
    doc = api.get(f"/v1/images/{first['id']}").json()
    assert doc["key"] == first["key"] and "embedding" not in doc
    assert hashlib.sha256(api.get(doc["content_url"]).content).hexdigest() == first["id"]
    similar = api.get(f"/v1/images/{first['id']}/similar", params={"k": 3}).json()["similar"]
    assert len(similar) == 3 and first["id"] not in {row["id"] for row in similar}


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost none (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_errors_are_json_naming_the_problem(api, stack: Settings):
    missing = api.get("/v1/images/" + "0" * 64)
    assert missing.status_code == 404 and "no image with id" in missing.json()["error"]
    for width, height in ((8_000, 6_000), (30_000, 30_000)):  # over our limit; over Pillow's too
        bomb = api.post("/v1/predict", files=[("files", ("bomb.png", png_header(width, height)))])
        assert bomb.status_code == 413 and "ORCHARD_SERVE_MAX_PIXELS" in bomb.json()["error"]
        assert "bomb.png" in bomb.json()["error"]
    big = api.post("/v1/predict", content=b"\0" * int((stack.serve_max_request_mb + 1) * 2**20))
    assert big.status_code == 413 and "ORCHARD_SERVE_MAX_REQUEST_MB" in big.json()["error"]
    empty = api.post("/v1/predict", content=b"")
    assert empty.status_code == 400 and "no image" in empty.json()["error"]
    invalid = api.post("/v1/predict", params={"top": 0}, content=b"x")
    assert invalid.status_code == 422 and "top" in invalid.json()["error"]
    wrong_key = api.post("/v1/predict", content=b"x", headers={"X-API-Key": "wrong"})
    assert wrong_key.status_code == 401 and "API key" in wrong_key.json()["error"]
    wrong_method = api.get("/v1/predict")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]
    unknown = orchard("models", "promote", "cnn-00000000000000-00000000")
    assert unknown.returncode == 3 and "not found" in unknown.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_beyond_loopback_predictions_require_the_api_key(stack: Settings, served, api, tmp_path):
    _, version, photos = served
    port = free_port()
    server = subprocess.Popen(
        [str(ORCHARD), "-q", "serve", "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | {"ORCHARD_SERVE_INBOX": str(tmp_path / "inbox.sqlite3")},  # not the stack service's
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_until_up(client, server)
            wait_for_model(client, version)
            anonymous = posted(client, photos[:1])
            assert anonymous.status_code == 401 and "X-API-Key" in anonymous.json()["error"]
            key = stack.secret("serve_api_key")
            keyed = client.post(
                "/v1/predict",
                files=[("files", (photos[0].name, photos[0].read_bytes()))],
                headers={"X-API-Key": key},
            )
            assert keyed.status_code == 200 and keyed.json()["predictions"][0]["top5"]
            assert client.get("/v1/images", params={"size": 1}).status_code == 200  # reads stay open
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_up(client: httpx.Client, server: subprocess.Popen, seconds: float = 60) -> None:
    """Poll /healthz until the server answers (AssertionError with its stderr if it exits)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"orchard serve exited {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("orchard serve did not answer within 60 s")


# --- auto-enrichment: MinIO notifications -> the service -> documents -----------------------------


def new_dataset(stack: Settings, tmp_path: Path, tag: str) -> tuple[Dataset, Path]:
    """A small synthetic tree of images no other dataset has (fresh seed), not uploaded yet."""
    token = os.urandom(3).hex()
    root = synth(tmp_path / "fruits", 2, 3, 1, int(token, 16) + 7)
    return Dataset(f"it-serve-{tag}-{token}", stack, corrupt_key=""), root


def put_broken_image(ds: Dataset) -> str:
    """An object that is not an image under a .jpg key, with the document the uploader would write
    (written first: the event then finds it); returns its id."""
    s = ds.settings
    data = b"\xff\xd8\xff\xe0 not really a JPEG " + os.urandom(32)
    image_id, key = hashlib.sha256(data).hexdigest(), f"{ds.name}/test/lime/broken.jpg"
    document = uploader_document(ds, image_id, key)
    es_client(s).index(index=s.images_index, id=image_id, document=document, op_type="create", refresh="wait_for")
    s3_client(s).put_object(s.images_bucket, key, io.BytesIO(data), len(data), content_type="image/jpeg")
    return image_id


def uploader_document(ds: Dataset, image_id: str, key: str) -> dict:
    """The least of the document `orchard upload` writes for an object at `key` (split and label
    from the key) with content id `image_id`."""
    _, split, label, _ = key.split("/")
    return {"id": image_id, "dataset": ds.name, "split": split, "label": label, "key": key, "sha256": image_id}


def wait_for_predictions(ds: Dataset, version: str, expected: int, seconds: float) -> float:
    """Seconds until `expected` documents of the dataset carry a prediction by `version`
    (AssertionError with the count reached after `seconds`)."""
    began, done = time.monotonic(), 0
    while time.monotonic() - began < seconds:
        es_client(ds.settings).indices.refresh(index=ds.settings.images_index)
        done = count(ds, {"term": {"prediction.model_version": version}})
        if done >= expected:
            return time.monotonic() - began
        time.sleep(0.5)
    raise AssertionError(f"{done} of {expected} documents of {ds.name} predicted by {version} after {seconds:.0f}s")


def test_new_uploads_are_predicted_by_the_serving_model_within_seconds(stack: Settings, served, api, tmp_path):
    _, version, _ = served
    ds, root = new_dataset(stack, tmp_path, "new")
    try:
        ok(orchard("upload", str(root), "--dataset", ds.name))
        broken = put_broken_image(ds)
        seconds = wait_for_predictions(ds, version, expected=2 * (3 + 1) + 1, seconds=120)
        print(f"{2 * 4 + 1} new images predicted by the service {seconds:.1f} s after the upload ended")
        error = es_client(stack).get(index=stack.images_index, id=broken)["_source"]["prediction"]
        assert error["label"] is None and error["error"].startswith("undecodable image")
        first = docs_of(ds, split="train")[0]
        predicted = first["_source"]["prediction"]
        assert predicted["label"] and predicted["top5"] and predicted["model_family"] == "cnn"
        assert_a_second_delivery_changes_nothing(stack, api, first)
    finally:
        clean_up(ds)


def assert_a_second_delivery_changes_nothing(stack: Settings, api: httpx.Client, hit: dict) -> None:
    """The same event sent again (MinIO may deliver twice) leaves the predicted document as it is."""
    key = hit["_source"]["key"]
    event = {
        "Records": [
            {
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": stack.images_bucket}, "object": {"key": quote_plus(key, safe="/")}},
            }
        ]
    }
    skipped_before = enrichment(api)["skipped"].get(ALREADY_PREDICTED, 0)
    answer = api.post("/v1/events", json=event, headers={"X-API-Key": stack.secret("serve_api_key")})
    assert answer.status_code == 200 and answer.json() == {"queued": 1, "skipped": {}}, answer.text
    handled = wait_until(lambda: enrichment(api)["skipped"].get(ALREADY_PREDICTED, 0) > skipped_before, 60, 0.2)
    assert handled, "the second delivery was not handled within 60 s"
    again = es_client(stack).get(index=stack.images_index, id=hit["_id"])
    assert (again["_seq_no"], again["_source"]["prediction"]) == (hit["_seq_no"], hit["_source"]["prediction"])


def test_uploads_made_while_the_service_is_down_are_predicted_when_it_is_back(stack: Settings, served, api, tmp_path):
    _, version, _ = served
    ds, root = new_dataset(stack, tmp_path, "down")
    pid = service_pid(stack)
    try:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        ok(orchard("upload", str(root), "--dataset", ds.name))
        time.sleep(3)
        assert count(ds, {"exists": {"field": "prediction.model_version"}}) == 0  # nobody to predict them
        ok(orchard("stack", "up"))  # restarts the service; MinIO sends what it kept
        wait_for_model(api, version)
        seconds = wait_for_predictions(ds, version, expected=2 * (3 + 1), seconds=180)
        print(f"{2 * 4} images uploaded while the service was down predicted {seconds:.1f} s after it was back")
    finally:
        clean_up(ds)


def test_events_acknowledged_and_not_yet_handled_survive_a_killed_service(stack: Settings, served, api, tmp_path):
    """An image stored before its document: the service acknowledges MinIO's event and keeps it in
    its inbox (no document to write yet); killed then, and the document indexed while it is down,
    the restarted service still predicts it (MinIO will not send that event again)."""
    _, version, _ = served
    ds, root = new_dataset(stack, tmp_path, "inbox")
    photo = sorted(root.rglob("*.jpg"))[0]
    data = photo.read_bytes()
    image_id, key = hashlib.sha256(data).hexdigest(), f"{ds.name}/train/lime/{photo.name}"
    try:
        retried_before = sum(enrichment(api)["retried"].values())
        s3_client(stack).put_object(stack.images_bucket, key, io.BytesIO(data), len(data), content_type="image/jpeg")
        kept = wait_until(lambda: sum(enrichment(api)["retried"].values()) > retried_before, 60, 0.2)
        assert kept, "the event was not kept for later within 60 s"
        assert enrichment(api)["waiting"]["events"] >= 1
        pid = service_pid(stack)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        document = uploader_document(ds, image_id, key)
        es_client(stack).index(index=stack.images_index, id=image_id, document=document, refresh="wait_for")
        ok(orchard("stack", "up"))  # restarts the service: its inbox still holds the event
        wait_for_model(api, version)
        seconds = wait_for_predictions(ds, version, expected=1, seconds=120)
        print(f"an event held across a SIGKILL predicted {seconds:.1f} s after the service was back")
        prediction = es_client(stack).get(index=stack.images_index, id=image_id)["_source"]["prediction"]
        assert prediction["label"] and prediction["model_version"] == version
    finally:
        clean_up(ds)


def enrichment(api: httpx.Client) -> dict:
    """The service's enrichment counters (/healthz)."""
    return api.get("/healthz").json()["enrichment"]


def wait_gone(pid: int, seconds: float = 30) -> None:
    """Wait until the process `pid` has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} still runs {seconds:.0f}s after SIGTERM")
