"""A request body size limit for the service, enforced before the body is read (Content-Length)
and while it is read (chunked bodies declare no length)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(ValueError):
    """A request body over the limit (HTTP 413)."""


class BodyLimit:
    """ASGI middleware: HTTP 413 for a body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await refuse(send, self.message(declared))
            return
        await self.app(scope, self.counting(receive), send)

    def message(self, size: int | None = None) -> str:
        """Why a body is refused."""
        got = f"{size} bytes" if size is not None else "the body"
        return f"{got} is over the request limit of {self.max_bytes} bytes (ORCHARD_SERVE_MAX_REQUEST_MB)"

    def counting(self, receive: Receive) -> Receive:
        """`receive` that raises BodyTooLarge once the chunks read exceed the limit."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.message())
            return message

        return wrapped


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None if it declares none (or a malformed one)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def refuse(send: Send, reason: str) -> None:
    """Answer 413 with a JSON error, without reading the body."""
    await send_json(send, 413, {"error": reason})


async def send_json(send: Send, status: int, content: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a whole JSON response (UTF-8, as the framework's JSONResponse) through ASGI `send`."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
