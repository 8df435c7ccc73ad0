"""compose/docker-compose.yml, checked by the real compose CLI (`config` needs no engine).

The first tests validate and inspect the resolved model; the broken-copy tests prove that the same
validation fails on a damaged file, so a green run means something.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compose_checks import COMPOSE_FILE, IMAGES_DIR, compose_argv, run
from config_renderings import compose_es_settings, compose_nginx_conf
from orchard.core.settings import ENV_PREFIX, Settings
from orchard.core.toolchain import REPO_ROOT
from orchard.stack.services import WEBHOOK_TARGET

MINIO_NODES = ["minio1", "minio2", "minio3", "minio4"]
ES_NODES = ["es01", "es02", "es03"]
EXPECTED_SERVICES = {
    *MINIO_NODES,
    "minio-lb",
    "minio-setup",
    "es-certs",
    *ES_NODES,
    "es-setup",
    "kibana",
    "kibana-setup",
    "orchard-setup",
    "spark-master",
    "spark-worker",
    "serve",
    "spark-app",
    "uploader",
}
APP_SERVICES = ["orchard-setup", "serve", "spark-app", "uploader"]
LONG_RUNNING = [*MINIO_NODES, "minio-lb", *ES_NODES, "kibana", "spark-master", "spark-worker", "serve"]


def config_errors(compose_bin: Path, env_file: Path, compose_file: Path) -> str:
    """`config -q` of `compose_file` (paths resolved from compose/); the error text, '' if valid."""
    result = run([*compose_argv(compose_bin, env_file, compose_file, COMPOSE_FILE.parent), "config", "-q"])
    return "" if result.returncode == 0 else (result.stderr or result.stdout or f"exit {result.returncode}")


def test_compose_config_is_valid(compose_bin, env_file):
    assert config_errors(compose_bin, env_file, COMPOSE_FILE) == ""


def test_every_service_of_the_topology_is_defined(compose_config):
    assert set(compose_config["services"]) == EXPECTED_SERVICES


def test_minio_nodes_form_one_erasure_coded_deployment(compose_config, versions):
    for name in MINIO_NODES:
        service = compose_config["services"][name]
        assert "http://minio{1...4}:9000/data" in service["command"]
        assert service["build"]["args"]["MINIO_VERSION"] == versions["MINIO_VERSION"]
        assert service["build"]["args"]["MC_VERSION"] == versions["MC_VERSION"]
        assert "/minio/health/live" in " ".join(service["healthcheck"]["test"])
        assert any(v["type"] == "volume" and v["target"] == "/data" for v in service["volumes"])


def test_minio_lb_is_the_single_s3_endpoint(compose_config):
    services = compose_config["services"]
    lb = services["minio-lb"]
    assert {n: d["condition"] for n, d in lb["depends_on"].items()} == dict.fromkeys(MINIO_NODES, "service_healthy")
    for name in APP_SERVICES:
        assert services[name]["environment"]["ORCHARD_S3_ENDPOINT"] == "http://minio-lb:9000"
    conf = compose_nginx_conf(compose_config)  # as the minio-lb container renders its template
    assert sorted(re.findall(r"server (minio\d):9000", conf)) == MINIO_NODES


def test_elastic_images_are_exactly_the_native_version(compose_config, versions):
    services = compose_config["services"]
    for name in [*ES_NODES, "es-certs", "es-setup"]:
        assert services[name]["image"] == f"docker.elastic.co/elasticsearch/elasticsearch:{versions['ES_VERSION']}"
    for name in ["kibana", "kibana-setup"]:
        assert services[name]["image"] == f"docker.elastic.co/kibana/kibana:{versions['ES_VERSION']}"


def test_elasticsearch_nodes_are_secure_and_bounded(compose_config, env_values):
    for name in ES_NODES:
        service = compose_config["services"][name]
        env = service["environment"]
        settings, _ = compose_es_settings(compose_config, name)  # the template, as the node reads it
        assert settings["node.name"] == name
        assert settings["cluster.initial_master_nodes"] == ",".join(ES_NODES)
        assert settings["xpack.security.enabled"] == "true"
        assert settings["bootstrap.memory_lock"] == "true"
        assert env["xpack.security.http.ssl.enabled"] == "true"
        assert env["xpack.security.transport.ssl.enabled"] == "true"
        assert env["xpack.security.http.ssl.certificate"] == f"certs/{name}/{name}.crt"
        assert env["ELASTIC_PASSWORD"] == env_values["ELASTIC_PASSWORD"]
        assert re.fullmatch(r"-Xms(\S+) -Xmx\1", env["ES_JAVA_OPTS"])
        assert service["mem_limit"]
        assert "https://localhost:9200" in " ".join(service["healthcheck"]["test"])


def test_published_ports_bind_to_loopback(compose_config):
    published = [(n, p) for n, s in compose_config["services"].items() for p in s.get("ports", [])]
    assert published, "the stack publishes no port at all"
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_long_running_services_have_healthchecks(compose_config):
    for name in LONG_RUNNING:
        check = compose_config["services"][name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_dependencies_wait_for_health_or_completion(compose_config):
    allowed = {"service_healthy", "service_completed_successfully"}
    for name, service in compose_config["services"].items():
        for dep, spec in service.get("depends_on", {}).items():
            assert spec["condition"] in allowed, f"{name} -> {dep}: {spec['condition']}"
            if spec["condition"] == "service_healthy":
                assert compose_config["services"][dep].get("healthcheck"), f"{name} waits on {dep}'s health"


def test_app_services_use_only_native_settings_names(compose_config):
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    required = {
        "ORCHARD_S3_ENDPOINT",
        "ORCHARD_S3_ACCESS_KEY",
        "ORCHARD_S3_SECRET_KEY",
        "ORCHARD_ES_HOSTS",
        "ORCHARD_ES_USERNAME",
        "ORCHARD_ES_PASSWORD",
        "ORCHARD_ES_CA_CERT",
        "ORCHARD_SPARK_MASTER",
    }
    for name in APP_SERVICES:
        env = compose_config["services"][name]["environment"]
        names = {k for k in env if k.startswith(ENV_PREFIX)}
        assert names <= known, f"{name}: not settings of orchard/settings.py: {sorted(names - known)}"
        assert required <= names, f"{name} lacks {sorted(required - names)}"
        assert env["ORCHARD_ES_HOSTS"] == "https://es01:9200,https://es02:9200,https://es03:9200"
        assert env["ORCHARD_SPARK_MASTER"] == "spark://spark-master:7077"


def test_each_service_gets_its_own_scoped_s3_key(compose_config, env_values):
    services = compose_config["services"]
    assert services["uploader"]["environment"]["ORCHARD_S3_ACCESS_KEY"] == env_values["UPLOADER_S3_ACCESS_KEY"]
    for name in ["spark-app", "orchard-setup"]:
        assert services[name]["environment"]["ORCHARD_S3_ACCESS_KEY"] == env_values["SPARK_S3_ACCESS_KEY"]
    assert services["serve"]["environment"]["ORCHARD_S3_ACCESS_KEY"] == env_values["SERVE_S3_ACCESS_KEY"]
    assert services["serve"]["environment"]["ORCHARD_S3_SECRET_KEY"] == env_values["SERVE_S3_SECRET_KEY"]
    root_secret = env_values["MINIO_ROOT_PASSWORD"]
    for name, service in services.items():
        if name in {*MINIO_NODES, "minio-setup"}:
            continue
        assert root_secret not in str(service.get("environment", {})), f"{name} holds the MinIO root password"


def test_build_args_are_the_pins_and_declared_in_the_dockerfiles(compose_config, versions):
    built = {n: s["build"] for n, s in compose_config["services"].items() if "build" in s}
    assert built, "no service is built"
    for name, build in built.items():
        dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
        declared = set(re.findall(r"^ARG\s+([A-Z0-9_]+)", dockerfile.read_text(), re.M))
        for arg, value in (build.get("args") or {}).items():
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of {dockerfile}"
            if arg in versions:
                assert value == versions[arg], f"{name}: {arg}={value}, deps/versions.env says {versions[arg]}"


def test_every_dockerfile_is_built_by_some_service(compose_config):
    built = {
        (Path(s["build"]["context"]) / s["build"].get("dockerfile", "Dockerfile")).resolve()
        for s in compose_config["services"].values()
        if "build" in s
    }
    assert built == {p.resolve() for p in IMAGES_DIR.glob("*/Dockerfile")}


def test_serve_is_the_rest_api_behind_its_key(compose_config, env_values):
    """`orchard serve` through the entrypoint's `orchard` role, on all interfaces inside the
    container (so predictions need the API key, from .env), published on loopback, healthy when
    /healthz answers, and only once the indices and buckets exist."""
    serve = compose_config["services"]["serve"]
    env = serve["environment"]
    assert serve["command"][:2] == ["orchard", "serve"] and not serve.get("entrypoint")  # the image's
    assert env["ORCHARD_SERVE_HOST"] == "0.0.0.0"
    assert env["ORCHARD_SERVE_API_KEY"] == env_values["ORCHARD_SERVE_API_KEY"]
    assert len(env_values["ORCHARD_SERVE_API_KEY"]) == 32
    [port] = serve["ports"]
    assert (port["target"], port["published"], port["host_ip"]) == (8600, "8600", "127.0.0.1")
    assert serve["healthcheck"]["test"] == ["CMD", "curl", "-fsS", "http://127.0.0.1:8600/healthz"]
    assert serve["depends_on"]["orchard-setup"]["condition"] == "service_completed_successfully"
    assert serve["depends_on"]["minio-lb"]["condition"] == "service_healthy"
    assert any(v["target"] == "/certs" and v.get("read_only") for v in serve["volumes"]), "ES is TLS: needs the CA"
    [state] = [v for v in serve["volumes"] if v["target"] == "/home/orchard/state"]  # the image's ORCHARD_HOME
    assert state["type"] == "volume" and not state.get("read_only"), "the events inbox must outlive the container"
    assert serve["mem_limit"] and serve["restart"] == "unless-stopped"


def test_minio_nodes_send_image_events_to_serve(compose_config, env_values):
    """Auto-enrichment in compose: every node has the native stack's webhook target (same id, so
    setup.sh's subscription matches it) aimed at serve's /v1/events with the API key, and keeps
    undelivered events on its own volume (MinIO requires identical settings on all nodes)."""
    serve_port = compose_config["services"]["serve"]["ports"][0]["target"]
    var = f"MINIO_NOTIFY_WEBHOOK_{{}}_{WEBHOOK_TARGET}"
    for node in MINIO_NODES:
        service = compose_config["services"][node]
        env = service["environment"]
        assert env[var.format("ENABLE")] == "on"
        assert env[var.format("ENDPOINT")] == f"http://serve:{serve_port}/v1/events"
        assert env[var.format("AUTH_TOKEN")] == env_values["ORCHARD_SERVE_API_KEY"]
        [events] = [v for v in service["volumes"] if v["target"] == env[var.format("QUEUE_DIR")]]
        assert events["type"] == "volume" and events["source"] == f"{node}-events"
    assert "chown minio:minio /data /events" in (IMAGES_DIR / "minio" / "Dockerfile").read_text()


def test_serve_s3_key_reads_images_and_models_and_writes_only_the_predictions_table():
    """The serve policy of images/minio/setup.sh grants reads on the images and models buckets and
    writes (no delete) under the lake's predictions table only (checked for real against MinIO in
    test_minio_setup.py)."""
    script = (IMAGES_DIR / "minio" / "setup.sh").read_text()
    body = re.search(r"^serve_policy\(\) \{\n(.*?)^\}$", script, re.M | re.S)
    assert body, "setup.sh has no serve_policy"
    actions = set(re.findall(r'"(s3:[A-Za-z]+)"', body.group(1)))
    assert actions == {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject", "s3:PutObject"}
    assert set(re.findall(r'objects_arn "\$([A-Z]+)"', body.group(1))) == {"IMAGES", "MODELS"}
    assert re.findall(r'objects_arn "\$LAKE([^"]*)"', body.group(1)) == ["/predictions"]
    assert 'grant orchard-serve serve_policy "$SERVE_S3_ACCESS_KEY" "$SERVE_S3_SECRET_KEY"' in script


def test_spark_workers_scale(compose_config):
    worker = compose_config["services"]["spark-worker"]
    assert "container_name" not in worker and not worker.get("ports"), "a fixed name or port breaks --scale"
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["spark-master"]["condition"] == "service_healthy"


def test_jobs_are_profiles_and_submit_to_the_master(compose_config):
    services = compose_config["services"]
    for name in ["spark-app", "uploader"]:
        assert services[name]["profiles"] == ["jobs"]
    assert services["spark-app"]["entrypoint"][-1] == "submit"


def test_bind_mounts_exist(compose_config):
    for name, service in compose_config["services"].items():
        for volume in service.get("volumes", []):
            source = Path(volume.get("source", ""))
            if volume["type"] == "bind" and source.is_relative_to(REPO_ROOT / "images"):
                assert source.exists(), f"{name} mounts missing {source}"


def test_a_missing_secret_stops_compose(compose_bin, env_file, tmp_path):
    broken_env = tmp_path / ".env"
    broken_env.write_text(re.sub(r"^ELASTIC_PASSWORD=.*$", "ELASTIC_PASSWORD=", env_file.read_text(), flags=re.M))
    assert "run make secrets" in config_errors(compose_bin, broken_env, COMPOSE_FILE)


# --- broken copies: the validator must reject each -------------------------------------------
BREAKAGES = {
    "depends on an undefined service": (
        "    depends_on:\n      es-setup: {condition: service_completed_successfully}\n",
        "    depends_on:\n      es-setupp: {condition: service_completed_successfully}\n",
    ),
    "misspelt service key": ("  minio-lb:\n    build:", "  minio-lb:\n    biuld:"),
    "invalid YAML": ("services:\n", "services:\n  - [\n"),
    "wrong type for a port": (
        'ports: ["${ORCHARD_BIND_HOST:-127.0.0.1}:${KIBANA_PORT:-5601}:5601"]',
        "ports: {kibana: 5601}",
    ),
    "unknown depends_on condition": ("minio-lb: {condition: service_healthy}", "minio-lb: {condition: service_ready}"),
}


def test_an_unmodified_copy_passes(compose_bin, env_file, tmp_path):
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(COMPOSE_FILE.read_text())
    assert config_errors(compose_bin, env_file, copy) == ""


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_copy_fails(compose_bin, env_file, tmp_path, breakage):
    old, new = BREAKAGES[breakage]
    text = COMPOSE_FILE.read_text()
    assert old in text, f"the breakage {breakage!r} no longer applies: update the test"
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text.replace(old, new, 1))
    assert config_errors(compose_bin, env_file, copy) != ""


def test_every_service_says_why_it_exists():
    """A "# Why:" comment block right above each service definition (house style of the file)."""
    lines = COMPOSE_FILE.read_text().splitlines()
    start = lines.index("services:")
    end = next(i for i in range(start + 1, len(lines)) if re.match(r"^[a-z]", lines[i]))
    for number in range(start + 1, end):
        match = re.match(r"^  ([a-z0-9-]+):\s*$", lines[number])
        if not match:
            continue
        above = number - 1
        while above > start and lines[above].startswith("  #") and not lines[above].startswith("  # Why:"):
            above -= 1
        assert lines[above].startswith("  # Why:"), f"service {match.group(1)} has no '# Why:' comment"


def test_local_images_are_never_pulled(compose_config):
    for name, service in compose_config["services"].items():
        if "build" in service:
            assert service.get("pull_policy") == "build", f"{name} could pull someone else's {service['image']}"
