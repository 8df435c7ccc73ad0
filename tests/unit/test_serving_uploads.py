"""The images of a POST /v1/predict request (orchard/serving/uploads.py), read from bare ASGI messages
built by httpx's own multipart encoder, and the route's query parameters (bounded_int)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.datastructures import QueryParams

from orchard.serving.api import bounded_int
from orchard.serving.uploads import MAX_FILES, BadRequest, Upload, read_uploads


def receive_of(body: bytes, chunk: int) -> tuple:
    """An ASGI receive handing out `body` in chunks of `chunk` bytes, and the list of messages sent."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    handed: list[dict] = []

    async def receive() -> dict:
        message = {"type": "http.request", "body": pieces[len(handed)], "more_body": len(handed) + 1 < len(pieces)}
        handed.append(message)
        return message

    return receive, handed


def read(request: httpx.Request, chunk: int = 7, name: str = "body") -> list[Upload]:
    """read_uploads of an httpx request's encoded body, fed `chunk` bytes at a time."""
    receive, _ = receive_of(request.read(), chunk)
    return asyncio.run(read_uploads(request.headers.get("content-type", ""), name, receive))


def test_every_file_part_is_an_upload_in_order_and_fields_are_ignored_whatever_the_chunking():
    files = [("files", ("a b é.jpg", b"\xff\xd8first" * 50)), ("files", ("second.png", b"\x89PNG" + bytes(range(256))))]
    request = httpx.Request("POST", "http://x/v1/predict", files=files, data={"note": "not an image"})
    for chunk in (1, 7, 4096):  # boundaries and headers split across chunks too
        uploads = read(request, chunk)
        assert uploads == [Upload("a b é.jpg", files[0][1][1]), Upload("second.png", files[1][1][1])]


def test_a_file_part_with_an_empty_name_is_named_by_its_position():
    part = b'--b\r\nContent-Disposition: form-data; name="f"; filename="%s"\r\n\r\n%s\r\n'
    body = part % (b"one.jpg", b"1") + part % (b"", b"2") + b"--b--\r\n"  # httpx leaves an empty name out
    receive, _ = receive_of(body, 5)
    uploads = asyncio.run(read_uploads("multipart/form-data; boundary=b", "body", receive))
    assert uploads == [Upload("one.jpg", b"1"), Upload("file1", b"2")]


def test_a_raw_body_is_one_upload_named_by_the_caller():
    request = httpx.Request(
        "POST", "http://x", content=b"\xff\xd8" + b"x" * 100, headers={"content-type": "image/jpeg"}
    )
    assert read(request, name="photo.jpg") == [Upload("photo.jpg", request.read())]


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("image/jpeg", b"", "no image in the request"),
        ("multipart/form-data", b"--x\r\n", "without a boundary"),
        ("multipart/form-data; boundary=x", b"--x\r\ncontent-disposition form-data\r\n\r\n", "malformed multipart"),
    ],
)
def test_a_request_without_a_usable_image_is_a_400_naming_why(content_type, body, reason):
    receive, _ = receive_of(body, 100)
    with pytest.raises(BadRequest, match=reason) as raised:
        asyncio.run(read_uploads(content_type, "body", receive))
    assert raised.value.status == 400


def test_a_form_of_only_fields_has_no_image():
    request = httpx.Request("POST", "http://x", files=[("f", ("x.jpg", b"1"))], data={"a": "b"})
    only_field = (
        request.read().split(b"\r\n--")[0]
        + b"\r\n--"
        + request.headers["content-type"].split("=")[1].encode()
        + b"--\r\n"
    )
    receive, _ = receive_of(only_field, 100)
    with pytest.raises(BadRequest, match="no image"):
        asyncio.run(read_uploads(request.headers["content-type"], "body", receive))


def test_more_files_than_the_limit_are_refused():
    request = httpx.Request("POST", "http://x", files=[("f", (f"{i}.jpg", b"1")) for i in range(MAX_FILES + 1)])
    with pytest.raises(BadRequest, match=f"more than {MAX_FILES} files"):
        read(request, chunk=65536)


def test_a_client_gone_before_the_body_ended_is_a_bad_request_not_a_hang():
    messages = [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0)

    with pytest.raises(BadRequest, match="went away"):
        asyncio.run(read_uploads("image/jpeg", "body", receive))


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", 5), ("top=1", 1), ("top=100", 100), ("k=0", 5)],
)
def test_bounded_int_takes_the_default_or_an_integer_in_range(query, expected):
    assert bounded_int(QueryParams(query), "top", 5, 1, 100) == expected


@pytest.mark.parametrize(("query", "reason"), [("top=0", "not between 1 and 100"), ("top=x", "not an integer")])
def test_bounded_int_refuses_with_422_naming_the_parameter(query, reason):
    with pytest.raises(BadRequest, match=f"query.top: .*{reason}") as raised:
        bounded_int(QueryParams(query), "top", 5, 1, 100)
    assert raised.value.status == 422
