"""Security: no default credentials, loopback-only ports, one scoped key per service, a 0600
credentials file, and no secret in any log.

The compose file is checked as the real compose CLI resolves it (no Docker engine needed) and as
written (no `${SECRET:-default}`); the scoped keys are checked by running the very minio-setup
script compose runs against the chaos MinIO and trying what each key may and may not do; the
native stack's sockets and credentials file are inspected; and every log this session produced
(services, CLI runs at -vv, Spark executors, upload reports) is grepped for the secrets.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import secrets
import stat
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from conftest import (
    COMMANDS,
    NOT_LOGS,
    REPO,
    SECRETS,
    ChaosStack,
    Ledger,
    find_secrets,
    infer_args,
    synth,
    upload_args,
)
from orchard.core.toolchain import Toolchain

pytestmark = pytest.mark.chaos

COMPOSE_FILE = REPO / "compose" / "docker-compose.yml"
ENV_TEMPLATE = REPO / "compose" / ".env.example"
MINIO_SETUP = REPO / "images" / "minio" / "setup.sh"
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|_KEY$|ENCRYPTION)")
CREDENTIAL_NAME = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|USERNAME|ENCRYPTION_KEY)")
WELL_KNOWN = ("minioadmin", "changeme", "elastic:elastic", "password123")


# --------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_env(tmp_path_factory) -> Path:
    """A compose .env written by the real `make secrets` script (random secrets)."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    result = subprocess.run(
        ["bash", str(REPO / "compose" / "make-secrets.sh"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return path


def env_values(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#")
    )


@pytest.fixture(scope="module")
def compose_model(compose_env: Path) -> dict:
    """The resolved compose model (`docker-compose config --format json`, every profile)."""
    tool = Toolchain.from_cache(Path(os.environ.get("ORCHARD_CACHE_DIR") or Path.home() / ".cache" / "orchard"))
    binary = tool.cache_dir / "bin" / "docker-compose"
    assert binary.exists(), f"{binary} is missing: run `make deps`"
    result = subprocess.run(
        [
            str(binary),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(compose_env),
            "--profile",
            "jobs",
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_has_no_default_credentials(compose_model: dict, compose_env: Path):
    text = COMPOSE_FILE.read_text()
    references = re.findall(r"\$\{([A-Z0-9_]+)(:?[-?+])?([^}]*)\}", text)
    credentials = {name: op for name, op, _ in references if CREDENTIAL_NAME.search(name)}
    assert credentials, "the compose file references no credential at all"
    defaulted = {name: op for name, op in credentials.items() if op != ":?"}
    assert not defaulted, f"credentials with a default or optional value: {defaulted}"
    template = env_values(ENV_TEMPLATE)
    filled = [k for k, v in template.items() if SECRET_NAME.search(k) and not k.endswith("ACCESS_KEY") and v]
    assert not filled, f".env.example ships secret values: {filled}"
    lowered = text.lower()
    assert not [w for w in WELL_KNOWN if w in lowered], "a well-known default credential is in the compose file"

    # Resolved: every credential in an environment block comes from the generated .env.
    generated = env_values(compose_env)
    secret_values = {generated[k] for k in generated if SECRET_NAME.search(k) and not k.endswith("ACCESS_KEY")}
    for name, service in compose_model["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not key.endswith("ACCESS_KEY") and value:
                assert value in secret_values, f"{name}.{key} is not one of the generated secrets"


def test_compose_ports_bind_to_loopback(compose_model: dict):
    published = [(n, p) for n, s in compose_model["services"].items() for p in s.get("ports", [])]
    assert published
    wide = [(n, p) for n, p in published if p.get("host_ip") != "127.0.0.1"]
    assert not wide, f"ports published beyond 127.0.0.1: {wide}"


def test_compose_gives_each_service_its_own_key(compose_model: dict, compose_env: Path):
    generated = env_values(compose_env)
    services = compose_model["services"]
    keys = {name: services[name]["environment"]["ORCHARD_S3_ACCESS_KEY"] for name in ("uploader", "spark-app")}
    assert keys == {"uploader": generated["UPLOADER_S3_ACCESS_KEY"], "spark-app": generated["SPARK_S3_ACCESS_KEY"]}
    assert len(set(keys.values())) == 2 and generated["MINIO_ROOT_USER"] not in keys.values()
    root_password = generated["MINIO_ROOT_PASSWORD"]
    for name, service in services.items():
        if name not in {"minio1", "minio2", "minio3", "minio4", "minio-setup"}:
            assert root_password not in json.dumps(service.get("environment", {})), f"{name} has the root password"


def hostile_secret(core: str) -> str:
    """A MinIO secret key (8-40 characters) around a random `core` that always starts with `-`
    (an mc flag, were it passed as an argument: token_urlsafe draws one ~3% of the time) and
    carries shell metacharacters, quotes, a backslash and spaces."""
    secret = f"-{core} $`;'\"\\"
    assert 8 <= len(secret) <= 40, len(secret)
    return secret


def test_scoped_keys_can_do_only_their_job(chaos: ChaosStack, ledger: Ledger):
    """Run images/minio/setup.sh (compose's minio-setup) on the chaos MinIO, then use each key."""
    from minio import Minio
    from minio.error import S3Error

    core = secrets.token_urlsafe(24)
    keys = {
        "uploader": ("chaos-uploader", hostile_secret(core)),
        "spark": ("chaos-spark", secrets.token_urlsafe(24)),
        "serve": ("chaos-serve", secrets.token_urlsafe(24)),
    }
    s = chaos.settings
    tools = Toolchain.from_cache(s.cache_dir)
    env = {
        **os.environ,
        "PATH": f"{tools.mc.parent}:{os.environ.get('PATH', '')}",
        "MINIO_SETUP_ENDPOINT": s.s3_url,
        "MINIO_ROOT_USER": s.s3_access_key.get_secret_value(),
        "MINIO_ROOT_PASSWORD": s.s3_secret_key.get_secret_value(),
        "UPLOADER_S3_ACCESS_KEY": keys["uploader"][0],
        "UPLOADER_S3_SECRET_KEY": keys["uploader"][1],
        "SPARK_S3_ACCESS_KEY": keys["spark"][0],
        "SPARK_S3_SECRET_KEY": keys["spark"][1],
        "SERVE_S3_ACCESS_KEY": keys["serve"][0],
        "SERVE_S3_SECRET_KEY": keys["serve"][1],
        "ORCHARD_IMAGES_BUCKET": s.images_bucket,
        "ORCHARD_FEATURES_BUCKET": s.features_bucket,
        "ORCHARD_MODELS_BUCKET": s.models_bucket,
        "ORCHARD_LAKE_BUCKET": s.lake_bucket,
    }
    setup = subprocess.run(
        ["bash", str(MINIO_SETUP)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert setup.returncode == 0, setup.stderr
    (chaos.cli_dir / "minio-setup.log").write_text(setup.stdout + setup.stderr)
    # The random core too: a copy of the secret escaped in some log is still found.
    SECRETS.update([*(v for _, v in keys.values()), core])

    host = s.s3_url.split("://", 1)[1]
    client = {
        name: Minio(host, access_key=k, secret_key=v, secure=False, region=s.s3_region) for name, (k, v) in keys.items()
    }

    def allowed(action) -> bool:
        try:
            action()
            return True
        except S3Error as exc:
            assert exc.code == "AccessDenied", exc
            return False

    def put(who: str, bucket: str, key: str = "chaos-scope/probe.txt"):
        return lambda: client[who].put_object(bucket, key, io.BytesIO(b"x"), 1)

    table_probe = "images/chaos-scope/probe.txt"  # under the default images table (s3a://<lake>/images)

    matrix = {
        ("uploader", "write images"): (put("uploader", s.images_bucket), True),
        ("uploader", "write models"): (put("uploader", s.models_bucket), False),
        ("uploader", "write features"): (put("uploader", s.features_bucket), False),
        ("uploader", "write the lake"): (put("uploader", s.lake_bucket), False),
        # `orchard upload` MERGEs its rows into the images table (delta-rs: writes, never deletes).
        ("uploader", "write the images table"): (put("uploader", s.lake_bucket, table_probe), True),
        ("uploader", "write the predictions table"): (
            put("uploader", s.lake_bucket, "predictions/chaos-scope/probe.txt"),
            False,
        ),
        ("uploader", "delete images"): (
            lambda: client["uploader"].remove_object(s.images_bucket, "chaos-scope/probe.txt"),
            False,
        ),
        ("spark", "read images"): (lambda: client["spark"].stat_object(s.images_bucket, "chaos-scope/probe.txt"), True),
        ("spark", "write images"): (put("spark", s.images_bucket), False),
        ("spark", "write features"): (put("spark", s.features_bucket), True),
        ("spark", "write models"): (put("spark", s.models_bucket), True),
        ("serve", "read images"): (lambda: client["serve"].stat_object(s.images_bucket, "chaos-scope/probe.txt"), True),
        ("serve", "write images"): (put("serve", s.images_bucket), False),
        ("serve", "write models"): (put("serve", s.models_bucket), False),
        ("spark", "write the lake"): (put("spark", s.lake_bucket), True),
        ("uploader", "delete in the images table"): (
            lambda: client["uploader"].remove_object(s.lake_bucket, table_probe),
            False,
        ),
        ("spark", "create buckets"): (lambda: client["spark"].make_bucket("chaos-not-allowed"), False),
    }
    expected = {case: want for case, (_, want) in matrix.items()}
    # MinIO propagates new users and policies to its peer nodes asynchronously (slower right after
    # nodes were killed and restarted): a grant can lag on the node the load balancer picked, but a
    # denial must never turn into a grant. So only missing grants are waited for, at most 60 s.
    deadline = time.monotonic() + 60
    while True:
        got = {case: allowed(action) for case, (action, _) in matrix.items()}
        if all(got[c] for c in matrix if expected[c]) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert got == expected, {c: (got[c], expected[c]) for c in matrix if got[c] != expected[c]}
    assert_uploader_merges_into_the_images_table(s, keys["uploader"])
    ledger.record(
        "security: compose's minio-setup run on the chaos MinIO; each scoped key tried",
        f"{len(matrix)} permission checks and a delta-rs MERGE as the uploader "
        "(uploader: images and the images table, no delete; spark: read images, write features/models/lake)",
        0,
    )


def assert_uploader_merges_into_the_images_table(s, uploader_key: tuple[str, str]) -> None:
    """What `orchard upload` does with compose's uploader key at the end of a run: a delta-rs MERGE
    of its rows into the images table (the policy must allow every request delta-rs makes)."""
    from pydantic import SecretStr

    from orchard.core.table_write import delete_rows, image_row, merge_rows

    dataset = f"chaos-scope-{secrets.token_hex(3)}"
    row = image_row(f"{dataset}/train/probe/probe.jpg", secrets.token_bytes(64), "etag", datetime.now(UTC), 1 << 20)
    as_uploader = s.model_copy(
        update={"s3_access_key": SecretStr(uploader_key[0]), "s3_secret_key": SecretStr(uploader_key[1])}
    )
    try:
        assert merge_rows(as_uploader, [row]).inserted == 1
    finally:
        delete_rows(s, dataset)  # the root key: the uploader's deletes nothing


# --------------------------------------------------------------------------------------------
# The native stack
# --------------------------------------------------------------------------------------------
def test_native_credentials_file_is_private(chaos: ChaosStack):
    path = chaos.settings.credentials_file
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    # The home may carry a traverse-only ACL for the Elasticsearch user (the group bits show its
    # mask): nobody else may list or write it.
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o066 == 0, oct(path.parent.stat().st_mode)


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 or an IPv4-mapped loopback address (::ffff:127.0.0.1: Java's dual stack)."""
    address = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def stack_processes(chaos: ChaosStack) -> dict[str, list[psutil.Process]]:
    """Service name -> its process and every descendant (executors and Python workers included)."""
    found = {}
    names = sorted(p.stem for p in chaos.layout.run.glob("*.pid"))
    assert len(names) == 12, names  # 4 MinIO + lb + 3 ES + master + 2 workers + serve
    for name in names:
        pid = chaos.pid(name)
        assert pid is not None, f"{name} is not running"
        proc = psutil.Process(pid)
        found[name] = [proc, *proc.children(recursive=True)]
    return found


def test_native_stack_listens_on_loopback_only(chaos: ChaosStack):
    chaos.up()
    listening = {}
    for name, procs in stack_processes(chaos).items():
        pids = {p.pid for p in procs}
        listening[name] = [
            c.laddr for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
    assert all(listening.values()), f"services without a listening socket: {[n for n, a in listening.items() if not a]}"
    wide = {n: [f"{a.ip}:{a.port}" for a in addrs if not is_loopback(a.ip)] for n, addrs in listening.items()}
    wide = {n: a for n, a in wide.items() if a}
    assert not wide, f"listening beyond loopback: {wide}"


def spark_commands() -> list:
    """The session's finished `orchard train|infer|features` commands."""
    return [c for c in COMMANDS if {"train", "infer", "features"} & set(c.argv) and c.proc.poll() is not None]


def test_spark_drivers_listen_on_loopback_only(chaos: ChaosStack, model_version: str):
    """The driver of a job (RPC, block manager, UI) must not listen beyond loopback on a native
    stack: it has no authentication, and its UI can kill jobs. Every Spark command of the session
    had its listening sockets sampled while it ran (conftest.Background)."""
    if not spark_commands():  # e.g. a reused model on a CHAOS_DEV_STACK: run one small job now
        dataset = chaos.dataset("security-driver")
        uploaded = chaos.cli(*upload_args(synth(chaos, dataset, per_class=2, seed=chaos.seed(8100)), dataset))
        assert uploaded.returncode == 0, uploaded.tail()
        assert chaos.cli(*infer_args(dataset, model_version)).returncode == 0
    commands = spark_commands()
    assert commands and all(len(c.listening) >= 3 for c in commands), (
        "a Spark command whose driver sockets (RPC, block manager, UI) were not seen"
    )
    wide = {
        " ".join(c.argv[1:3]): sorted(a for a in c.listening if not is_loopback(a.rsplit(":", 1)[0])) for c in commands
    }
    wide = {k: v for k, v in wide.items() if v}
    assert not wide, f"Spark drivers listening beyond loopback: {wide}"


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------
def test_logs_never_print_secrets(chaos: ChaosStack, ledger: Ledger, tmp_path: Path):
    s = chaos.settings
    values = {s.s3_secret_key.get_secret_value(), *SECRETS}
    # Make the logs as talkative as they get: debug logging of an upload, and a failing upload.
    dataset = chaos.dataset("security-logs")
    tree = synth(chaos, dataset, per_class=2, seed=chaos.seed(8000))
    verbose = chaos.cli("-vv", *upload_args(tree, dataset))
    assert verbose.returncode == 0, verbose.tail()
    failing = chaos.cli(
        "-vv",
        *upload_args(tree, dataset + "-unreachable"),
        timeout=600,
        env={"ORCHARD_S3_ENDPOINT": "http://127.0.0.1:9"},
    )  # nothing listens there
    assert failing.returncode != 0, failing.tail()

    # The scanner must find a planted secret, or a clean result means nothing.
    planted = tmp_path / "planted.log"
    planted.write_text(f"oops {next(iter(values))} leaked\n")
    assert find_secrets(tmp_path, values), "the scanner missed a planted secret"

    scanned = [p for p in chaos.run_dir.rglob("*") if p.is_file() and not NOT_LOGS.search(str(p))]
    assert len(scanned) > 10
    leaks = find_secrets(chaos.run_dir, values)
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks)
    ledger.record(
        "security: grep every log of the session (services, CLI at -vv, executors, reports) for the secrets",
        f"{len(scanned)} files, {len(values)} secrets",
        len(leaks),
    )
