"""One source for the configs both deployments use: images/*/*.template.

Each template is rendered twice, by the native launcher (orchard/stack/services.py) and as the
compose containers render it (config_renderings.py), then parsed and compared setting by setting.
Only the settings fed by the template's declared per-deployment variables may differ; everything
else, comments aside, is the same file.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from compose_checks import IMAGES_DIR, run
from config_renderings import (
    ES_CONFIG_TARGET,
    compose_es_settings,
    compose_nginx_conf,
    compose_spark_defaults,
    container_env,
    dockerfile_of,
    es_config_mount,
    final_stage,
    flat_yaml,
    nginx_directives,
    nginx_template_copy,
    spark_properties,
    spark_template_copy,
)
from orchard.core.clients import s3a_conf
from orchard.core.config_templates import placeholders
from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain, read_versions
from orchard.stack.services import (
    ES_TEMPLATE,
    NGINX_TEMPLATE,
    SPARK_DEFAULTS_TEMPLATE,
    Layout,
    es_services,
    lb_service,
    spark_services,
)

ES_NODES = ["es01", "es02", "es03"]
SPARK_SERVICES = ["spark-master", "spark-worker", "spark-app"]

# Per template: its per-deployment variables -> the settings each one may change.
NGINX_VARIABLES = {
    "MINIO_LB_TMP": {
        "pid",
        "http client_body_temp_path",
        "http proxy_temp_path",
        "http fastcgi_temp_path",
        "http uwsgi_temp_path",
        "http scgi_temp_path",
    },
    "MINIO_LB_LISTEN": {"http/server listen"},
    "MINIO_LB_SERVERS": {"http/upstream minio server"},  # addresses only: options compared below
}
ES_VARIABLES = {
    "ES_NODE_NAME": {"node.name"},
    "ES_DATA_PATH": {"path.data"},
    "ES_LOGS_PATH": {"path.logs"},
    "ES_NETWORK_HOST": {"network.host"},
    "ES_HTTP_PORT": {"http.port"},
    "ES_TRANSPORT_PORT": {"transport.port"},
    "ES_SEED_HOSTS": {"discovery.seed_hosts"},
    "ES_INITIAL_MASTER_NODES": {"cluster.initial_master_nodes"},
    "ES_SECURITY": {"xpack.security.enabled"},
    "ES_MEMORY_LOCK": {"bootstrap.memory_lock"},
}
SPARK_VARIABLES = {
    "SPARK_MASTER_URL": {"spark.master"},
    "SPARK_S3A_CLASSPATH": {"spark.driver.extraClassPath", "spark.executor.extraClassPath"},
    "PYSPARK_PYTHON": {"spark.pyspark.python", "spark.pyspark.driver.python"},
    "S3A_ENDPOINT": {"spark.hadoop.fs.s3a.endpoint"},
    "S3A_REGION": {"spark.hadoop.fs.s3a.endpoint.region"},
    "S3A_SSL_ENABLED": {"spark.hadoop.fs.s3a.connection.ssl.enabled"},
}
# Settings only one deployment has, outside the template: compose's TLS material (the native stack
# has no certificates), and the native write queue of the chaos tests (unset by default).
ES_COMPOSE_ONLY = {
    "xpack.security.http.ssl.enabled",
    "xpack.security.http.ssl.key",
    "xpack.security.http.ssl.certificate",
    "xpack.security.http.ssl.certificate_authorities",
    "xpack.security.transport.ssl.enabled",
    "xpack.security.transport.ssl.key",
    "xpack.security.transport.ssl.certificate",
    "xpack.security.transport.ssl.certificate_authorities",
    "xpack.security.transport.ssl.verification_mode",
}


@pytest.fixture()
def native(tmp_path, monkeypatch):
    """Settings (defaults only: no ORCHARD_* of the caller's shell), toolchain and layout."""
    for name in list(os.environ):
        if name.startswith("ORCHARD_"):
            monkeypatch.delenv(name)
    s = Settings(home=tmp_path / "home", cache_dir=tmp_path / "cache")
    return s, Toolchain(cache_dir=s.cache_dir, versions=read_versions()), Layout(s.home)


def nginx_settings(text: str) -> dict[str, list[tuple[str, ...]]]:
    """nginx directives by "block/block directive" (proxy_set_header: by header name too)."""
    settings: dict[str, list[tuple[str, ...]]] = {}
    for context, name, args in nginx_directives(text):
        key = f"{'/'.join(context)} {name}".strip()
        if name == "proxy_set_header":
            key = f"{key} {args[0]}"
        settings.setdefault(key, []).append(args[1:] if name == "proxy_set_header" else args)
    return settings


def native_spark_defaults(s: Settings, tools: Toolchain, layout: Layout) -> str:
    return spark_services(s, tools, layout)[0].files[layout.conf / "spark" / "spark-defaults.conf"]


def assert_same_settings(native: dict, compose: dict, variables: dict[str, set[str]]) -> None:
    """Same keys; same values except the settings the per-deployment variables feed."""
    assert set(native) == set(compose), (
        f"only native: {set(native) - set(compose)}; only compose: {set(compose) - set(native)}"
    )
    per_deployment = set().union(*variables.values())
    assert per_deployment <= set(native), f"declared but not in the config: {per_deployment - set(native)}"
    differing = {k for k in native if native[k] != compose[k]}
    assert differing <= per_deployment, {k: (native[k], compose[k]) for k in differing - per_deployment}


# --- one source ------------------------------------------------------------------------------
def test_the_templates_are_the_only_copies():
    for template in (NGINX_TEMPLATE, ES_TEMPLATE, SPARK_DEFAULTS_TEMPLATE):
        assert template.is_file() and template.parent.parent == IMAGES_DIR
    for old_copy in (IMAGES_DIR / "minio-lb" / "nginx.conf", IMAGES_DIR / "spark" / "spark-defaults.conf"):
        assert not old_copy.exists(), f"{old_copy} is a second copy of its template"


@pytest.mark.parametrize(
    ("template", "variables"),
    [(NGINX_TEMPLATE, NGINX_VARIABLES), (ES_TEMPLATE, ES_VARIABLES), (SPARK_DEFAULTS_TEMPLATE, SPARK_VARIABLES)],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_the_per_deployment_variables_are_declared(template, variables):
    assert placeholders(template.read_text()) == set(variables)


def test_compose_renders_the_templates(compose_config):
    """Each compose service consumes the template itself, where its tool renders it."""
    services = compose_config["services"]
    lb = dockerfile_of(services["minio-lb"])
    source, destination = nginx_template_copy(lb)
    assert source == NGINX_TEMPLATE and destination == "/etc/nginx/templates/nginx.conf.template"
    lb_env = container_env(compose_config, "minio-lb")
    assert lb_env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"  # renders /etc/nginx/nginx.conf
    assert all(re.search(lb_env["NGINX_ENVSUBST_FILTER"], v) for v in NGINX_VARIABLES)
    # `daemon off;` is in the template: the image's default `-g "daemon off;"` would repeat it.
    cmd = next(text for name, text in final_stage(lb) if name == "CMD")
    assert "daemon" not in cmd
    for node in ES_NODES:
        assert es_config_mount(services[node]) == ES_TEMPLATE, f"{node} does not mount {ES_CONFIG_TARGET}"
    spark = dockerfile_of(services["spark-master"])
    source, destination = spark_template_copy(spark)
    assert source == SPARK_DEFAULTS_TEMPLATE
    entrypoint = (IMAGES_DIR / "spark" / "entrypoint.sh").read_text()
    assert f"python -m orchard.core.config_templates /opt/orchard/{destination}" in entrypoint
    assert '"$SPARK_CONF_DIR/spark-defaults.conf"' in entrypoint
    assert "master|worker|submit) render_spark_defaults" in entrypoint


# --- the same settings -------------------------------------------------------------------------
def test_nginx_renders_the_same_settings(native, compose_config):
    s, tools, layout = native
    native_conf = next(iter(lb_service(s, tools, layout).files.values()))
    native_settings = nginx_settings(native_conf)
    compose_settings = nginx_settings(compose_nginx_conf(compose_config))
    assert_same_settings(native_settings, compose_settings, NGINX_VARIABLES)
    servers = "http/upstream minio server"
    assert len(native_settings[servers]) == len(compose_settings[servers]) == 4
    options = {args[1:] for args in native_settings[servers] + compose_settings[servers]}
    assert options == {("max_fails=1", "fail_timeout=5s")}, "upstream server options differ"


def test_native_nginx_keeps_its_process_settings(native):
    s, tools, layout = native
    conf = nginx_settings(next(iter(lb_service(s, tools, layout).files.values())))
    assert conf["daemon"] == [("off",)]
    assert conf["pid"] == [(f"{layout.tmp / 'nginx'}/nginx.pid",)]
    assert conf["http/server listen"] == [(f"{s.bind_host}:{s.minio_port}",)]
    assert [a[0] for a in conf["http/upstream minio server"]] == [f"127.0.0.1:{9001 + i}" for i in range(4)]


@pytest.mark.parametrize("node", ES_NODES)
def test_elasticsearch_renders_the_same_settings(native, compose_config, node):
    s, tools, layout = native
    index = ES_NODES.index(node)
    native_yml = es_services(s, tools, layout)[index].files[layout.conf / node / "elasticsearch.yml"]
    from_file, from_env = compose_es_settings(compose_config, node)
    assert_same_settings(flat_yaml(native_yml), from_file, ES_VARIABLES)
    # The template is the one place of every shared setting: compose adds only the TLS material.
    assert not set(from_env) & set(from_file), f"compose overrides template settings: {set(from_env) & set(from_file)}"
    assert set(from_env) == ES_COMPOSE_ONLY, f"settings outside the template: {set(from_env) ^ ES_COMPOSE_ONLY}"
    assert from_file["node.name"] == node and flat_yaml(native_yml)["node.name"] == node
    assert from_file["discovery.seed_hosts"] == ",".join(ES_NODES)
    assert from_file["xpack.security.enabled"] == "true"
    assert flat_yaml(native_yml)["xpack.security.enabled"] == "false"


@pytest.mark.parametrize("service", SPARK_SERVICES)
def test_spark_defaults_render_the_same_settings(native, compose_config, service):
    s, tools, layout = native
    native_conf = spark_properties(native_spark_defaults(s, tools, layout))
    compose_conf = spark_properties(compose_spark_defaults(compose_config, service))
    assert_same_settings(native_conf, compose_conf, SPARK_VARIABLES)
    assert compose_conf["spark.master"] == "spark://spark-master:7077"
    app_env = compose_config["services"]["spark-app"]["environment"]
    assert compose_conf["spark.hadoop.fs.s3a.endpoint"] == app_env["ORCHARD_S3_ENDPOINT"]
    assert compose_conf["spark.pyspark.python"] == container_env(compose_config, service)["PYSPARK_PYTHON"]
    classpath = compose_conf["spark.driver.extraClassPath"].split(":")
    versions = read_versions()
    # s3a, then Delta Lake: the image's jars by name and order, the same as the native ones.
    assert [Path(j).name for j in classpath] == [
        f"hadoop-aws-{versions['HADOOP_VERSION']}.jar",
        f"bundle-{versions['AWS_SDK_BUNDLE_VERSION']}.jar",
        f"delta-spark_2.13-{versions['DELTA_VERSION']}.jar",
        f"delta-storage-{versions['DELTA_VERSION']}.jar",
    ]
    assert [Path(j).name for j in classpath] == [j.name for j in tools.jars]
    assert compose_conf["spark.executor.extraClassPath"] == compose_conf["spark.driver.extraClassPath"]


def test_spark_defaults_match_the_sessions_s3a_settings(native, compose_config):
    """The Spark app sets the s3a settings at session start (s3a_conf): the same as this file."""
    s, tools, layout = native
    native_conf = spark_properties(native_spark_defaults(s, tools, layout))
    assert s3a_conf(s).items() <= native_conf.items()
    compose_env = compose_config["services"]["spark-app"]["environment"]
    compose_settings = s.model_copy(update={"s3_endpoint": compose_env["ORCHARD_S3_ENDPOINT"]})
    compose_conf = spark_properties(compose_spark_defaults(compose_config, "spark-app"))
    assert s3a_conf(compose_settings).items() <= compose_conf.items()


# --- both renderings are valid ------------------------------------------------------------------
def test_native_nginx_config_is_valid(native):
    s, tools, layout = native
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run `make deps`", pytrace=False)
    lb = lb_service(s, tools, layout)
    for path, text in lb.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (layout.tmp / "nginx").mkdir(parents=True)
    conf = next(iter(lb.files))
    result = run([nginx, "-t", "-q", "-c", conf, "-p", layout.home])
    assert result.returncode == 0, result.stderr
