"""MicroBatcher (orchard/serving/batcher.py): concurrent inputs gathered into model calls, every
caller its own rows, failures confined to the call that failed. No model: `run` records its calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from orchard.serving.batcher import MicroBatcher, grouped


class Recorder:
    """A `run(model, items)` that records every call and answers item * 10 (or raises for "bad")."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list]] = []

    def __call__(self, model: object, items: list) -> Sequence:
        self.calls.append((model, list(items)))
        if "bad" in items:
            raise RuntimeError("the model fell over")
        return [item * 10 for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(items) for _, items in self.calls]


async def serving(batcher: MicroBatcher, coro):
    """Run `coro` with the batcher's loop started, and stop the loop afterwards."""
    batcher.start()
    try:
        return await coro
    finally:
        await batcher.stop()


def test_concurrent_submits_are_gathered_into_calls_of_at_most_max_batch():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=4, max_wait=0.05)

    async def main():
        return await asyncio.gather(*(batcher.submit("m", [i]) for i in range(10)))

    results = asyncio.run(serving(batcher, main()))

    assert run.sizes == [4, 4, 2]
    assert [items for _, items in run.calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # every caller gets its own row, and the size of the call it was part of
    assert results == [[(i * 10, 4 if i < 8 else 2)] for i in range(10)]
    assert (batcher.stats.calls, batcher.stats.items, batcher.stats.largest) == (3, 10, 4)


def test_announced_inputs_arriving_within_max_wait_join_the_same_call():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=32, max_wait=0.5)

    async def late(i: int, delay: float):
        with batcher.announce(1) as ticket:  # a request decoding its image meanwhile
            await asyncio.sleep(delay)
            return await batcher.submit("m", [i], ticket)

    async def main():
        return await asyncio.gather(late(0, 0), late(1, 0.02), late(2, 0.05))

    results = asyncio.run(serving(batcher, main()))

    assert run.sizes == [3]
    assert results == [[(0, 3)], [(10, 3)], [(20, 3)]]
    assert batcher.expected == 0


def test_a_lone_input_does_not_wait_for_company_nobody_announced():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=32, max_wait=30)

    async def main():
        first = await asyncio.wait_for(batcher.submit("m", [1]), 10)  # not 30 s of max_wait
        await asyncio.sleep(0.05)
        return first, await asyncio.wait_for(batcher.submit("m", [2]), 10)

    assert asyncio.run(serving(batcher, main())) == ([(10, 1)], [(20, 1)])
    assert run.sizes == [1, 1]


def test_an_announced_input_that_never_comes_stops_the_wait_when_released():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=32, max_wait=30)

    async def abandon(ticket):
        await asyncio.sleep(0.05)
        ticket.release()  # its image turned out undecodable

    async def main():
        ticket = batcher.announce(2)
        answer = batcher.submit("m", [1], ticket)
        _, result = await asyncio.wait_for(asyncio.gather(abandon(ticket), answer), 10)
        return result

    assert asyncio.run(serving(batcher, main())) == [(10, 1)]
    assert run.sizes == [1] and batcher.expected == 0


def test_results_come_back_in_order_for_each_caller():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=5, max_wait=0.05)

    async def main():
        return await asyncio.gather(batcher.submit("m", [3, 1, 2]), batcher.submit("m", [7, 5, 6, 4]))

    first, second = asyncio.run(serving(batcher, main()))

    assert [result for result, _ in first] == [30, 10, 20]
    assert [result for result, _ in second] == [70, 50, 60, 40]
    # 7 inputs, calls of at most 5: the second caller's inputs span two calls, each row still its own
    assert run.sizes == [5, 2]
    assert [size for _, size in second] == [5, 5, 2, 2]


def test_a_failing_call_fails_every_caller_of_that_call_and_the_loop_keeps_serving():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.05)

    async def main():
        failed = await asyncio.gather(batcher.submit("m", ["bad"]), batcher.submit("m", [1]), return_exceptions=True)
        after = await batcher.submit("m", [2, 3])
        return failed, after

    failed, after = asyncio.run(serving(batcher, main()))

    assert run.sizes == [2, 2]
    assert all(isinstance(r, RuntimeError) and "fell over" in str(r) for r in failed)
    assert after == [(20, 2), (30, 2)]
    # only the successful call is counted
    assert (batcher.stats.calls, batcher.stats.items) == (1, 2)


def test_a_run_returning_the_wrong_number_of_rows_fails_its_callers_not_the_loop():
    calls = []

    def short(model, items):
        calls.append(list(items))
        return [0] if len(calls) == 1 else list(items)

    batcher = MicroBatcher(short, max_batch=8, max_wait=0.05)

    async def main():
        failed = await asyncio.gather(batcher.submit("m", [1, 2]), return_exceptions=True)
        after = await asyncio.wait_for(batcher.submit("m", [5]), 5)
        return failed, after

    failed, after = asyncio.run(serving(batcher, main()))

    assert isinstance(failed[0], ValueError)
    assert after == [(5, 1)]


def test_inputs_for_different_models_never_share_a_call():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=32, max_wait=0.05)
    old, new = object(), object()

    async def main():
        return await asyncio.gather(
            batcher.submit(old, [1]),
            batcher.submit(new, [2]),
            batcher.submit(old, [3]),
            batcher.submit(new, [4, 5]),
        )

    results = asyncio.run(serving(batcher, main()))

    assert len(run.calls) == 2
    by_model = {id(model): items for model, items in run.calls}
    assert by_model == {id(old): [1, 3], id(new): [2, 4, 5]}
    assert results == [[(10, 2)], [(20, 3)], [(30, 2)], [(40, 3), (50, 3)]]


def test_grouped_splits_by_identity_even_when_models_compare_equal():
    class Same:
        def __eq__(self, other):
            return True

        __hash__ = object.__hash__

    async def main():
        loop = asyncio.get_running_loop()
        a, b = Same(), Same()
        from orchard.serving.batcher import Pending

        batch = [
            Pending(a, 1, loop.create_future()),
            Pending(b, 2, loop.create_future()),
            Pending(a, 3, loop.create_future()),
        ]
        return a, b, grouped(batch)

    a, b, groups = asyncio.run(main())

    assert [(model is a, [p.item for p in group]) for model, group in groups] == [(True, [1, 3]), (False, [2])]
    assert groups[1][0] is b


def test_max_wait_zero_still_serves_and_gathers_what_is_already_queued():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=32, max_wait=0)

    async def main():
        alone = await batcher.submit("m", [1])
        together = await asyncio.gather(*(batcher.submit("m", [i]) for i in range(5)))
        return alone, together

    alone, together = asyncio.run(serving(batcher, main()))

    assert alone == [(10, 1)]
    assert [rows[0][0] for rows in together] == [0, 10, 20, 30, 40]
    assert sum(run.sizes) == 6
    assert run.sizes[0] == 1


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_wait=-0.001)


def test_stop_fails_the_inputs_still_queued():
    release = threading.Event()
    started = threading.Event()

    def slow(model, items):
        started.set()
        release.wait(10)
        return list(items)

    batcher = MicroBatcher(slow, max_batch=1, max_wait=0)

    async def main():
        batcher.start()
        in_flight = asyncio.ensure_future(batcher.submit("m", [1]))
        await asyncio.to_thread(started.wait, 5)  # the first call is running: the next inputs queue
        queued = [asyncio.ensure_future(batcher.submit("m", [i])) for i in (2, 3)]
        await asyncio.sleep(0.01)
        await batcher.stop()
        release.set()
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)
        return outcomes

    outcomes = asyncio.run(main())

    assert len(outcomes) == 2
    assert all(isinstance(o, RuntimeError) and "stopping" in str(o) for o in outcomes)


def test_stop_without_a_loop_fails_queued_inputs_and_skips_callers_that_went_away():
    batcher = MicroBatcher(Recorder(), max_batch=4, max_wait=0)

    async def main():
        gone = asyncio.ensure_future(batcher.submit("m", [1]))
        waiting = asyncio.ensure_future(batcher.submit("m", [2]))
        await asyncio.sleep(0)  # both inputs are queued (the loop was never started)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await batcher.stop()
        return await asyncio.gather(waiting, return_exceptions=True)

    (outcome,) = asyncio.run(main())

    assert isinstance(outcome, RuntimeError)
