"""settle_heap (orchard/serving/predictor.py): after a model load, what a previous model left is
collected and everything alive is left out of the collector's later passes, while new garbage is
still collected."""

from __future__ import annotations

import gc
import weakref

from orchard.serving.predictor import settle_heap


class Node:
    """An object in a reference cycle (only the cyclic collector frees it)."""

    def __init__(self) -> None:
        self.me = self


def cycle() -> weakref.ref:
    """A weak reference to an unreachable cycle."""
    return weakref.ref(Node())


def test_settle_heap_collects_old_cycles_then_freezes_the_living_and_new_garbage_still_goes():
    old = cycle()
    model = Node()  # what a load leaves alive
    loaded = weakref.ref(model)
    try:
        settle_heap()
        assert old() is None  # cycles left before the load are collected first
        assert gc.get_freeze_count() > 0 and not any(o is model for o in gc.get_objects())  # not scanned
        new = cycle()
        gc.collect()
        assert new() is None  # garbage made after the freeze is still collected
        del model  # a promotion replaces the model: its cycle is garbage, but frozen
        gc.collect()
        assert loaded() is not None
        settle_heap()  # the next load unfreezes before collecting
        assert loaded() is None
    finally:
        gc.unfreeze()
