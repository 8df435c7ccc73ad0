"""The retry policies (orchard.core.retry): what is retried, how often, for how long, at one level only.

No services: Elasticsearch is the real client (and the real streaming_bulk) over a fake transport
node that answers from a script; time is a fake clock wherever a policy would wait.
"""

from __future__ import annotations

import inspect
import json
import logging
import re

import pytest
import tenacity
import urllib3
from elastic_transport import ApiResponseMeta, BaseNode, HttpHeaders, NodeConfig, TlsError
from elastic_transport import ConnectionError as EsConnectionError
from elastic_transport._node import NodeApiResponse
from elasticsearch import ApiError
from minio.error import S3Error, ServerError

from orchard.core import retry
from orchard.core.clients import (
    CONNECT_TIMEOUT_SECONDS,
    ES_REQUEST_TIMEOUT_SECONDS,
    READ_TIMEOUT_SECONDS,
    es_client,
    s3_http_client,
)
from orchard.core.errors import ConfigError
from orchard.core.settings import Settings
from orchard.core.toolchain import REPO_ROOT
from orchard.uploader import index, transfer

log = logging.getLogger("test.retry")

POLICIES = [
    retry.S3_WRITE,
    retry.S3_READ,
    retry.REGISTRY,
    retry.S3_SETUP,
    retry.ES_SETUP,
    retry.ES_READ,
    retry.ES_WRITE,
    retry.ES_CHUNK,
]
# The line the chaos suite looks for in the upload's and the executors' logs (tests/chaos/test_es_faults.py).
CHAOS_RETRY_LINE = re.compile(r"(?i)(429|rejected|throttl|too many requests).*retr|retr.*(429|rejected|throttl)")
REJECTED = {"type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation"}


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, "message", "resource", "request-id", "host-id")


def es_error(status: int) -> ApiError:
    meta = ApiResponseMeta(
        status=status, http_version="1.1", headers=HttpHeaders(), duration=0.0, node=NodeConfig("http", "es", 9200)
    )
    return ApiError(message="error", meta=meta, body={})


class FakeClock:
    """tenacity's clock and sleep: time passes only when an attempt or a wait says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """A fake clock for tenacity (its stop conditions) and for every wait of the policies and of streaming_bulk."""
    import elasticsearch.helpers.actions

    fake = FakeClock()
    monkeypatch.setattr(tenacity, "time", fake)
    monkeypatch.setattr(retry, "time", fake)
    monkeypatch.setattr(elasticsearch.helpers.actions, "time", fake)
    return fake


# --- the policies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("attempt_seconds", [0.0, 2.5, 40.0, 400.0])
def test_every_policy_is_bounded_in_attempts_and_in_time(policy, attempt_seconds, clock) -> None:
    starts = []

    def attempt() -> None:
        starts.append(clock.now)
        clock.now += attempt_seconds
        raise ConnectionResetError("reset by peer")

    with pytest.raises(ConnectionResetError):
        retry.retrying(policy, lambda exc: True, log)(attempt)
    requests, bound = policy.worst_case(attempt_seconds)
    assert 1 <= len(starts) <= policy.attempts == requests
    assert all(start < policy.deadline for start in starts[1:])  # no attempt starts after the deadline
    assert clock.now <= bound
    assert clock.sleeps == policy.waits()[: len(starts) - 1]  # the documented schedule, no more
    if attempt_seconds == 0:  # failing at once: every attempt is made, within the deadline
        assert len(starts) == policy.attempts and sum(policy.waits()) < policy.deadline


def test_the_worst_case_is_the_deadline_plus_one_attempt_or_all_attempts() -> None:
    assert retry.S3_WRITE.waits() == [0.5, 1, 2, 4, 8]
    assert retry.S3_WRITE.worst_case(40) == (6, 70)  # the last attempt starts before 30 s
    assert retry.S3_WRITE.worst_case(1) == (6, 6 + 15.5)  # ... or all attempts end sooner
    assert retry.ES_BULK.waits() == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    assert retry.ES_BULK.worst_case(30) == (11, 11 * 30 + 181)


def test_each_retry_is_logged_once_with_the_operation_the_error_and_the_wait(clock, caplog) -> None:
    calls = []

    def put_object() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise s3_error("SlowDownWrite")
        return "etag"

    with caplog.at_level(logging.WARNING, logger="test.retry"):
        assert retry.retrying(retry.S3_WRITE, retry.s3_transient, log)(put_object) == "etag"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert lines[0].startswith("S3 write (put_object) failed (S3Error: S3 operation failed; code: SlowDownWrite")
    assert lines[0].endswith("retry 1/5 in 0.5s") and lines[1].endswith("retry 2/5 in 1.0s")


def test_errors_not_worth_retrying_are_raised_at_once(clock) -> None:
    for policy, retry_on, error in [
        (retry.S3_WRITE, retry.s3_transient, s3_error("AccessDenied")),
        (retry.S3_READ, retry.s3_transient, FileNotFoundError("gone")),
        (retry.ES_READ, retry.es_transient, es_error(400)),
        (retry.ES_CHUNK, retry.es_transient, TlsError("certificate verify failed")),
    ]:
        calls = []

        def fail(error=error, calls=calls):
            calls.append(1)
            raise error

        with pytest.raises(type(error)):
            retry.retrying(policy, retry_on, log)(fail)
        assert len(calls) == 1, error
    assert clock.sleeps == []


def test_s3_throttling_server_errors_and_dropped_connections_are_retried() -> None:
    for code in ("SlowDown", "SlowDownWrite", "InternalError", "ServiceUnavailable", "XMinioServerNotInitialized"):
        assert retry.s3_transient(s3_error(code)), code
    assert retry.s3_transient(ServerError("502 from proxy", 502))
    assert retry.s3_transient(urllib3.exceptions.ProtocolError("connection reset"))
    assert retry.s3_transient(urllib3.exceptions.MaxRetryError(None, "/", "refused"))  # urllib3 retries nothing
    assert retry.s3_transient(ConnectionResetError())
    for code in ("AccessDenied", "NoSuchBucket", "InvalidObjectName"):
        assert not retry.s3_transient(s3_error(code)), code
    assert not retry.s3_transient(FileNotFoundError("gone")) and not retry.s3_transient(ValueError("bad"))
    assert transfer.is_transient is retry.s3_transient  # the uploader's write-quorum check uses the same rule


def test_elasticsearch_429_5xx_connection_errors_and_timeouts_are_retried() -> None:
    from elastic_transport import ConnectionTimeout

    for status in retry.ES_RETRY_STATUS:
        assert retry.es_transient(es_error(status)), status
    assert retry.es_transient(EsConnectionError("refused")) and retry.es_transient(ConnectionTimeout("30 s"))
    for status in (400, 401, 404, 409, 413):
        assert not retry.es_transient(es_error(status)), status
    assert not retry.es_transient(TlsError("certificate verify failed"))


# --- the clients retry nothing underneath a policy ---------------------------------------------------


def test_the_s3_client_retries_nothing_itself_and_ignores_retry_after() -> None:
    pool = s3_http_client()
    retries, timeout = pool.connection_pool_kw["retries"], pool.connection_pool_kw["timeout"]
    assert retries.total is None and retries.connect == retries.read == retries.status == retries.other == 0
    assert not retries.respect_retry_after_header  # MinIO's 503s say "Retry-After: 120"
    assert not retries.is_retry("PUT", 503, has_retry_after=True)
    assert retries.redirect == 3  # redirects are not retries
    assert timeout.connect_timeout == CONNECT_TIMEOUT_SECONDS <= 10  # the SDK default waits 5 min to connect
    assert timeout.read_timeout == READ_TIMEOUT_SECONDS <= 60  # a PUT MinIO holds open fails, is not re-sent here


def test_an_upload_stops_after_writes_are_refused_in_a_row(tmp_path) -> None:
    from orchard.core.errors import ServiceUnavailable
    from orchard.uploader.pipeline import ABORT_AFTER_FAILED_WRITES, Uploader, UploadOptions

    up = Uploader(Settings(home=tmp_path), UploadOptions(dataset="d"), s3=None, es=None)
    for _ in range(ABORT_AFTER_FAILED_WRITES - 1):
        up._count_write(s3_error("SlowDownWrite"))
    up._count_write(None)
    assert up.failed_writes_in_a_row == 0
    for _ in range(ABORT_AFTER_FAILED_WRITES):
        up._count_write(s3_error("SlowDownWrite"))
    error = up.writes_refused()
    assert isinstance(error, ServiceUnavailable) and f"last {ABORT_AFTER_FAILED_WRITES} writes" in str(error)
    assert "SlowDownWrite" in str(error) or "message" in str(error)


def test_a_put_is_retried_with_s3_write_and_stops_once_write_quorum_is_lost(clock) -> None:
    from orchard.uploader.discovery import WorkItem
    from orchard.uploader.inspection import Inspected

    class RefusingMinio:
        calls = 0

        def put_object(self, *args, **kwargs):
            RefusingMinio.calls += 1
            raise s3_error("SlowDownWrite")

    item = WorkItem(path=None, key="d/train/a/1.jpg", dataset="d", split="train", label="a", label_text="a")
    info = Inspected(item, "ab" * 32, 3, "jpeg", 1, 1, 3, "RGB", b"abc")
    with pytest.raises(S3Error):
        transfer.retried_put()(RefusingMinio(), "images", info)
    assert RefusingMinio.calls == retry.S3_WRITE.attempts and clock.sleeps == retry.S3_WRITE.waits()

    RefusingMinio.calls, clock.sleeps = 0, []
    quorum_lost = transfer.retried_put(lambda exc: False)  # as pipeline.Uploader once write quorum is lost
    with pytest.raises(S3Error):
        quorum_lost(RefusingMinio(), "images", info)
    assert RefusingMinio.calls == 1 and clock.sleeps == []


# --- Elasticsearch: the real client over a fake node -------------------------------------------------


class FakeCluster:
    """Answers the real client's requests, in order: a scripted refusal, else bulk items / mget docs.

    `reject[id]`: how many times that document is rejected with 429 inside a bulk answer before it
    is written; `refuse`: per request, "connect" (connection refused) or a status for the whole
    request, None to answer normally; `stored`: documents that exist (create answers 409).
    """

    def __init__(self, reject=None, refuse=(), stored=()) -> None:
        self.reject = dict(reject or {})
        self.refuse = list(refuse)
        self.stored = {doc_id: {"key": f"k/{doc_id}"} for doc_id in stored}
        self.requests: list[tuple[str, list[str]]] = []  # (endpoint, ids)

    def client(self, request_timeout: float = 30):
        cluster = self

        class Node(BaseNode):
            _CLIENT_META_HTTP_CLIENT = ("fake", "1")

            def perform_request(self, method, target, body=None, headers=None, request_timeout=None):
                return cluster.answer(self.config, method, target, body)

        return es_client(Settings(es_hosts="http://es:9200"), node_class=Node, request_timeout=request_timeout)

    def answer(self, node, method: str, target: str, body: bytes | None) -> NodeApiResponse:
        path = target.partition("?")[0]
        endpoint = path.rsplit("/", 1)[-1] if "/_" in path else method
        lines = [json.loads(line) for line in (body or b"").splitlines() if line.strip()]
        ops = self._bulk_ops(lines) if endpoint == "_bulk" else []
        ids = [doc_id for _, doc_id in ops] or (lines[0].get("ids", []) if endpoint == "_mget" else [])
        self.requests.append((endpoint, ids))
        refusal = self.refuse.pop(0) if self.refuse else None
        if refusal == "connect":
            raise EsConnectionError("connection refused")
        if refusal:
            return self._response(node, refusal, {"error": REJECTED, "status": refusal})
        if endpoint == "_bulk":
            items = [self._item(op, doc_id) for op, doc_id in ops]
            errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
            return self._response(node, 200, {"took": 1, "errors": errors, "items": items})
        if endpoint == "_mget":
            docs = [{"_id": i, "found": i in self.stored, "_source": self.stored.get(i, {})} for i in ids]
            return self._response(node, 200, {"docs": docs})
        return self._response(node, 200, {"result": "deleted", "name": "es01", "version": {"number": "8.19.0"}})

    @staticmethod
    def _bulk_ops(lines: list[dict]) -> list[tuple[str, str]]:
        ops, i = [], 0
        while i < len(lines):
            op, meta = next(iter(lines[i].items()))
            ops.append((op, meta["_id"]))
            i += 1 if op == "delete" else 2
        return ops

    def _item(self, op: str, doc_id: str) -> dict:
        if self.reject.get(doc_id, 0) > 0:
            self.reject[doc_id] -= 1
            return {op: {"_id": doc_id, "status": 429, "error": REJECTED}}
        if op == "create" and doc_id in self.stored:
            return {op: {"_id": doc_id, "status": 409, "error": {"type": "version_conflict_engine_exception"}}}
        self.stored.setdefault(doc_id, {})
        return {op: {"_id": doc_id, "status": 201 if op == "create" else 200, "result": "updated"}}

    @staticmethod
    def _response(node, status: int, body: dict) -> NodeApiResponse:
        headers = HttpHeaders({"content-type": "application/json", "x-elastic-product": "Elasticsearch"})
        meta = ApiResponseMeta(status=status, http_version="1.1", headers=headers, duration=0.0, node=node)
        return NodeApiResponse(meta, json.dumps(body).encode())


def update(i: int) -> tuple[dict, str, bool]:
    return {"_op_type": "update", "_index": "ix", "_id": f"d{i}", "doc": {"x": i}}, f"a/{i}.jpg", False


def bulk_ids(cluster: FakeCluster) -> list[list[str]]:
    return [ids for endpoint, ids in cluster.requests if endpoint == "_bulk"]


def test_spark_bulk_writes_resend_rejected_documents_once_each_logged_and_counted(clock, caplog) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(reject={"d0": 1, "d1": 1})
    with caplog.at_level(logging.WARNING, logger="orchard.spark_app.sink"):
        tally = sink.write_actions(cluster.client(), [update(i) for i in range(3)])
    assert bulk_ids(cluster) == [["d0", "d1", "d2"], ["d0", "d1"]]  # only the rejected ones again
    assert (tally.updated, tally.failed, tally.retried) == (3, 0, 2)
    assert clock.sleeps == [retry.ES_BULK.backoff(1)]  # streaming_bulk's own wait, as the log line says
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and CHAOS_RETRY_LINE.search(lines[0])
    assert "rejected 2 of 3 writes (429" in lines[0] and "retry 1/10 in 1s" in lines[0]


def test_spark_bulk_writes_still_rejected_after_every_resend_fail_with_the_reason(clock) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(reject={"d0": 1000})
    tally = sink.write_actions(cluster.client(), [update(0), update(1)])
    assert len(bulk_ids(cluster)) == retry.ES_BULK.max_retries + 1  # no other level resends them again
    assert (tally.updated, tally.failed, tally.retried) == (1, 1, retry.ES_BULK.max_retries)
    assert tally.examples == [("a/0.jpg", "es_rejected_execution_exception: " + REJECTED["reason"])]
    assert clock.sleeps == retry.ES_BULK.waits()


@pytest.mark.parametrize("status", [429, 503])
def test_a_whole_bulk_request_refused_is_resent_by_the_helper_not_by_the_transport(clock, status) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(refuse=[status])
    tally = sink.write_actions(cluster.client(), [update(0), update(1)])
    assert bulk_ids(cluster) == [["d0", "d1"], ["d0", "d1"]]  # the client's own retries would have sent 3
    assert (tally.updated, tally.failed, tally.retried) == (2, 0, 2)


def test_a_bulk_request_refused_until_the_last_resend_fails_its_documents(clock) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(refuse=[429] * (retry.ES_BULK.max_retries + 1))
    tally = sink.write_actions(cluster.client(), [update(0)])
    assert len(cluster.requests) == retry.ES_BULK.max_retries + 1
    assert tally.failed == 1 and tally.examples[0][1].startswith("HTTP 429")


def test_a_dropped_connection_redoes_the_chunk_once_per_failure(clock, caplog) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(refuse=["connect", None], reject={"d1": 1})
    with caplog.at_level(logging.WARNING, logger="orchard.spark_app.sink"):
        tally = sink.write_actions(cluster.client(), [update(0), update(1)])
    assert bulk_ids(cluster) == [["d0", "d1"], ["d0", "d1"], ["d1"]]  # no transport retry underneath
    assert (tally.updated, tally.failed, tally.retried) == (2, 0, 1)
    assert clock.sleeps == [retry.ES_CHUNK.waits()[0], retry.ES_BULK.backoff(1)]
    lines = [r.getMessage() for r in caplog.records if r.name == "orchard.spark_app.sink"]
    assert lines[0].startswith("Elasticsearch bulk chunk (process_chunk) failed (ConnectionError")
    assert lines[0].endswith("retry 1/3 in 2.0s") and "rejected 1 of 2 writes" in lines[1]


def test_a_bulk_request_refused_for_good_is_not_redone(clock) -> None:
    from orchard.spark_app import sink

    cluster = FakeCluster(refuse=[400])
    with pytest.raises(ApiError):
        sink.write_actions(cluster.client(), [update(0)])
    assert len(cluster.requests) == 1 and clock.sleeps == []


def test_spark_chunk_reads_and_writes_share_one_retry_level(clock) -> None:
    from orchard.spark_app import sink

    def select(es, chunk):  # like infer.skip_unchanged: one mget per chunk
        es.mget(index="ix", ids=[action["_id"] for action, _, _ in chunk])
        return chunk, sink.Tally()

    cluster = FakeCluster(refuse=[503, "connect"])  # the mget twice, then everything answers
    tally = sink.write_actions(cluster.client(), [update(0)], select=select)
    assert [endpoint for endpoint, _ in cluster.requests] == ["_mget", "_mget", "_mget", "_bulk"]
    assert tally.updated == 1 and clock.sleeps == retry.ES_CHUNK.waits()[:2]


def test_the_uploader_creates_documents_with_resends_logged_and_no_nested_retries(clock, caplog) -> None:
    docs = {doc_id: {"key": f"k/{doc_id}"} for doc_id in ("a", "b", "c", "d")}
    cluster = FakeCluster(reject={"a": 1, "d": 1000}, stored=["b"], refuse=["connect"])
    with caplog.at_level(logging.WARNING, logger="orchard.uploader.index"):
        results = index.create_documents(cluster.client(), "ix", docs)
    assert results["a"] == index.CREATED and results["b"] == index.PRESENT and results["c"] == index.CREATED
    assert results["d"].startswith("index error: Elasticsearch kept rejecting the write (HTTP 429")
    sends = bulk_ids(cluster)
    assert sends[:3] == [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "d"]]  # redo after the dropped connection
    assert len(sends) == 1 + retry.ES_BULK.max_retries + 1  # "d" is not resent by a second level
    resends = [r.getMessage() for r in caplog.records if CHAOS_RETRY_LINE.search(r.getMessage())]
    assert len(resends) == retry.ES_BULK.max_retries and "rejected 2 of 4 writes (429" in resends[0]


def test_the_uploader_reads_and_deletes_with_es_read_one_request_per_attempt(clock) -> None:
    cluster = FakeCluster(refuse=[503, "connect"], stored=["a"])
    assert index.existing_documents(cluster.client(), "ix", ["a", "b"]) == {"a": {"key": "k/a"}}
    assert len(cluster.requests) == 3 and clock.sleeps == retry.ES_READ.waits()[:2]

    cluster = FakeCluster(refuse=["connect"] * 100, stored=["a"])
    with pytest.raises(EsConnectionError):
        index.delete_document_if_key(cluster.client(), "ix", "a", "k/a")
    assert len(cluster.requests) == retry.ES_READ.attempts  # not attempts x attempts x transport retries


def test_the_uploader_refreshes_the_index_with_es_read_and_a_failed_refresh_loses_no_upload(clock, caplog) -> None:
    cluster = FakeCluster(refuse=[503])
    index.make_searchable(cluster.client(), "ix")
    assert cluster.requests == [("_refresh", []), ("_refresh", [])] and clock.sleeps == retry.ES_READ.waits()[:1]

    cluster = FakeCluster(refuse=["connect"] * 100)
    index.make_searchable(cluster.client(), "ix")  # logged, not raised: the documents are written
    assert len(cluster.requests) == retry.ES_READ.attempts
    assert "index refresh failed" in caplog.text


def test_registry_documents_are_written_with_es_write_one_request_per_attempt(clock, monkeypatch) -> None:
    from orchard.spark_app import registry

    bucket: dict[str, dict] = {"cnn-1/registry.json": {"family": "cnn"}}  # the models bucket's copies

    def get_json(s, version, name):
        if f"{version}/{name}" not in bucket:
            raise ConfigError("no such file")
        return bucket[f"{version}/{name}"]

    monkeypatch.setattr(registry, "put_json", lambda s, key, body: bucket.__setitem__(key, body))
    monkeypatch.setattr(registry, "get_json", get_json)
    cluster = FakeCluster(refuse=[429, 429, 503])
    monkeypatch.setattr(registry, "es_client", lambda s: cluster.client())
    summary = {"images_per_second": 10.0, "images": 20, "seconds": 2.0, "predicted_at": "t", "table_version": 1}
    registry.record_inference(Settings(es_hosts="http://es:9200"), "cnn-1", summary)
    assert len(cluster.requests) == 4 and clock.sleeps == retry.ES_WRITE.waits()[:3]
    # the bucket's copy of the document follows (orchard reindex restores documents from it)
    assert bucket["cnn-1/registry.json"]["inference"]["images_per_second"] == 10.0

    cluster = FakeCluster(refuse=[429] * 100)
    with pytest.raises(ApiError):
        registry.register(Settings(es_hosts="http://es:9200"), "cnn-1", {}, None, {"family": "cnn"})
    assert len(cluster.requests) == retry.ES_WRITE.attempts  # no transport retries inside the policy's


def test_plain_elasticsearch_calls_try_each_node_once() -> None:
    cluster = FakeCluster(refuse=[503] * 10)
    with pytest.raises(ApiError):
        cluster.client().info()
    assert len(cluster.requests) == retry.ES_TRANSPORT_RETRIES + 1 == 3


def test_counting_actions_of_a_serialized_bulk_body() -> None:
    lines = [
        b'{"update":{"_id":"a","_index":"ix"}}',
        b'{"doc":{"x":1}}',
        b'{"delete":{"_id":"b"}}',
        b'{"create":{"_id":"c"}}',
        b'{"index":"not an action, a document field","key":"k"}',
    ]
    assert retry._count_actions(lines) == 3


# --- docs/retries.md ---------------------------------------------------------------------------------


def expected_rows() -> dict[str, tuple[int, float]]:
    """Operation (first cell of the table) -> (requests, seconds) computed from the policies and timeouts."""
    from orchard.spark_app import context

    assert "request_timeout=60" in inspect.getsource(context.es_of)
    s3_request = CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS  # a request that stalls
    es_request, executor_request = ES_REQUEST_TIMEOUT_SECONDS, 60
    upload_bulk = retry.ES_BULK.worst_case(es_request)
    executor_bulk = retry.ES_BULK.worst_case(executor_request)
    transport = retry.ES_TRANSPORT_RETRIES + 1
    return {
        "Upload: object PUT": retry.S3_WRITE.worst_case(s3_request),
        "Upload: folder listing, HEAD": retry.S3_READ.worst_case(s3_request),
        "Upload: existing documents": retry.ES_READ.worst_case(es_request),
        "Upload: delete a replaced document": retry.ES_READ.worst_case(2 * es_request, 2),
        "Upload: create documents": retry.ES_CHUNK.worst_case(upload_bulk[1], upload_bulk[0]),
        "Infer: write predictions": retry.ES_CHUNK.worst_case(
            executor_request + executor_bulk[1], 1 + executor_bulk[0]
        ),
        "Features: write embeddings": retry.ES_CHUNK.worst_case(executor_bulk[1], executor_bulk[0]),
        "Model registry": retry.REGISTRY.worst_case(s3_request),
        "Registry documents": retry.ES_WRITE.worst_case(es_request),
        "Setup: buckets": retry.S3_SETUP.worst_case(2 * s3_request, 2),
        "Setup: index templates": retry.ES_SETUP.worst_case(6 * es_request + 75, 7),
        "Any other Elasticsearch call": (transport, transport * es_request),
        "Any other S3 call": (1, s3_request),
    }


def test_docs_table_states_every_computed_worst_case() -> None:
    from orchard.stack.setup import GREEN_WAIT_SECONDS

    assert GREEN_WAIT_SECONDS + 15 == 75  # the green wait's client timeout in expected_rows
    rows = {
        line.split("|")[1].strip(): line
        for line in (REPO_ROOT / "docs" / "retries.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ")
    }
    for operation, (requests, seconds) in expected_rows().items():
        row = next((line for name, line in rows.items() if name.startswith(operation)), None)
        assert row is not None, f"docs/retries.md has no row for {operation!r}"
        worst = f"| {requests} request{'s' if requests > 1 else ''}, {seconds:g} s"
        assert worst in row, (operation, worst, row)


def test_clients_use_the_transport_settings_of_the_retry_module() -> None:
    from orchard.core.clients import s3a_conf

    es = es_client(Settings(es_hosts="http://es:9200"))
    assert es._max_retries == retry.ES_TRANSPORT_RETRIES and es._retry_on_timeout
    quiet = retry.without_transport_retries(es)
    assert quiet._max_retries == 0 and quiet.transport is es.transport
    conf = s3a_conf(Settings(s3_endpoint="http://s3"))
    assert conf["spark.hadoop.fs.s3a.attempts.maximum"] == str(retry.S3A_SDK_RETRIES)
    assert conf["spark.hadoop.fs.s3a.retry.limit"] == str(retry.S3A_RETRY_LIMIT)


def test_refused_deletes_are_retried_only_when_every_refusal_is_transient() -> None:
    from minio.deleteobjects import DeleteError

    from orchard.core.objects import DeletesRefused, _retryable

    slow = DeleteError("SlowDownWrite", "short of write quorum", "d/train/a/1.jpg", None)
    denied = DeleteError("AccessDenied", "Access Denied.", "d/train/a/2.jpg", None)
    assert _retryable(DeletesRefused("images", [slow, slow]))
    refused = DeletesRefused("images", [slow, denied])
    assert not _retryable(refused)
    assert str(refused) == "2 objects of images not deleted, e.g. d/train/a/1.jpg: SlowDownWrite"
    assert _retryable(s3_error("SlowDown")) and not _retryable(s3_error("NoSuchBucket"))
