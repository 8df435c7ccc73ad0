"""The native stack is the real topology: 4-drive erasure set, 3-node ES, Spark with 2 workers."""

from __future__ import annotations

import io
import os
import signal
import uuid

import pytest

from orchard.core.clients import es_client, s3_client
from orchard.core.health import get_json
from orchard.core.index_alias import number_of
from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain
from orchard.stack import launcher, process
from orchard.stack.mc import mc_json
from orchard.stack.services import Layout, s3a_conf
from orchard.stack.setup import template_bodies

pytestmark = pytest.mark.integration


def node_client(s: Settings, index: int):
    """A MinIO client talking to node `index` directly, bypassing the load balancer."""
    return s3_client(s.model_copy(update={"s3_endpoint": f"http://{s.bind_host}:{s.minio_node_port + index}"}))


def test_minio_is_one_erasure_set_of_four_online_drives(stack: Settings):
    info = mc_json(stack, "admin", "info", "orchard")[0]["info"]
    backend = info["backend"]
    assert backend["backendType"] == "Erasure"
    assert backend["onlineDisks"] == 4 and backend["offlineDisks"] == 0
    assert backend["totalSets"] == [1] and backend["totalDrivesPerSet"] == [4]
    assert len(info["servers"]) == 4


def test_object_written_through_one_node_reads_back_through_another(stack: Settings):
    key = f"stack-test/{uuid.uuid4().hex}.bin"
    payload = os.urandom(256 * 1024)
    node_client(stack, 0).put_object(stack.images_bucket, key, io.BytesIO(payload), len(payload))
    try:
        response = node_client(stack, 2).get_object(stack.images_bucket, key)
        assert response.read() == payload
    finally:
        s3_client(stack).remove_object(stack.images_bucket, key)


def test_elasticsearch_green_with_three_nodes_and_templates(stack: Settings):
    es = es_client(stack)
    health = es.cluster.health()
    assert health["status"] == "green"
    assert health["number_of_nodes"] == 3
    nodes = es.nodes.info()["nodes"].values()
    assert all("master" in node["roles"] for node in nodes)
    for name, body in template_bodies(stack).items():
        got = es.indices.get_index_template(name=name)["index_templates"][0]["index_template"]
        assert got["index_patterns"] == body["index_patterns"]
        assert got["template"]["mappings"]["dynamic"] == "strict"
    # the images index is an alias of numbered indices (what `orchard reindex` swaps)
    behind = es.indices.get_alias(name=stack.images_index)
    assert behind and all(number_of(stack.images_index, name) for name in behind)


def test_spark_master_lists_two_alive_workers(stack: Settings):
    master = get_json(f"http://{stack.bind_host}:{stack.spark_ui_port}/json/")
    alive = [w for w in master["workers"] if w["state"] == "ALIVE"]
    assert master["status"] == "ALIVE"
    assert len(alive) == stack.spark_workers == 2


@pytest.fixture()
def s3a_objects(stack: Settings):
    """37 small objects under a unique prefix, removed afterwards."""
    prefix = f"stack-test-{uuid.uuid4().hex[:8]}"
    client = s3_client(stack)
    keys = [f"{prefix}/part-{i:03d}.txt" for i in range(37)]
    for key in keys:
        data = f"line of {key}\n".encode()
        client.put_object(stack.images_bucket, key, io.BytesIO(data), len(data))
    yield prefix, keys
    for key in keys:
        client.remove_object(stack.images_bucket, key)


def test_spark_job_on_the_cluster_counts_objects_through_s3a(stack: Settings, s3a_objects):
    from pyspark.sql import SparkSession

    prefix, keys = s3a_objects
    tools = Toolchain.from_cache(stack.cache_dir)
    os.environ.setdefault("SPARK_CONF_DIR", str(Layout(stack.home).conf / "spark"))
    builder = SparkSession.builder.master(stack.spark_master_url).appName("orchard-stack-test")
    for key, value in s3a_conf(stack).items():
        builder = builder.config(key, value)
    spark = (
        builder.config("spark.hadoop.fs.s3a.access.key", stack.s3_access_key.get_secret_value())
        .config("spark.hadoop.fs.s3a.secret.key", stack.s3_secret_key.get_secret_value())
        .config("spark.pyspark.python", str(tools.python))
        .config("spark.executor.memory", "1g")
        .getOrCreate()
    )
    try:
        rdd = spark.sparkContext.binaryFiles(f"s3a://{stack.images_bucket}/{prefix}/", minPartitions=4)
        names = rdd.map(lambda kv: kv[0].rsplit("/", 1)[-1])
        assert names.count() == len(keys)
        # The work ran on the cluster's executors, not in the driver.
        executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
        assert executors >= 2
    finally:
        spark.stop()


def test_sigkill_one_minio_node_keeps_every_object_readable(stack: Settings):
    client = s3_client(stack)
    prefix = f"stack-kill-{uuid.uuid4().hex[:8]}"
    objects = {f"{prefix}/{i}.bin": os.urandom(64 * 1024 + i) for i in range(20)}
    for key, data in objects.items():
        client.put_object(stack.images_bucket, key, io.BytesIO(data), len(data))
    pid = process.running_pid(Layout(stack.home).pid_file("minio2"))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        assert process.wait_until(lambda: process.running_pid(Layout(stack.home).pid_file("minio2")) is None, 10)
        rows = {r.service: r for r in launcher.status(stack)}
        assert rows["minio2"].health == "down"
        assert rows["minio1"].health == "healthy"
        for key, data in objects.items():  # through the load balancer, which skips the dead node
            assert client.get_object(stack.images_bucket, key).read() == data
    finally:
        launcher.up(stack)
    rows = {r.service: r for r in launcher.status(stack)}
    assert rows["minio2"].health == "healthy"
    for key, data in objects.items():
        assert node_client(stack, 1).get_object(stack.images_bucket, key).read() == data
        client.remove_object(stack.images_bucket, key)
