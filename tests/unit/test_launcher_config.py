"""Generated configuration of the native topology (pure functions, no processes)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from orchard.core import config_templates
from orchard.core.clients import s3a_conf
from orchard.core.errors import ConfigError, ExitStatus
from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain, read_versions
from orchard.stack import process
from orchard.stack.services import Layout, es_config, lb_service, minio_services, spark_services
from orchard.stack.setup import template_bodies


@pytest.fixture()
def env(tmp_path):
    s = Settings(home=tmp_path / "home", cache_dir=tmp_path / "cache")
    tools = Toolchain(cache_dir=s.cache_dir, versions=read_versions())
    return s, tools, Layout(s.home)


def test_versions_are_pinned():
    pins = read_versions()
    for key in (
        "MINIO_VERSION",
        "MC_VERSION",
        "ES_VERSION",
        "ES_ZIP_SHA256",
        "HADOOP_VERSION",
        "AWS_SDK_BUNDLE_VERSION",
        "HADOOP_AWS_SHA256",
        "AWS_SDK_BUNDLE_SHA256",
    ):
        assert pins.get(key), key
    assert pins["ES_VERSION"].split(".")[0] == "8"


def test_minio_nodes_share_one_endpoint_list(env):
    s, tools, layout = env
    creds = {"ORCHARD_S3_ACCESS_KEY": "k", "ORCHARD_S3_SECRET_KEY": "secret", "ORCHARD_SERVE_API_KEY": "token"}
    nodes = minio_services(s, tools, layout, creds)
    assert [n.port for n in nodes] == [9001, 9002, 9003, 9004]
    # MinIO refuses to form a deployment whose nodes' MINIO_* variables differ (webhook target included)
    settings = {tuple(sorted((k, v) for k, v in n.env.items() if k.startswith("MINIO_"))) for n in nodes}
    assert len(settings) == 1
    assert nodes[0].env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_ORCHARD"] == "http://127.0.0.1:8600/v1/events"
    assert nodes[0].env["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_ORCHARD"] == "token"
    endpoint_lists = {tuple(a for a in n.argv if a.startswith("http://")) for n in nodes}
    assert len(endpoint_lists) == 1 and len(next(iter(endpoint_lists))) == 4
    assert all(n.env["_MINIO_SERVER_LOCAL"] == f"127.0.0.1:{n.port}" for n in nodes)
    assert all("secret" not in " ".join(n.argv) for n in nodes)  # credentials only in the env


def test_load_balancer_lists_every_node(env):
    s, tools, layout = env
    lb = lb_service(s, tools, layout)
    conf = next(iter(lb.files.values()))
    assert [f"server 127.0.0.1:{9001 + i} max_fails=1 fail_timeout=5s;" in conf for i in range(4)] == [True] * 4
    assert f"listen 127.0.0.1:{s.minio_port};" in conf


def test_native_nginx_runs_in_the_foreground_under_the_stack_home(env):
    s, tools, layout = env
    conf = next(iter(lb_service(s, tools, layout).files.values()))
    assert "\ndaemon off;\n" in conf
    assert f"\npid {layout.tmp / 'nginx'}/nginx.pid;\n" in conf
    assert f"client_body_temp_path {layout.tmp / 'nginx'}/body;" in conf
    assert "proxy_set_header Host $http_host;" in conf  # nginx's own variables are not placeholders
    assert "${" not in conf


def test_es_nodes_discover_each_other(env):
    s, _, layout = env
    configs = [es_config(s, layout, i) for i in range(3)]
    # Lists as comma-separated strings: Elasticsearch's rule for substituted values (compose).
    assert all("\ndiscovery.seed_hosts: 127.0.0.1:9300,127.0.0.1:9301,127.0.0.1:9302\n" in c for c in configs)
    assert all("\ncluster.initial_master_nodes: es01,es02,es03\n" in c for c in configs)
    assert [f"\nhttp.port: {9200 + i}\n" in c for i, c in enumerate(configs)] == [True] * 3
    assert all("\nxpack.security.enabled: false\n" in c and "${" not in c for c in configs)


def test_es_write_queue_size_is_optional(env):
    s, _, layout = env
    assert "\nthread_pool.write.queue_size:" not in es_config(s, layout, 0)
    tiny = s.model_copy(update={"es_write_queue_size": 2})
    assert es_config(tiny, layout, 0).endswith("\nthread_pool.write.queue_size: 2\n")


def test_spark_workers_register_with_the_master(env):
    s, tools, layout = env
    services = spark_services(s.model_copy(update={"spark_workers": 3}), tools, layout)
    master, workers = services[0], services[1:]
    assert master.name == "spark-master" and len(workers) == 3
    assert all(w.argv[-1] == "spark://127.0.0.1:7077" for w in workers)
    assert [w.port for w in workers] == [8081, 8082, 8083]


def test_spark_defaults_are_the_template_with_the_sessions_s3a_settings(env):
    s, tools, layout = env
    services = spark_services(s, tools, layout)
    path = layout.conf / "spark" / "spark-defaults.conf"
    conf = services[0].files[path]
    assert all(service.files[path] == conf for service in services)  # a restarted worker finds it
    properties = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert s3a_conf(s).items() <= properties.items()
    assert properties["spark.master"] == "spark://127.0.0.1:7077"
    assert properties["spark.driver.extraClassPath"] == ":".join(str(j) for j in tools.jars)
    assert properties["spark.worker.cleanup.enabled"] == "true"
    assert "SPARK_WORKER_OPTS" not in services[1].env  # the cleanup settings live in the file now
    secure = s.model_copy(update={"s3_endpoint": "https://s3.example.com"})
    secure_conf = spark_services(secure, tools, layout)[0].files[path]
    assert "spark.hadoop.fs.s3a.connection.ssl.enabled    true\n" in secure_conf


def test_render_fills_placeholders_and_names_every_unset_one():
    text = "a ${ONE} $http_host ${host} ${TWO}\n"
    assert config_templates.placeholders(text) == {"ONE", "TWO"}
    assert config_templates.render(text, {"ONE": 1, "TWO": "b"}) == "a 1 $http_host ${host} b\n"
    with pytest.raises(ConfigError, match=r"^x\.template: ONE, TWO are not set$"):
        config_templates.render(text, {}, source="x.template")
    with pytest.raises(ConfigError, match="TWO is not set"):
        config_templates.render(text, {"ONE": 1})


def test_render_command_uses_the_environment(tmp_path, monkeypatch, capsys):
    template, out = tmp_path / "t.conf.template", tmp_path / "t.conf"
    template.write_text("key ${ORCHARD_TEST_VALUE}\n")
    monkeypatch.delenv("ORCHARD_TEST_VALUE", raising=False)
    assert config_templates.main([str(template), str(out)]) == ExitStatus.CONFIG
    assert "ORCHARD_TEST_VALUE is not set" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("ORCHARD_TEST_VALUE", "v")
    assert config_templates.main([str(template), str(out)]) == 0
    assert out.read_text() == "key v\n"


def test_templates_target_the_configured_indices(env):
    s, _, _ = env
    bodies = template_bodies(s.model_copy(update={"images_index": "fruit-images"}))
    assert set(bodies) == {"fruit-images", "orchard-models"}
    # the images index is an alias of numbered indices (orchard reindex), which the template covers
    assert bodies["fruit-images"]["index_patterns"] == ["fruit-images", "fruit-images-*"]
    assert bodies["orchard-models"]["index_patterns"] == ["orchard-models"]
    assert all(not k.startswith("_") for b in bodies.values() for k in b["template"])
    assert bodies["fruit-images"]["template"]["mappings"]["dynamic"] == "strict"


def test_spawn_and_stop_a_real_process(tmp_path):
    pid_file, log_file = tmp_path / "sleeper.pid", tmp_path / "sleeper.log"
    pid = process.spawn(
        [sys.executable, "-c", "print('hello', flush=True); import time; time.sleep(60)"], {}, log_file, pid_file
    )
    assert process.running_pid(pid_file) == pid
    assert process.wait_until(lambda: process.last_line(log_file) == "hello", 10, 0.1)
    assert process.stop(pid_file, grace=5)
    assert process.running_pid(pid_file) is None and not pid_file.exists()


def test_a_recycled_pid_is_not_ours(tmp_path):
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(json.dumps({"pid": 1, "create_time": time.time() - 12345}))
    assert process.running_pid(pid_file) is None
    assert process.stop(pid_file) is False  # never signals a process we did not start


def test_spark_drivers_bind_to_the_stack_address(env):
    s, tools, layout = env
    master = spark_services(s, tools, layout)[0]
    spark_env = master.files[layout.conf / "spark" / "spark-env.sh"]
    assert f"export SPARK_LOCAL_IP={s.bind_host}\n" in spark_env
    everywhere = spark_services(s.model_copy(update={"bind_host": "0.0.0.0"}), tools, layout)[0]
    assert "SPARK_LOCAL_IP" not in everywhere.files[layout.conf / "spark" / "spark-env.sh"]
