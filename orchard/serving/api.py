"""The REST API of `orchard serve` (FastAPI): predictions for posted photos, micro-batched, and the
lake's images, neighbours and models for applications. OpenAPI docs at /docs and /openapi.json.

Errors are JSON, `{"error": "..."}` with a 4xx status naming the problem; an unexpected failure is a
500 saying only "internal error" (the trace goes to the service log, never to a client).

The web page at / (orchard/serving/static: plain HTML/JS/CSS, nothing fetched from elsewhere) uses
these same routes: predictions for a dropped photo, browsing the lake, one image's details.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send
from threadpoolctl import threadpool_info, threadpool_limits

from orchard.core.settings import Settings
from orchard.serving.batcher import MicroBatcher
from orchard.serving.catalog import MAX_WINDOW, Catalog, ImageNotFound, Page
from orchard.serving.enrichment import Enricher
from orchard.serving.events import Inbox, object_events
from orchard.serving.limits import BodyLimit, BodyTooLarge, send_json
from orchard.serving.neighbours import Neighbours
from orchard.serving.prediction_log import PredictionLog
from orchard.serving.predictor import (
    ModelHolder,
    RejectedImage,
    Scored,
    ServingModel,
    Vector,
    content_id,
    small_picture,
)
from orchard.serving.uploads import BadRequest, Upload, read_uploads
from orchard.spark_app.images import Raster
from orchard.spark_app.registry import list_versions

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
INTERNAL_ERROR = "internal error (see the service log)"  # all a client learns of an unexpected failure
# Requests whose images total at most this many pixels are decoded on the event loop (~2 ms at most);
# larger ones in a worker thread.
INLINE_DECODE_PIXELS = 512 * 512
STATIC_DIR = Path(__file__).parent / "static"  # package data (pyproject.toml)
# The page loads its script, styles and images from this service only; previews of the photos being
# posted are blob: URLs.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass
class Service:
    """What the routes share: settings, the serving model, the batcher, the lake's catalog."""

    s: Settings
    holder: ModelHolder
    batcher: MicroBatcher[ServingModel, Scored]
    catalog: Catalog
    key_required: bool
    lake: PredictionLog  # the rows of the predictions enrichment writes, kept in the lake
    inbox: Inbox  # the object-created events waiting for their prediction (orchard.serving.events)
    enricher: Enricher = field(init=False)  # takes them in batches (orchard.serving.enrichment)
    nearby: Neighbours = field(init=False)  # in memory or Elasticsearch (orchard.serving.neighbours)
    # Neighbour searches of concurrent requests share one call (one matrix product or one
    # Elasticsearch multi-search): no waiting, the queries that arrive while one runs form the next.
    neighbours: MicroBatcher[str, list[dict]] = field(init=False)
    blas_threads: int = 0  # numpy's BLAS threads while the service runs (ORCHARD_SERVE_BLAS_THREADS)

    def __post_init__(self) -> None:
        self.enricher = Enricher(self.inbox, self.catalog, self.holder, self.batcher, self.lake)
        self.nearby = Neighbours(self.catalog, self.s.serve_local_knn_max, self.s.serve_reload_seconds)
        self.neighbours = MicroBatcher(self.nearby.nearest_many, self.s.serve_max_batch, 0, name="neighbour search")


def create_app(s: Settings, holder: ModelHolder | None = None, catalog: Catalog | None = None) -> ASGIApp:
    """The service's ASGI app: POST /v1/predict (predict_route), every other route by FastAPI (the
    model loads in the background once it starts)."""
    service = Service(
        s,
        holder or ModelHolder(s),
        MicroBatcher(lambda model, items: model.score(items), s.serve_max_batch, s.serve_max_wait_ms / 1000),
        catalog or Catalog(s),
        key_required=not is_loopback(s.serve_bind_host),
        lake=PredictionLog(s),
        inbox=Inbox(s.serve_inbox_path),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Why: after each matrix product (a batch's neighbour search) OpenBLAS's idle threads spin on
        # sched_yield; measured at 32 clients on 2 cores, that spin took ~37 % of the service's CPU.
        # Set and read here, before any other thread runs: threadpoolctl walks the loaded libraries
        # with a Python callback, which deadlocked against a thread importing TensorFlow.
        with threadpool_limits(limits=s.serve_blas_threads, user_api="blas"):
            service.blas_threads = blas_threads()
            service.batcher.start()
            service.neighbours.start()
            service.lake.start()
            service.enricher.start()
            watcher = asyncio.create_task(service.holder.watch(s.serve_reload_seconds), name="serving-alias")
            yield
            watcher.cancel()
            await service.enricher.stop()
            await service.batcher.stop()
            await service.neighbours.stop()
            await service.lake.stop()

    app = FastAPI(title="Orchard", summary="Predictions and search over the image lake", lifespan=lifespan)
    app.state.service = service
    max_bytes = int(s.serve_max_request_mb * 2**20)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    add_error_handlers(app)
    add_routes(app, service)
    add_page(app)
    document_predict(app)
    return with_predict_route(app, BodyLimit(predict_route(service), max_bytes))


def with_predict_route(app: ASGIApp, predict: ASGIApp) -> ASGIApp:
    """`app` with POST /v1/predict answered by `predict`.

    Why beside the framework rather than one of its routes: at 32 clients on 2 cores, the ~10 layers
    each request crosses there (middleware, routing, dependency solving, form spooling) took a share
    of the one Python thread the model's batches also need (bench/serve.py, README "Serving")."""

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH:
            await app(scope, receive, send)
        elif scope["method"] == "POST":
            await predict(scope, receive, send)
        else:
            await send_json(send, 405, {"error": f"{PREDICT_PATH} takes POST only"}, [(b"allow", b"POST")])

    return front


def add_page(app: FastAPI) -> None:
    """The web page at / and its assets under /static."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": PAGE_CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )


def blas_threads() -> int:
    """The most threads any BLAS library of this process may use now (not while another thread may
    load a library: see the lifespan)."""
    return max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=0)


def add_routes(app: FastAPI, service: Service) -> None:
    """The API's routes."""

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness and readiness: the model that serves (or why none), model calls made so far."""
        model = service.holder.current
        stats = service.batcher.stats
        return {
            "status": "ok",
            "ready": model is not None,
            "model": model.version if model else None,
            "problem": service.holder.problem,
            "model_calls": stats.calls,
            "images_predicted": stats.items,
            "largest_batch": stats.largest,
            "neighbours": service.nearby.describe(),
            "blas_threads": service.blas_threads,
            "enrichment": {
                **service.enricher.tally.as_dict(),
                "waiting": await asyncio.to_thread(service.inbox.waiting),
            },
        }

    @app.get("/v1/models")
    async def models() -> dict:
        """The registered versions, newest first, and the one that serves."""
        versions = await asyncio.to_thread(list_versions, service.s)
        model = service.holder.current
        return {"serving": model.version if model else None, "versions": versions}

    @app.post("/v1/events", include_in_schema=False)
    async def events(request: Request) -> JSONResponse:
        """MinIO's object-created notifications (webhook target, the API key as its token): the new
        images' events kept in the service's inbox and predicted in batches (orchard.serving.enrichment);
        503 if the inbox cannot keep them, and MinIO keeps them and sends them again."""
        require_key(request.headers, service, always=True)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not a JSON event notification") from None
        try:
            answer = await service.enricher.accept(object_events(body))
        except (OSError, sqlite3.Error) as exc:
            log.error("events not kept (MinIO sends them again): %s", exc)
            return JSONResponse({"error": f"the service cannot keep events now: {exc}"}, status_code=503)
        return JSONResponse(answer)

    @app.get("/v1/images")
    async def images(
        dataset: str | None = None,
        split: str | None = None,
        label: str | None = None,
        predicted: str | None = None,
        min_confidence: float | None = Query(None, ge=0, le=1),
        page: int = Query(1, ge=1),
        size: int = Query(50, ge=1, le=500),
    ) -> dict:
        """Images of the lake matching the filters, most confident prediction first, by pages."""
        if page * size > MAX_WINDOW:
            raise HTTPException(400, f"page {page} of {size} is past the first {MAX_WINDOW} images: narrow the filters")
        query = Page(dataset, split, label, predicted, min_confidence, page, size)
        return await asyncio.to_thread(service.catalog.images, query)

    @app.get("/v1/images/{image_id}")
    async def image(image_id: str, request: Request) -> dict:
        """One image's document (prediction, quality, PCA...) and the URL of its bytes."""
        doc = await asyncio.to_thread(service.catalog.image, image_id)
        return {**doc, "content_url": content_url(request, image_id)}

    @app.get("/v1/images/{image_id}/content")
    async def content(image_id: str) -> StreamingResponse:
        """The image's bytes as stored in the lake."""
        media_type, chunks = await asyncio.to_thread(service.catalog.content, image_id)
        return StreamingResponse(chunks, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/images/{image_id}/similar")
    async def similar(image_id: str, request: Request, k: int = Query(10, ge=1, le=100)) -> dict:
        """The k images nearest to one of the lake by embedding (`orchard features` must have run)."""
        rows = await asyncio.to_thread(service.catalog.similar_to_image, image_id, k)
        return {"id": image_id, "similar": [with_url(request, row) for row in rows]}


def predict_route(service: Service) -> ASGIApp:
    """POST /v1/predict as a plain ASGI app: top labels with confidence and the k most similar lake
    images of each posted image (multipart files, or one raw image body); errors as JSON like every
    route's (add_error_handlers). Documented in the OpenAPI schema by document_predict."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, body, headers = await answer_predict(service, scope, receive)
        except BadRequest as exc:
            status, body = exc.status, {"error": str(exc)}
        except HTTPException as exc:  # require_key's 401, no model's 503
            status, body = exc.status_code, {"error": str(exc.detail)}
        except BodyTooLarge as exc:
            status, body = 413, {"error": str(exc)}
        except Exception as exc:
            log.error("POST %s failed", PREDICT_PATH, exc_info=exc)
            status, body = 500, {"error": INTERNAL_ERROR}
        await send_json(send, status, body, headers)

    return endpoint


async def answer_predict(service: Service, scope: Scope, receive: Receive) -> tuple[int, dict, list]:
    """(status, body, extra headers) of a POST /v1/predict."""
    headers, query = Headers(scope=scope), QueryParams(scope["query_string"])
    top, k = bounded_int(query, "top", 5, 1, 100), bounded_int(query, "k", 5, 0, 100)
    require_key(headers, service)
    model = service.holder.current
    if model is None:
        raise HTTPException(503, service.holder.problem or "no model is loaded yet")
    timing = Timing()
    with timing.part("read"):
        uploads = await read_uploads(headers.get("content-type", ""), query.get("name", "body"), receive)
    results = await predict_uploads(service, model, uploads, top, k, timing)
    failed = [r for r in results if "error" in r]
    status = 200 if len(failed) < len(results) else max(r["status"] for r in failed)
    body: dict = {"model": model.version, "predictions": [strip_status(r) for r in results]}
    if status != 200:
        body["error"] = "; ".join(f"{r['file']}: {r['error']}" for r in failed)
    return status, body, [(b"server-timing", timing.header().encode())]


def bounded_int(query: QueryParams, name: str, default: int, low: int, high: int) -> int:
    """The integer query parameter `name` (`default` when absent); BadRequest 422 unless it is an
    integer from `low` to `high`."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query.{name}: {raw!r} is not an integer", 422) from None
    if not low <= value <= high:
        raise BadRequest(f"query.{name}: {value} is not between {low} and {high}", 422)
    return value


def document_predict(app: FastAPI) -> None:
    """Add POST /v1/predict (predict_route, outside FastAPI's routes) to the app's OpenAPI schema."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = generate()
            app.openapi_schema["paths"][PREDICT_PATH] = {"post": PREDICT_OPENAPI}
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema


def integer_parameter(name: str, default: int, low: int, high: int, description: str) -> dict:
    """An OpenAPI query parameter: an integer from `low` to `high`."""
    schema = {"type": "integer", "minimum": low, "maximum": high, "default": default}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PREDICT_PATH = "/v1/predict"
FILES_SCHEMA = {"type": "array", "items": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {
    "summary": "Predict",
    "description": "Top labels with confidence and the k most similar lake images of each posted image "
    "(multipart files, or one raw image body). 200 if any image was predicted; else the failures' status "
    "with `error` naming each file and its reason.",
    "parameters": [
        integer_parameter("top", 5, 1, 100, "labels per image"),
        integer_parameter("k", 5, 0, 100, "similar images of the lake per image (0: none)"),
        {
            "name": "name",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "default": "body"},
            "description": "the file name of a raw image body",
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"files": FILES_SCHEMA}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "`model`, and per image `file`, `id`, `top5`, `similar`, `batched_with`"},
        "4XX": {"description": '`{"error": "..."}` naming the problem'},
    },
}


async def predict_uploads(
    service: Service, model: ServingModel, uploads: list[Upload], top: int, k: int, timing: Timing
) -> list[dict]:
    """One result per upload, in order: top labels and neighbours, or its error and HTTP status."""
    limit = service.s.serve_max_pixels
    # Announced before decoding: a batch being gathered meanwhile waits for these inputs.
    with service.batcher.announce(len(uploads)) as ticket:
        with timing.part("decode"):
            prepared = await prepared_uploads(model, uploads, limit)
        good = [p for p in prepared if "input" in p]
        ticket.release(len(prepared) - len(good))  # the rejected ones are not coming
        with timing.part("model"):
            scored = await service.batcher.submit(model, [p.pop("input") for p in good], ticket) if good else []
    with timing.part("similar"):
        neighbours = await nearest_or_none(service, [s.embedding for s, _ in scored], model.version, k)
    for p, (s, batch), near in zip(good, scored, neighbours, strict=True):
        p["top5"] = [{"label": label, "confidence": round(prob, 6)} for label, prob in model.top(s, top)]
        p["batched_with"] = batch
        p["similar"] = near
    return prepared


@dataclass
class Timing:
    """Seconds spent in each part of a request, sent back as a `Server-Timing` header (shown by a
    browser's developer tools; bench/serve.py reports their medians)."""

    parts: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block under `name` (added up if it runs more than once)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - began

    def header(self) -> str:
        """`read;dur=0.4, decode;dur=1.2, ...` (milliseconds)."""
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in self.parts.items())


async def prepared_uploads(model: ServingModel, uploads: list[Upload], max_pixels: int) -> list[dict]:
    """prepare_upload of each upload: on the event loop when together they are a small picture,
    else in a worker thread, so that a large photo never holds the loop."""
    pictures = [small_picture(u.content) for u in uploads]  # each header read once, here

    def prepare() -> list[dict]:
        return [prepare_upload(model, u, max_pixels, p) for u, p in zip(uploads, pictures, strict=True)]

    # Why: a 100x100 JPEG decodes in 0.3 ms, but at 32 clients it waited 8-9 ms for a worker
    # thread (measured, bench/serve.py): paired, decoding such photos here served 1.12x the requests.
    if all(pictures) and sum(p.picture.width * p.picture.height for p in pictures if p) <= INLINE_DECODE_PIXELS:
        return prepare()
    return await asyncio.to_thread(prepare)


def prepare_upload(model: ServingModel, upload: Upload, max_pixels: int, opened: Raster | None = None) -> dict:
    """{"file", "id", "input"} for a usable upload, {"file", "id", "error", "status"} otherwise
    (`opened`: its picture as small_picture opened it)."""
    result: dict = {"file": upload.name, "id": content_id(upload.content)}
    try:
        result["input"] = model.input_of(upload.content, max_pixels, opened)
    except RejectedImage as exc:
        result.update(error=str(exc), status=exc.status)
    return result


async def nearest_or_none(service: Service, vectors: list[Vector], version: str, k: int) -> list[list[dict] | None]:
    """Per embedding by the serving model: the k nearest lake images (one search for a request's
    photos); None for each if the index cannot say (the predictions are still worth answering)."""
    if k == 0 or not vectors:
        return [[] for _ in vectors]
    try:
        found = await service.neighbours.submit(version, [(vector, k) for vector in vectors])
    except Exception as exc:  # Elasticsearch down or the index missing: answer without neighbours
        log.warning("nearest images by %s unavailable: %s", version, exc)
        return [None for _ in vectors]
    return [[{**row, "url": f"/v1/images/{row['id']}/content"} for row in rows] for rows, _ in found]


def strip_status(result: dict) -> dict:
    """A result as the client sees it (the HTTP status is the response's)."""
    return {key: value for key, value in result.items() if key != "status"}


def require_key(headers: Headers, service: Service, always: bool = False) -> None:
    """HTTP 401 unless the request's headers carry the API key (when one is required, or offered;
    `always` for writes)."""
    offered = headers.get(API_KEY_HEADER) or bearer_token(headers.get("authorization", ""))
    if not offered and not (service.key_required or always):
        return
    expected = service.s.serve_api_key.get_secret_value() if service.s.serve_api_key else ""
    if not offered or not expected or not hmac.compare_digest(offered.encode(), expected.encode()):
        raise HTTPException(401, f"a valid API key is required in the {API_KEY_HEADER} header")


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ('' if it is not one)."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def is_loopback(host: str) -> bool:
    """True if a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def content_url(request: Request, image_id: str) -> str:
    """The absolute URL of an image's bytes on this service."""
    return str(request.url_for("content", image_id=image_id))


def with_url(request: Request, row: dict) -> dict:
    """A result row with the URL of its image's bytes."""
    return {**row, "url": content_url(request, row["id"])}


def add_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": "..."}` with its status; unexpected ones as a bare 500."""

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    @app.exception_handler(ImageNotFound)
    async def not_found(_: Request, exc: ImageNotFound) -> JSONResponse:
        return JSONResponse({"error": f"no image with id {exc.args[0]!r} in the lake"}, status_code=404)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": INTERNAL_ERROR}, status_code=500)
