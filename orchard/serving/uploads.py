"""The images of a POST /v1/predict request, read straight from its ASGI messages: every file part of
a multipart form (parsed by python-multipart as the body arrives), or the raw body as one image.

Why not the web framework's form parsing: it spools each file to a temporary file object and walks
several layers per request; on 2 cores at 32 clients that overhead was a share of the one Python
thread the model's batches also need (bench/serve.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks
MAX_FILES = 1000  # file parts per request (as the framework's form parser allows)


class BadRequest(ValueError):
    """A request this service cannot take: `status` and a one-line reason for the client."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """One posted image: its file name (or "body") and bytes."""

    name: str
    content: bytes


@dataclass
class FileParts:
    """python-multipart callbacks gathering each file part's name and bytes (other fields ignored)."""

    uploads: list[Upload] = field(default_factory=list)
    header: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    filename: str | None = None
    data: list[bytes] = field(default_factory=list)

    def callbacks(self) -> MultipartCallbacks:
        """The parser's callbacks, bound to this collector."""
        return {
            "on_part_begin": self.begin_part,
            "on_header_field": lambda data, start, end: self.header.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.value.extend(data[start:end]),
            "on_header_end": self.end_header,
            "on_part_data": lambda data, start, end: self.data.append(data[start:end]),
            "on_part_end": self.end_part,
        }

    def begin_part(self) -> None:
        """A new part: no file name yet, no bytes."""
        self.filename, self.data = None, []

    def end_header(self) -> None:
        """Note the part's file name from its Content-Disposition (a part without one is a field)."""
        if bytes(self.header).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(self.value))
            if b"filename" in options:
                self.filename = options[b"filename"].decode("utf-8", "replace")
        self.header.clear()
        self.value.clear()

    def end_part(self) -> None:
        """Keep a file part as an upload (named file<i> when it has an empty name)."""
        if self.filename is None:
            return
        if len(self.uploads) >= MAX_FILES:
            raise BadRequest(f"more than {MAX_FILES} files in one request")
        self.uploads.append(Upload(self.filename or f"file{len(self.uploads)}", b"".join(self.data)))


async def read_uploads(content_type: str, body_name: str, receive: Receive) -> list[Upload]:
    """The images of a request (see the module's docstring; a raw body is named `body_name`);
    BadRequest if there is none or the form is malformed."""
    if content_type.startswith("multipart/form-data"):
        uploads = await multipart_uploads(content_type, receive)
    else:
        body = b"".join([chunk async for chunk in body_chunks(receive)])
        uploads = [Upload(body_name, body)] if body else []
    if not uploads:
        raise BadRequest("no image in the request: post multipart files, or an image as the raw body")
    return uploads


async def multipart_uploads(content_type: str, receive: Receive) -> list[Upload]:
    """The file parts of a multipart body, parsed chunk by chunk as they arrive."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    parts = FileParts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in body_chunks(receive):
            parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, FormParserError) as exc:
        raise BadRequest(f"malformed multipart form: {exc}") from None
    return parts.uploads


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive (the size limit is the caller's receive's)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away before the body ended")
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return
