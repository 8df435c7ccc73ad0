"""The native topology: what each process of the stack runs, with which config, on which port.

Names match the compose services (minio1..4, es01..03, spark-master, spark-worker-N), and
`minio-lb` is the single S3 endpoint (nginx), like the load balancer in compose.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from orchard.core.clients import s3a_conf
from orchard.core.config_templates import render_file
from orchard.core.settings import Settings
from orchard.core.toolchain import REPO_ROOT, Toolchain


@dataclass(frozen=True)
class Service:
    """One process of the stack."""

    name: str
    kind: str  # minio | lb | elasticsearch | spark-master | spark-worker
    argv: list[str]
    port: int
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)  # config written before start
    run_as: str | None = None  # unprivileged user owning the service's directories
    cwd: Path | None = None


@dataclass(frozen=True)
class Layout:
    """Directories of a native stack under ORCHARD_HOME."""

    home: Path

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def conf(self) -> Path:
        return self.home / "conf"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def base_env(tools: Toolchain) -> dict[str, str]:
    """A minimal, explicit environment for child processes (PATH, locale, Java)."""
    keep = {k: v for k, v in os.environ.items() if k in {"PATH", "LANG", "LC_ALL", "TZ", "USER"}}
    keep.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    keep["HOME"] = str(Path.home())
    keep["JAVA_HOME"] = str(tools.java_home)
    return keep


def minio_services(s: Settings, tools: Toolchain, layout: Layout, creds: dict[str, str]) -> list[Service]:
    """4 MinIO server processes forming one distributed, erasure-coded deployment."""
    endpoints = [
        f"http://{s.bind_host}:{s.minio_node_port + i}{layout.data / f'minio{i + 1}'}" for i in range(s.minio_nodes)
    ]
    services = []
    for i in range(s.minio_nodes):
        port = s.minio_node_port + i
        env = (
            base_env(tools)
            | {
                "MINIO_ROOT_USER": creds["ORCHARD_S3_ACCESS_KEY"],
                "MINIO_ROOT_PASSWORD": creds["ORCHARD_S3_SECRET_KEY"],
                # All four drives live on one disk here; MinIO refuses root-disk drives otherwise.
                "MINIO_CI_CD": "on",
                "MINIO_UPDATE": "off",
                # Inside a container (this machine, CI) MinIO treats loopback endpoints as unresolved
                # and waits forever; this names the endpoint that is this process's own.
                "_MINIO_SERVER_LOCAL": f"{s.bind_host}:{port}",
            }
            | webhook_env(s, layout, creds)
        )
        argv = [
            str(tools.minio),
            "server",
            "--quiet",
            "--address",
            f"{s.bind_host}:{port}",
            "--console-address",
            f"{s.bind_host}:{s.minio_console_port + i}",
            *endpoints,
        ]
        services.append(
            Service(
                name=f"minio{i + 1}",
                kind="minio",
                argv=argv,
                port=port,
                env=env,
                health_url=f"http://{s.bind_host}:{port}/minio/health/live",
            )
        )
    return services


# The webhook target `orchard stack up` subscribes the images bucket to (orchard.stack.setup): object
# creations go to `orchard serve` (auto-enrichment, orchard/serving/enrichment.py).
WEBHOOK_TARGET = "ORCHARD"
WEBHOOK_ARN = f"arn:minio:sqs::{WEBHOOK_TARGET}:webhook"


def webhook_env(s: Settings, layout: Layout, creds: dict[str, str]) -> dict[str, str]:
    """The MinIO nodes' webhook target for `orchard serve`: its events URL, the service's API key as
    the token, and the queue directory where events wait (on disk, across restarts) while the
    service is down or answers 503. MinIO requires the same MINIO_* values on every node, so on
    one machine the nodes share the directory: an event may then be sent twice, which the
    service's idempotent writes absorb."""
    var = f"MINIO_NOTIFY_WEBHOOK_{{}}_{WEBHOOK_TARGET}"
    return {
        var.format("ENABLE"): "on",
        var.format("ENDPOINT"): f"{s.serve_url}/v1/events",
        var.format("AUTH_TOKEN"): creds["ORCHARD_SERVE_API_KEY"],
        var.format("QUEUE_DIR"): str(layout.data / "minio-events"),
        var.format("QUEUE_LIMIT"): "100000",
    }


# The templates both deployments render (compose: see each file's header).
IMAGES_DIR = REPO_ROOT / "images"
NGINX_TEMPLATE = IMAGES_DIR / "minio-lb" / "nginx.conf.template"
ES_TEMPLATE = IMAGES_DIR / "elasticsearch" / "elasticsearch.yml.template"
SPARK_DEFAULTS_TEMPLATE = IMAGES_DIR / "spark" / "spark-defaults.conf.template"

# Options of every MinIO node in the load balancer's upstream; compose's MINIO_LB_SERVERS lists the
# same (tests/static/test_config_templates.py compares the two renderings).
LB_SERVER_OPTIONS = "max_fails=1 fail_timeout=5s"


def rendered(template: Path, values: dict[str, object]) -> str:
    """`template` rendered for the native stack, headed by where it comes from."""
    head = f"# Rendered by `orchard stack up` from {template.relative_to(REPO_ROOT)}: edit that file.\n"
    return head + render_file(template, values)


def lb_config(s: Settings, layout: Layout) -> str:
    """nginx.conf of the native load balancer: pid and temp files under the stack's tmp/nginx."""
    servers = "\n    ".join(
        f"server {s.bind_host}:{s.minio_node_port + i} {LB_SERVER_OPTIONS};" for i in range(s.minio_nodes)
    )
    return rendered(
        NGINX_TEMPLATE,
        {
            "MINIO_LB_TMP": layout.tmp / "nginx",
            "MINIO_LB_LISTEN": f"{s.bind_host}:{s.minio_port}",
            "MINIO_LB_SERVERS": servers,
        },
    )


def lb_service(s: Settings, tools: Toolchain, layout: Layout) -> Service:
    """nginx as the single S3 endpoint, failing over between MinIO nodes."""
    conf = layout.conf / "nginx.conf"
    return Service(
        name="minio-lb",
        kind="lb",
        port=s.minio_port,
        env=base_env(tools),
        files={conf: lb_config(s, layout)},
        argv=[str(tools.nginx), "-c", str(conf), "-p", str(layout.home)],
        health_url=f"http://{s.bind_host}:{s.minio_port}/minio/health/live",
    )


ES_RUN_AS_USERS = ("orchard", "nobody")


def es_run_as() -> str | None:
    """The unprivileged user Elasticsearch runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for user in ES_RUN_AS_USERS:
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    return None


def drop_privileges(argv: list[str], user: str | None) -> list[str]:
    """Prefix `argv` to run as the unprivileged `user` (no-op when `user` is None)."""
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--clear-groups", "--", *argv]


def user_group(user: str) -> int:
    """The primary group id of `user`."""
    return pwd.getpwnam(user).pw_gid


def es_services(s: Settings, tools: Toolchain, layout: Layout) -> list[Service]:
    """3 master-eligible Elasticsearch nodes forming one cluster."""
    names = [f"es{i + 1:02d}" for i in range(s.es_nodes)]
    run_as = es_run_as()
    services = []
    for i, name in enumerate(names):
        port = s.es_http_port + i
        env = base_env(tools) | {
            "ES_PATH_CONF": str(layout.conf / name),
            "ES_JAVA_HOME": str(tools.java_home),
            "ES_JAVA_OPTS": f"-Xms{s.es_heap} -Xmx{s.es_heap}",
            "ES_TMPDIR": str(layout.tmp / name),
        }
        services.append(
            Service(
                name=name,
                kind="elasticsearch",
                port=port,
                env=env,
                files={layout.conf / name / "elasticsearch.yml": es_config(s, layout, i)},
                argv=drop_privileges([str(tools.es_home / "bin" / "elasticsearch")], run_as),
                health_url=f"http://{s.bind_host}:{port}/_cluster/health?local=true",
                run_as=run_as,
                cwd=layout.logs / name,
            )
        )
    return services


def es_config(s: Settings, layout: Layout, index: int) -> str:
    """elasticsearch.yml for node `index` (0-based): every node on the bind host, security off."""
    names = [f"es{i + 1:02d}" for i in range(s.es_nodes)]
    name = names[index]
    text = rendered(
        ES_TEMPLATE,
        {
            "ES_NODE_NAME": name,
            "ES_DATA_PATH": layout.data / name,
            "ES_LOGS_PATH": layout.logs / name,
            "ES_NETWORK_HOST": s.bind_host,
            "ES_HTTP_PORT": s.es_http_port + index,
            "ES_TRANSPORT_PORT": s.es_transport_port + index,
            "ES_SEED_HOSTS": ",".join(f"{s.bind_host}:{s.es_transport_port + i}" for i in range(s.es_nodes)),
            "ES_INITIAL_MASTER_NODES": ",".join(names),
            "ES_SECURITY": "false",
            "ES_MEMORY_LOCK": "false",
        },
    )
    if s.es_write_queue_size is not None:  # native only: the chaos tests' way to force 429s
        text += f"thread_pool.write.queue_size: {s.es_write_queue_size}\n"
    return text


def spark_services(s: Settings, tools: Toolchain, layout: Layout) -> list[Service]:
    """A Spark standalone master and `spark_workers` workers from pyspark's own distribution."""
    spark_class = str(tools.spark_home / "bin" / "spark-class")
    env = base_env(tools) | {
        "SPARK_HOME": str(tools.spark_home),
        "SPARK_CONF_DIR": str(layout.conf / "spark"),
        "SPARK_LOCAL_IP": s.bind_host,
        "SPARK_DAEMON_MEMORY": "512m",
        "PYSPARK_PYTHON": str(tools.python),
    }
    # Written by every Spark service: a worker restarted on its own finds it too (worker cleanup).
    defaults = {layout.conf / "spark" / "spark-defaults.conf": spark_defaults(s, tools)}
    master = Service(
        name="spark-master",
        kind="spark-master",
        port=s.spark_master_port,
        env=env,
        files={**defaults, layout.conf / "spark" / "spark-env.sh": spark_env(s)},
        argv=[
            spark_class,
            "org.apache.spark.deploy.master.Master",
            "--host",
            s.bind_host,
            "--port",
            str(s.spark_master_port),
            "--webui-port",
            str(s.spark_ui_port),
        ],
        health_url=f"http://{s.bind_host}:{s.spark_ui_port}/json/",
    )
    workers = []
    for i in range(s.spark_workers):
        ui = s.spark_worker_ui_port + i
        name = f"spark-worker-{i + 1}"
        workers.append(
            Service(
                name=name,
                kind="spark-worker",
                port=ui,
                env=env,
                files=defaults,
                argv=[
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    s.bind_host,
                    "--webui-port",
                    str(ui),
                    "--cores",
                    str(s.spark_worker_cores),
                    "--memory",
                    s.spark_worker_memory,
                    "--work-dir",
                    str(layout.data / name),
                    s.spark_master_url,
                ],
                health_url=f"http://{s.bind_host}:{ui}/json/",
            )
        )
    return [master, *workers]


def spark_env(s: Settings) -> str:
    """spark-env.sh of the native cluster, sourced by every Spark launcher using SPARK_CONF_DIR,
    including the drivers of `orchard train|infer|features`.

    Why: a driver binds its RPC, block manager and UI (which can kill jobs, unauthenticated) to
    SPARK_LOCAL_IP, and to every interface without it. The stack binds to one address, so do they.
    """
    head = "# Generated by `orchard stack up`.\n"
    if s.bind_host in ("0.0.0.0", "::", ""):  # asked to listen everywhere: let Spark pick the address
        return head
    return head + f"export SPARK_LOCAL_IP={shlex.quote(s.bind_host)}\n"


def spark_defaults(s: Settings, tools: Toolchain) -> str:
    """spark-defaults.conf of the native cluster: s3a jars and endpoint, the venv's Python.

    Credentials are not written here: the Spark app sets them from settings at session start.
    """
    s3a = s3a_conf(s)
    return rendered(
        SPARK_DEFAULTS_TEMPLATE,
        {
            "SPARK_MASTER_URL": s.spark_master_url,
            "SPARK_S3A_CLASSPATH": ":".join(str(j) for j in tools.jars),
            "PYSPARK_PYTHON": tools.python,
            "S3A_ENDPOINT": s3a["spark.hadoop.fs.s3a.endpoint"],
            "S3A_REGION": s3a["spark.hadoop.fs.s3a.endpoint.region"],
            "S3A_SSL_ENABLED": s3a["spark.hadoop.fs.s3a.connection.ssl.enabled"],
        },
    )


def serve_service(s: Settings, tools: Toolchain) -> Service:
    """`orchard serve`, the REST API, with this stack's settings: its home (credentials file, API
    key) and every ORCHARD_* variable the launcher was given (ports, hosts)."""
    orchard_env = {k: v for k, v in os.environ.items() if k.startswith("ORCHARD_")}
    env = base_env(tools) | orchard_env | {"ORCHARD_HOME": str(s.home), "PYTHONPATH": str(REPO_ROOT)}
    return Service(
        name="serve",
        kind="serve",
        port=s.serve_port,
        env=env,
        argv=[str(tools.python), "-m", "orchard", "serve", "--port", str(s.serve_port)],
        health_url=f"{s.serve_url}/healthz",
        cwd=REPO_ROOT,
    )


def all_services(s: Settings, tools: Toolchain, layout: Layout, creds: dict[str, str]) -> list[Service]:
    """Every process of the native stack, in start order."""
    return [
        *minio_services(s, tools, layout, creds),
        lb_service(s, tools, layout),
        *es_services(s, tools, layout),
        *spark_services(s, tools, layout),
        serve_service(s, tools),
    ]


def copy_es_config_dir(tools: Toolchain, dest: Path) -> None:
    """Seed a node's config dir from the distribution's (jvm.options, log4j2), once."""
    if not (dest / "jvm.options").exists():
        shutil.copytree(tools.es_home / "config", dest, dirs_exist_ok=True)
