"""ModelHolder (orchard/serving/predictor.py): the serving alias re-read, a changed version loaded
and announced once, a failed load keeping the model that serves."""

from __future__ import annotations

import asyncio

import pytest

from orchard.core.settings import Settings
from orchard.serving import predictor
from orchard.serving.predictor import ModelHolder, ServingModel


def served(version: str) -> ServingModel:
    """A ServingModel with no network (enough for the holder)."""
    return ServingModel(version, {"classes": ["a"]}, net=None, prep=lambda array: array)


@pytest.fixture
def alias(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The serving alias as the holder reads it: the last item of the list."""
    versions: list[str | None] = [None]
    monkeypatch.setattr(predictor, "serving_version", lambda _s: versions[-1])
    monkeypatch.setattr(predictor, "settle_heap", lambda: None)  # the suite's heap is not the test's
    return versions


def test_watch_announces_each_model_that_starts_serving_once(alias: list[str | None]) -> None:
    def load(_s: Settings, version: str) -> ServingModel:
        if version == "broken":
            raise OSError("no such file")
        return served(version)

    holder = ModelHolder(Settings(), loader=load)
    announced: list[str] = []

    async def watch_while(versions: list[str | None]) -> None:
        task = asyncio.create_task(holder.watch(0.01, lambda model: announced.append(model.version)))
        for version in versions:
            alias.append(version)
            await asyncio.sleep(0.08)  # several refreshes per alias
        task.cancel()

    asyncio.run(watch_while(["v1", "v1", "broken", "v2"]))
    assert announced == ["v1", "v2"]  # the same version is not announced again; a failed load is not
    assert holder.current is not None and holder.current.version == "v2" and holder.problem is None
