"""Health probes of the native stack: per process, then per cluster."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from orchard.core.settings import Settings


@dataclass(frozen=True)
class Probe:
    """The verdict of one probe: healthy or not, and why not."""

    ok: bool
    detail: str = ""


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET `url`; returns (status, body). Connection failures raise OSError."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def probe_url(url: str) -> Probe:
    """Healthy when `url` answers 200."""
    try:
        status, _ = http_get(url)
    except OSError as exc:
        return Probe(False, f"{url}: {getattr(exc, 'reason', exc)}")
    return Probe(status == 200, "" if status == 200 else f"{url}: HTTP {status}")


def get_json(url: str) -> Any:
    """GET and decode JSON (raises OSError or ValueError)."""
    status, body = http_get(url)
    if status != 200:
        raise OSError(f"{url}: HTTP {status}")
    return json.loads(body)


def probe_minio_cluster(s: Settings) -> Probe:
    """The erasure-coded deployment has write quorum, seen through the load balancer."""
    return probe_url(f"{s.s3_url}/minio/health/cluster")


def probe_es_cluster(s: Settings) -> Probe:
    """The Elasticsearch cluster is green with every node joined."""
    for url in s.es_urls:
        try:
            health = get_json(f"{url}/_cluster/health")
        except (OSError, ValueError):
            continue
        nodes, status = health.get("number_of_nodes"), health.get("status")
        if status == "green" and nodes == s.es_nodes:
            return Probe(True)
        return Probe(False, f"elasticsearch cluster {status} with {nodes}/{s.es_nodes} nodes")
    return Probe(False, "no elasticsearch node answers")


def probe_spark_cluster(s: Settings) -> Probe:
    """The Spark master is ALIVE with every worker registered and ALIVE."""
    try:
        master = get_json(f"http://{s.bind_host}:{s.spark_ui_port}/json/")
    except (OSError, ValueError) as exc:
        return Probe(False, f"spark master UI: {exc}")
    alive = int(master.get("aliveworkers", 0))
    if master.get("status") == "ALIVE" and alive >= s.spark_workers:
        return Probe(True)
    return Probe(False, f"spark master {master.get('status')} with {alive}/{s.spark_workers} workers")


CLUSTER_PROBES = {
    "minio": probe_minio_cluster,
    "elasticsearch": probe_es_cluster,
    "spark": probe_spark_cluster,
}
