"""Every retry policy of Orchard, in one place; docs/retries.md tabulates them with their worst cases.

A `Policy` bounds a retried operation twice: at most `attempts` attempts, and no attempt starts
once `deadline` seconds have passed since the first one (tenacity `stop_before_delay`: the wait
before an attempt counts). The total time is therefore at most `deadline` + one attempt, and one
attempt is bounded by the client timeouts (`worst_case`). Every retry is logged at WARNING with the
operation's name before its wait.

One level of retries per failure: the HTTP clients do not retry underneath a policy. The MinIO
client never retries (`S3_TRANSPORT_RETRIES`); the Elasticsearch client retries a plain call on
another node (`ES_TRANSPORT_RETRIES`, no backoff), and every call that a policy wraps goes through
`without_transport_retries`. Elasticsearch bulk writes go through `streaming_bulk`, which resends
the documents rejected with a retryable status itself (`BulkPolicy`); `BulkResends` logs and counts
those resends, which the helper does silently. A dropped connection or a timeout during a bulk
chunk redoes the chunk (ES_CHUNK), which is idempotent: same ids, same content.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from elastic_transport import ConnectionError as EsConnectionError
from elastic_transport import ConnectionTimeout, TlsError
from elasticsearch import ApiError, Elasticsearch
from elasticsearch.helpers import streaming_bulk
from minio.error import InvalidResponseError, S3Error, ServerError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)

F = TypeVar("F", bound=Callable[..., Any])

# Elasticsearch statuses worth resending a write for: a full write queue (429) or a shard moving
# after a node loss (502-504). Shared by the uploader and the Spark app's bulk writers.
ES_RETRY_STATUS = (429, 502, 503, 504)
# S3 error codes worth retrying: throttling, a node or quorum briefly missing, timeouts.
S3_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownRead",
        "SlowDownWrite",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "XMinioServerNotInitialized",
        "OperationTimedOut",
        "XMinioReadQuorum",
        "XMinioWriteQuorum",
    }
)

# Retries inside the HTTP clients. MinIO: none (urllib3 would multiply every policy below; the
# load balancer already moves a request off a dead node). Elasticsearch: a plain call (one that no
# policy wraps) is tried once on each node of the 3-node cluster, at once, on a connection error,
# a timeout or a 429/5xx answer; calls that a policy wraps use `without_transport_retries`.
S3_TRANSPORT_RETRIES = 0
ES_TRANSPORT_RETRIES = 2
# Hadoop s3a (Spark reading images, Java side): the AWS SDK's retries inside s3a's own retries.
S3A_SDK_RETRIES = 10  # fs.s3a.attempts.maximum
S3A_RETRY_LIMIT = 10  # fs.s3a.retry.limit


@dataclass(frozen=True)
class Policy:
    """Attempts, exponential backoff (initial, doubling, capped at max_wait) and a deadline (s)."""

    name: str
    attempts: int
    initial: float
    max_wait: float
    deadline: float

    def waits(self) -> list[float]:
        """The waits between attempts when every attempt fails (attempts - 1 of them)."""
        return [min(self.max_wait, self.initial * 2**n) for n in range(self.attempts - 1)]

    def worst_case(self, attempt_seconds: float, requests_per_attempt: int = 1) -> tuple[int, float]:
        """(requests, seconds) at most, if one attempt sends at most `requests_per_attempt` requests
        and lasts at most `attempt_seconds` (its client timeouts): the last attempt starts before
        the deadline, and there are at most `attempts` of them."""
        seconds = min(self.deadline + attempt_seconds, self.attempts * attempt_seconds + sum(self.waits()))
        return self.attempts * requests_per_attempt, seconds


@dataclass(frozen=True)
class BulkPolicy:
    """streaming_bulk's resends of documents rejected with `retry_on_status`: up to `max_retries`
    resends, waiting initial_backoff, doubling, capped at max_backoff (the helper's own schedule)."""

    name: str
    max_retries: int
    initial_backoff: float
    max_backoff: float
    retry_on_status: tuple[int, ...] = ES_RETRY_STATUS

    def backoff(self, resend: int) -> float:
        """The wait before resend number `resend` (1-based), as streaming_bulk computes it."""
        return min(self.max_backoff, self.initial_backoff * 2 ** (resend - 1))

    def waits(self) -> list[float]:
        """The waits before each resend when every send is rejected."""
        return [self.backoff(n) for n in range(1, self.max_retries + 1)]

    def worst_case(self, request_seconds: float) -> tuple[int, float]:
        """(requests, seconds) at most for one chunk, each request lasting at most `request_seconds`."""
        sends = self.max_retries + 1
        return sends, sends * request_seconds + sum(self.waits())

    def streaming_bulk_options(self) -> dict[str, Any]:
        """The retry keyword arguments of elasticsearch.helpers.streaming_bulk."""
        return {
            "max_retries": self.max_retries,
            "initial_backoff": self.initial_backoff,
            "max_backoff": self.max_backoff,
            "retry_on_status": self.retry_on_status,
        }


# Uploader: PUTs (a multipart upload is one attempt), listings and HEADs. Short deadline: with write
# quorum lost MinIO answers 503 SlowDownWrite to every PUT, and a file must fail in seconds.
S3_WRITE = Policy("S3 write", attempts=6, initial=0.5, max_wait=15, deadline=30)
S3_READ = Policy("S3 read", attempts=6, initial=0.5, max_wait=15, deadline=30)
# Model files and cards in the models bucket (driver and executors).
REGISTRY = Policy("model registry", attempts=5, initial=1, max_wait=10, deadline=60)
# `orchard setup` / `stack up`: the services may still be starting.
S3_SETUP = Policy("S3 setup", attempts=15, initial=0.5, max_wait=10, deadline=120)
ES_SETUP = Policy("Elasticsearch setup", attempts=6, initial=1, max_wait=10, deadline=120)
# Uploader reads and deletes by id.
ES_READ = Policy("Elasticsearch read", attempts=5, initial=0.5, max_wait=8, deadline=60)
# One document write of the driver: a model version's registry document, its inference rate.
ES_WRITE = Policy("Elasticsearch document write", attempts=5, initial=0.5, max_wait=8, deadline=60)
# A bulk chunk after a dropped connection or a timeout (Spark: with the chunk's mget).
ES_CHUNK = Policy("Elasticsearch bulk chunk", attempts=4, initial=2, max_wait=10, deadline=120)
# One MERGE of rows into the images table with delta-rs (orchard.core.table_write): a store error, or
# a commit another writer won (the MERGE re-reads the table and runs again).
LAKE_COMMIT = Policy("images table commit", attempts=4, initial=1, max_wait=8, deadline=60)
# Documents of a bulk request rejected with 429/5xx, resent by streaming_bulk.
ES_BULK = BulkPolicy("Elasticsearch bulk", max_retries=10, initial_backoff=1, max_backoff=30)


def _brief(exc: BaseException | None) -> str:
    if exc is None:
        return "no result"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200]


def log_retry(policy: Policy, logger: logging.Logger) -> Callable[[RetryCallState], None]:
    """tenacity before_sleep: one WARNING line per retry naming the operation, the error and the wait."""

    def before_sleep(state: RetryCallState) -> None:
        what = getattr(state.fn, "__name__", None)
        logger.warning(
            "%s%s failed (%s): retry %d/%d in %.1fs",
            policy.name,
            f" ({what})" if what else "",
            _brief(state.outcome.exception() if state.outcome else None),
            state.attempt_number,
            policy.attempts - 1,
            state.upcoming_sleep,
        )

    return before_sleep


def retrying(
    policy: Policy,
    retry_on: Callable[[BaseException], bool],
    logger: logging.Logger,
    sleep: Callable[[float], None] | None = None,
) -> Retrying:
    """A tenacity Retrying for `policy`: retries the errors `retry_on` accepts, re-raises the last one.

    Use it as `retrying(...)(fn, *args)` or `for attempt in retrying(...): with attempt: ...`;
    `sleep` replaces time.sleep (tests).
    """
    return Retrying(
        reraise=True,
        retry=retry_if_exception(retry_on),
        stop=stop_after_attempt(policy.attempts) | stop_before_delay(policy.deadline),
        wait=wait_exponential(multiplier=policy.initial, max=policy.max_wait),
        before_sleep=log_retry(policy, logger),
        sleep=sleep or _sleep,
    )


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # looked up at each wait, so that tests can replace the clock


def retried(policy: Policy, retry_on: Callable[[BaseException], bool], logger: logging.Logger) -> Callable[[F], F]:
    """Decorator form of `retrying` (the wrapped function keeps tenacity's `.retry_with`)."""
    return retrying(policy, retry_on, logger).wraps


# --- what is worth retrying -----------------------------------------------------------------------


def s3_transient(exc: BaseException) -> bool:
    """True for S3 errors worth retrying: throttling, 5xx, dropped connections, timeouts."""
    if isinstance(exc, S3Error):
        return exc.code in S3_TRANSIENT_CODES
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return True
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def es_connection_error(exc: BaseException) -> bool:
    """A connection refused or dropped, or a timeout (not a TLS failure: retrying cannot fix that)."""
    if isinstance(exc, TlsError):
        return False
    return isinstance(exc, (EsConnectionError, ConnectionTimeout, ConnectionError, TimeoutError))


def es_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, throttling (429) and unavailable shards (502-504)."""
    if isinstance(exc, ApiError):
        return exc.status_code in ES_RETRY_STATUS
    return es_connection_error(exc)


def without_transport_retries(es: Elasticsearch) -> Elasticsearch:
    """The same Elasticsearch client without its own retries, for calls a policy retries."""
    return es.options(max_retries=0)


# --- Elasticsearch bulk writes --------------------------------------------------------------------


class BulkResends:
    """Bulk writes through streaming_bulk with a BulkPolicy; logs and counts the resends.

    streaming_bulk resends rejected documents itself but says nothing about it, and yields a
    document's outcome only once its resends are over. So the client it is given observes every
    bulk response: the documents rejected with a retryable status are resent by the helper right
    after (next request of the same chunk) unless the chunk had its last resend. One WARNING line
    per resend, with the wait streaming_bulk is about to make; `resent` counts the document writes
    resent (across every chunk and call of this object).
    """

    def __init__(self, policy: BulkPolicy, logger: logging.Logger) -> None:
        self.policy = policy
        self.log = logger
        self.resent = 0
        self._round = 0  # resends so far of the chunk in flight
        self._pending = 0  # documents the helper resends with its next request

    def stream(
        self, es: Elasticsearch, actions: Iterable[dict], **kwargs: Any
    ) -> Iterable[tuple[bool, dict[str, Any]]]:
        """streaming_bulk(es without transport retries, actions, **policy options, **kwargs)."""
        self._round = self._pending = 0
        client: Any = _ObservedClient(without_transport_retries(es), self)  # an Elasticsearch as far as it can tell
        return streaming_bulk(client, actions, **self.policy.streaming_bulk_options(), **kwargs)

    def _send(self, bulk: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One bulk request of streaming_bulk, observed."""
        resending = self._pending
        self._round = self._round + 1 if resending else 0
        self._pending = 0
        try:
            response = bulk(*args, **kwargs)
        except ApiError as exc:  # the whole request refused: the helper resends all of it
            if exc.status_code in self.policy.retry_on_status:
                sent = resending or _count_actions(kwargs.get("operations", ()))
                self._rejected(sent, sent, {exc.status_code: sent})
            raise
        body = response.body
        if body.get("errors"):
            statuses: dict[int, int] = {}
            for item in body.get("items", []):
                status = next(iter(item.values())).get("status")
                if status in self.policy.retry_on_status:
                    statuses[status] = statuses.get(status, 0) + 1
            if statuses:
                self._rejected(sum(statuses.values()), len(body.get("items", [])), statuses)
        return response

    def _rejected(self, rejected: int, sent: int, statuses: dict[int, int]) -> None:
        if self._round >= self.policy.max_retries:  # no resend left: the caller reports the failures
            return
        self.resent += rejected
        self._pending = rejected
        self.log.warning(
            "Elasticsearch rejected %d of %d writes (429 too many requests / shard unavailable; %s): "
            "retry %d/%d in %.0fs",
            rejected,
            sent,
            ", ".join(f"HTTP {status} x{n}" for status, n in sorted(statuses.items())),
            self._round + 1,
            self.policy.max_retries,
            self.policy.backoff(self._round + 1),
        )


def _count_actions(operations: Iterable[Any]) -> int:
    """The number of actions in a serialized bulk body (action lines, not document lines)."""
    count = 0
    for line in operations:
        try:
            parsed = json.loads(line)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict) and len(parsed) == 1 and next(iter(parsed)) in _OP_TYPES:
            count += 1
    return count


_OP_TYPES = frozenset({"index", "create", "update", "delete"})


class _ObservedClient:
    """What streaming_bulk gets instead of the client: the same client, whose bulk requests (also
    those of its `options()` copies) go through `BulkResends._send`."""

    __slots__ = ("_client", "_resends")

    def __init__(self, client: Elasticsearch, resends: BulkResends) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_resends", resends)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client, name, value)

    def options(self, **kwargs: Any) -> _ObservedClient:
        return _ObservedClient(self._client.options(**kwargs), self._resends)

    def bulk(self, *args: Any, **kwargs: Any) -> Any:
        return self._resends._send(self._client.bulk, *args, **kwargs)
