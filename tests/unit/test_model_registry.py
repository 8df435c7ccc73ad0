"""orchard.spark_app.registry.record_inference: what an `orchard infer` run records in the models index."""

from __future__ import annotations

import logging

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import NotFoundError

from orchard.core.settings import Settings
from orchard.spark_app import registry

RUN = {
    "model_version": "cnn-20261202143000-1a2b3c4d",
    "predicted_at": "2026-12-02T15:00:00+00:00",
    "images": 400,
    "updated": 400,
    "seconds": 3.2,
    "images_per_second": 125.0,
    "table_version": 7,
}


class FakeEs:
    """Records update calls; raises `error` if given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.updates: list[dict] = []
        self.error = error

    def options(self, **kwargs) -> FakeEs:
        return self  # the writes turn the client's own retries off (ES_WRITE retries them)

    def update(self, **kwargs) -> None:
        self.updates.append(kwargs)
        if self.error is not None:
            raise self.error


def not_found() -> NotFoundError:
    meta = ApiResponseMeta(
        status=404, http_version="1.1", headers=HttpHeaders(), duration=0.0, node=NodeConfig("http", "es", 9200)
    )
    return NotFoundError(message="document_missing_exception", meta=meta, body={})


@pytest.fixture
def settings() -> Settings:
    return Settings(es_hosts="http://es:9200")


def use(monkeypatch, es: FakeEs) -> FakeEs:
    monkeypatch.setattr(registry, "es_client", lambda s: es)
    return es


def test_a_run_overwrites_the_inference_object_of_its_version(monkeypatch, settings) -> None:
    es = use(monkeypatch, FakeEs())
    registry.record_inference(settings, RUN["model_version"], RUN)
    assert es.updates == [
        {
            "index": settings.models_index,
            "id": RUN["model_version"],
            "doc": {
                "inference": {
                    "images_per_second": 125.0,
                    "images": 400,
                    "seconds": 3.2,
                    "measured_at": "2026-12-02T15:00:00+00:00",
                    "table_version": 7,
                }
            },
            "refresh": "wait_for",
        }
    ]


@pytest.mark.parametrize(
    ("version", "run"),
    [
        ("imagenet:efficientnet-lite0", RUN),  # a pretrained base has no registry document
        (RUN["model_version"], {**RUN, "images": 0, "images_per_second": 0.0}),  # nothing predicted
        (RUN["model_version"], {**RUN, "images_per_second": None}),  # no time measured
    ],
)
def test_pretrained_bases_and_runs_without_a_rate_are_not_recorded(monkeypatch, settings, version, run) -> None:
    es = use(monkeypatch, FakeEs())
    registry.record_inference(settings, version, run)
    assert es.updates == []


def test_a_version_without_a_document_is_a_warning_not_a_failure(monkeypatch, settings, caplog) -> None:
    es = use(monkeypatch, FakeEs(not_found()))
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        registry.record_inference(settings, RUN["model_version"], RUN)
    assert len(es.updates) == 1
    assert "inference rate is not recorded" in caplog.text
