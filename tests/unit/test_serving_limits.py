"""BodyLimit (orchard/serving/limits.py) driven as bare ASGI, the API's access helpers
(is_loopback, bearer_token in orchard/serving/api.py), and where a request's images are decoded
(prepared_uploads: on the event loop only for small pictures)."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from orchard.serving.api import INLINE_DECODE_PIXELS, bearer_token, is_loopback, prepared_uploads
from orchard.serving.limits import BodyLimit, BodyTooLarge, declared_length
from orchard.serving.predictor import SMALL_PICTURE_BYTES, RejectedImage, ServingModel, small_picture
from orchard.serving.uploads import Upload
from orchard.spark_app.images import decode_image

LIMIT = 100


class EchoApp:
    """An ASGI app that reads the whole body and answers 200 with it."""

    def __init__(self) -> None:
        self.called = False
        self.chunks: list[bytes] = []
        self.receive = None

    async def __call__(self, scope, receive, send) -> None:
        self.called, self.receive = True, receive
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            self.chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"".join(self.chunks)})


def scope_with(length: int | str | None = None) -> dict:
    headers = [(b"content-type", b"application/octet-stream")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}


def drive(scope: dict, chunks: list[bytes]) -> tuple[EchoApp, list[dict], int]:
    """Run BodyLimit(EchoApp) once: (the app, messages sent, receive calls made)."""
    app, sent, reads = EchoApp(), [], [0]
    queue = list(chunks)

    async def receive():
        reads[0] += 1
        body = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    async def send(message):
        sent.append(message)

    asyncio.run(BodyLimit(app, max_bytes=LIMIT)(scope, receive, send))
    return app, sent, reads[0]


def test_a_declared_length_over_the_limit_is_refused_with_413_json_without_calling_the_app():
    app, sent, reads = drive(scope_with(LIMIT + 1), [b"x" * (LIMIT + 1)])

    assert not app.called
    assert reads == 0  # not a byte of the body was read
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json"
    body = sent[1]["body"]
    assert int(headers[b"content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert f"{LIMIT + 1} bytes" in error and str(LIMIT) in error


def test_a_body_exactly_at_the_limit_passes():
    app, sent, _ = drive(scope_with(LIMIT), [b"a" * 60, b"b" * 40])

    assert app.called
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"a" * 60 + b"b" * 40


def test_a_chunked_body_over_the_limit_raises_body_too_large_from_receive():
    with pytest.raises(BodyTooLarge, match=f"over the request limit of {LIMIT} bytes"):
        drive(scope_with(None), [b"a" * 60, b"b" * 60, b"c" * 10])


def test_a_body_longer_than_its_declared_length_is_still_stopped():
    with pytest.raises(BodyTooLarge):
        drive(scope_with(50), [b"a" * 60, b"b" * 60])


def test_a_malformed_content_length_counts_as_none_and_the_body_is_still_counted():
    assert declared_length(scope_with("12abc")) is None
    assert declared_length(scope_with(None)) is None
    assert declared_length(scope_with(42)) == 42
    with pytest.raises(BodyTooLarge):
        drive(scope_with("lots"), [b"a" * (LIMIT + 1)])


def test_a_body_under_the_limit_passes_through_unchanged():
    chunks = [b"one-", b"two-", b"three"]
    app, sent, reads = drive(scope_with(None), chunks)

    assert app.called
    assert app.chunks == chunks
    assert reads == 3
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"one-two-three"


def test_non_http_scopes_pass_through_untouched():
    app = EchoApp()

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        raise AssertionError("nothing should be sent")

    asyncio.run(BodyLimit(app, max_bytes=0)({"type": "lifespan"}, receive, send))

    assert app.called and app.receive is receive


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer s3cret", "s3cret"),
        ("BEARER  s3cret ", "s3cret"),
        ("Basic dXNlcjpwYXNz", ""),
        ("Token s3cret", ""),
        ("Bearer", ""),
        ("Bearer ", ""),
        ("", ""),
        ("s3cret", ""),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def encoded(width: int, height: int, fmt: str = "JPEG", noise: bool = False) -> bytes:
    """A width x height picture encoded as `fmt` (random pixels compress badly: a large body)."""
    rng = np.random.default_rng(7)
    pixels = (
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else np.zeros((height, width, 3), np.uint8)
    )
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def size_of(content: bytes) -> tuple[int, int] | None:
    """The size of small_picture's opened picture, None if it opened none."""
    opened = small_picture(content)
    return opened.picture.size if opened else None


def test_small_picture_reads_the_header_of_small_pillow_bodies_only():
    assert size_of(encoded(100, 80)) == (100, 80)
    assert size_of(encoded(4000, 3000)) == (4000, 3000)  # a small file can declare many pixels
    big = encoded(600, 600, "PNG", noise=True)
    assert len(big) > SMALL_PICTURE_BYTES and size_of(big) is None
    assert size_of(b"not an image") is None
    array = io.BytesIO()
    np.save(array, np.zeros((10, 10, 3), np.uint8))
    assert size_of(array.getvalue()) is None  # opening an array format reads it: never on the event loop


def test_a_picture_opened_once_gives_the_input_of_its_bytes():
    """input_of from small_picture's raster equals input_of from the bytes alone (decode_image's)."""
    content = encoded(120, 90, noise=True)
    model = ServingModel("v", {"input_size": [100, 100], "channels": 3}, None, lambda a: a.astype(np.float32) / 255)
    from_bytes = model.input_of(content, 10**8)
    assert from_bytes.shape == (100, 100, 3)
    np.testing.assert_array_equal(model.input_of(content, 10**8, small_picture(content)), from_bytes)
    np.testing.assert_array_equal(from_bytes, decode_image(content, (100, 100)).astype(np.float32) / 255)
    with pytest.raises(RejectedImage, match="ORCHARD_SERVE_MAX_PIXELS") as refused:
        model.input_of(content, 100 * 90, small_picture(content))
    assert refused.value.status == 413


class ThreadNoting:
    """A serving model stand-in that notes the thread each input is prepared in."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def input_of(self, content: bytes, max_pixels: int, opened=None) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return np.zeros(1)


@pytest.mark.parametrize(
    ("sizes", "inline"),
    [([(100, 100)], True), ([(100, 100)] * 26, True), ([(100, 100)] * 27, False), ([(2000, 1500)], False)],
)
def test_requests_of_small_pictures_are_decoded_on_the_event_loop_and_others_in_a_worker(sizes, inline):
    assert 26 * 100 * 100 <= INLINE_DECODE_PIXELS < 27 * 100 * 100
    model = ThreadNoting()
    uploads = [Upload(f"{i}.jpg", encoded(w, h)) for i, (w, h) in enumerate(sizes)]

    async def prepare() -> tuple[list[dict], str]:
        return await prepared_uploads(model, uploads, 10**8), threading.current_thread().name  # type: ignore[arg-type]

    prepared, loop_thread = asyncio.run(prepare())
    assert [p["file"] for p in prepared] == [u.name for u in uploads] and all("input" in p for p in prepared)
    assert (loop_thread in model.threads) is inline
    assert len(set(model.threads)) == 1  # one call prepares the whole request
