"""Micro-batching: the inputs of concurrent requests gathered into one model call.

A model predicts 32 images in little more time than one, so a service that calls it per request
wastes most of it under load. Each request's inputs join a queue; one loop takes the first waiting
input, lets up to `max_wait` seconds pass for others to join (at most `max_batch` in all) while
inputs are announced as on their way (a request still decoding its images), runs the
call in a worker thread (the event loop keeps accepting requests meanwhile, and they form the next
batch), and hands every caller its own row of the outputs. Inputs prepared for different models (a
promotion between decoding and the call) are never mixed: each group gets its own call.

Waiting only while more inputs are announced keeps a lone request from paying `max_wait` for
company that is not coming (the 1-client latency), and still gathers full batches under load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

WAKE: Any = object()  # queued when announced inputs are withdrawn: not an input
M = TypeVar("M")  # the model an input was prepared for
R = TypeVar("R")  # one input's result


@dataclass
class Pending(Generic[M]):
    """One input waiting for its model call, and the future its caller awaits."""

    model: M
    item: Any
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What the loop has done: model calls, inputs, the largest call (for /healthz and tests)."""

    calls: int = 0
    items: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        """Count one model call of `size` inputs."""
        self.calls += 1
        self.items += size
        self.largest = max(self.largest, size)


class Ticket:
    """Inputs announced to the batcher as on their way; each is released when it is submitted, or
    when the announcing request gives up (leaving the `with` block)."""

    def __init__(self, owner: MicroBatcher, count: int):
        self._owner, self.left = owner, count

    def release(self, count: int | None = None) -> None:
        """No longer wait for `count` (default: all the remaining) of the announced inputs."""
        count = self.left if count is None else min(count, self.left)
        self.left -= count
        self._owner.expected -= count
        if count:
            self._owner.wake()  # a gathering that waits for them may stop now

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class MicroBatcher(Generic[M, R]):
    """Gathers inputs into calls of `run(model, items) -> results` (one result per item, in order);
    `name` says what a call is in logs."""

    def __init__(
        self, run: Callable[[M, list], Sequence[R]], max_batch: int = 32, max_wait: float = 0.005, name: str = "model"
    ):
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self._run, self.max_batch, self.max_wait, self.name = run, max_batch, max_wait, name
        self._queue: asyncio.Queue[Pending[M]] = asyncio.Queue()  # and WAKE markers
        self._task: asyncio.Task | None = None
        self.expected = 0  # inputs announced (Ticket) and not submitted yet
        self.stats = BatchStats()

    def start(self) -> None:
        """Start the gathering loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.name} batcher")

    async def stop(self) -> None:
        """Stop the loop; inputs still queued fail with RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if pending is WAKE:
                continue
            future = pending.future
            if not future.done():  # a caller that went away has a cancelled future
                future.set_exception(RuntimeError("the service is stopping"))

    def announce(self, count: int) -> Ticket:
        """Tell the loop that `count` inputs are coming (use as `with batcher.announce(n) as t:` and
        pass `t` to submit): batches being gathered wait for them, up to max_wait."""
        self.expected += count
        return Ticket(self, count)

    def wake(self) -> None:
        """Make a gathering that waits re-check whether inputs are still announced."""
        self._queue.put_nowait(WAKE)

    async def submit(self, model: M, items: Sequence[Any], ticket: Ticket | None = None) -> list[tuple[R, int]]:
        """(result, size of the model call it was part of) per item, in order; the call's exception
        if it failed. `ticket`: the announcement these items fulfil."""
        if ticket is not None:
            ticket.release(len(items))
        loop = asyncio.get_running_loop()
        pending = [Pending(model, item, loop.create_future()) for item in items]
        for p in pending:
            self._queue.put_nowait(p)
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            for model, group in grouped(batch):
                await self._call(model, group)

    async def _gather(self) -> list[Pending[M]]:
        """The first waiting input and those that join it within max_wait (max_batch at most) while
        more are announced."""
        first = await self._queue.get()
        while first is WAKE:
            first = await self._queue.get()
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            elif (left := deadline - loop.time()) <= 0 or self.expected <= 0:
                break
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if item is not WAKE:
                batch.append(item)
        return batch

    async def _call(self, model: M, group: list[Pending[M]]) -> None:
        """One model call in a worker thread; each future gets its row, or the call's exception."""
        live = [p for p in group if not p.future.done()]  # a caller that went away needs no row
        if not live:
            return
        try:
            results = await asyncio.to_thread(self._run, model, [p.item for p in live])
            rows = list(zip(live, results, strict=True))  # a wrong count fails this call, not the loop
        except Exception as exc:  # the callers turn it into their error response
            log.exception("%s call of %d inputs failed", self.name, len(live))
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.stats.add(len(live))
        for p, result in rows:
            if not p.future.done():
                p.future.set_result((result, len(live)))


def grouped(batch: list[Pending[M]]) -> list[tuple[M, list[Pending[M]]]]:
    """The batch split by the model its inputs were prepared for, in order of first appearance."""
    groups: dict[int, tuple[M, list[Pending[M]]]] = {}
    for p in batch:
        groups.setdefault(id(p.model), (p.model, []))[1].append(p)
    return list(groups.values())
