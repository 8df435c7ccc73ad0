"""images/minio/setup.sh against a real (throwaway, single-node) MinIO server of the pinned build.

The script is the one the compose `minio-setup` service runs; here it runs with the native `minio`
and `mc` binaries of `make deps`, so its buckets, policies and keys are checked for real: each
service's key can do exactly what its policy says, and a second run changes nothing. The server has
the webhook target compose's nodes have, pointed at a receiver in this test: an image upload must
reach it (the subscription setup.sh makes), with the token.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
from minio import Minio
from minio.error import S3Error

from compose_checks import IMAGES_DIR, cache_dir, run
from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain
from orchard.stack.mc import mc_json
from orchard.stack.services import WEBHOOK_ARN, WEBHOOK_TARGET

# Hostile credentials: the script must work with ANY key a user or `secrets.token_urlsafe` picks.
# What this MinIO build accepts (internal/auth/credentials.go, cmd/iam.go, signature-v4-parser.go):
#   secret key: at least 8 characters, any characters (it only keys the HMAC, it never travels);
#               the 40-character maximum applies to keys MinIO generates, not to these.
#   access key: at least 3 characters, not `=` or `,` (reserved; `,` splits the Authorization
#               header), no leading/trailing space or trailing `/` (trimmed from that header).
# mc itself reads keys one line each (stdin), so no key may contain a line break: setup.sh refuses.
# Each key starts with `-` (parsed as a flag when passed as an argument), `--help` included, and
# the secrets carry shell metacharacters, quotes, backslashes, spaces, `:` and `@` (which break
# mc's MC_HOST_* URLs), `%` escapes and a non-ASCII letter; all 8 to 40 characters long.
ROOT = ("-orchard-root", "-Ze2I $(id) `id`;'\"\\ :@%41|&<>*?#!")
UPLOADER = ("-orchard-uploader$x;", "-up $HOME ;`x`'\"\\ :@%41 {}[]()^=,+/")
SPARK = ("--help", "--help \tsp\u00e4rk secret ${X:-y} $'z' \\n")
SERVE = ("-serve'\"$(id)`id`", "-sv $(id) `id`;'\"\\ :@%41 *?~ \u00e9")
HOSTILE = (ROOT, UPLOADER, SPARK, SERVE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_live(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until /minio/health/live answers 200 (fails if the server exits or time runs out)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "minio exited during startup"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/minio/health/live", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail("minio did not become live")


@pytest.fixture(scope="module")
def tools() -> Toolchain:
    tools = Toolchain.from_cache(cache_dir())
    for binary in (tools.minio, tools.mc):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run `make deps`", pytrace=False)
    return tools


WEBHOOK_TOKEN = "-webhook-token-" + os.urandom(6).hex()


class Receiver:
    """A webhook endpoint on a free loopback port: keeps every POST (headers, JSON body), answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], dict]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((dict(self.headers), json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys_created(self) -> list[str]:
        """The object keys (decoded: they arrive URL-encoded) of every object-created event so far."""
        return [
            unquote_plus(record["s3"]["object"]["key"])
            for _, body in self.posts
            for record in body.get("Records") or []
            if record.get("eventName", "").startswith("s3:ObjectCreated:")
        ]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def minio_port(tools, tmp_path_factory, receiver):
    """A single-node MinIO on a free loopback port with compose's webhook target (sending to
    `receiver`), stopped after the module."""
    data = tmp_path_factory.mktemp("minio-data")
    port, console = free_port(), free_port()
    webhook = f"MINIO_NOTIFY_WEBHOOK_{{}}_{WEBHOOK_TARGET}"
    env = {
        **os.environ,
        "MINIO_ROOT_USER": ROOT[0],
        "MINIO_ROOT_PASSWORD": ROOT[1],
        "MINIO_CI_CD": "on",
        "MINIO_UPDATE": "off",
        webhook.format("ENABLE"): "on",
        webhook.format("ENDPOINT"): receiver.url,
        webhook.format("AUTH_TOKEN"): WEBHOOK_TOKEN,
        webhook.format("QUEUE_DIR"): str(tmp_path_factory.mktemp("minio-events")),
    }
    proc = subprocess.Popen(
        [
            str(tools.minio),
            "server",
            "--quiet",
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console}",
            str(data),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_live(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_setup(
    tools: Toolchain, port: int, tmp_path: Path, uploader: tuple[str, str] = UPLOADER
) -> subprocess.CompletedProcess:
    """images/minio/setup.sh with the native mc first on PATH, as in the container."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "mc").exists():
        (bin_dir / "mc").symlink_to(tools.mc)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MINIO_SETUP_ENDPOINT": f"http://127.0.0.1:{port}",
        "MINIO_ROOT_USER": ROOT[0],
        "MINIO_ROOT_PASSWORD": ROOT[1],
        "UPLOADER_S3_ACCESS_KEY": uploader[0],
        "UPLOADER_S3_SECRET_KEY": uploader[1],
        "SPARK_S3_ACCESS_KEY": SPARK[0],
        "SPARK_S3_SECRET_KEY": SPARK[1],
        "SERVE_S3_ACCESS_KEY": SERVE[0],
        "SERVE_S3_SECRET_KEY": SERVE[1],
    }
    return run(["bash", IMAGES_DIR / "minio" / "setup.sh"], env=env)


@pytest.fixture(scope="module")
def setup_runs(tools, minio_port, tmp_path_factory):
    """Two runs of the setup script (the second proves it is re-runnable)."""
    work = tmp_path_factory.mktemp("minio-setup")
    return [run_setup(tools, minio_port, work) for _ in range(2)]


def client(port: int, creds: tuple[str, str]) -> Minio:
    return Minio(f"127.0.0.1:{port}", access_key=creds[0], secret_key=creds[1], secure=False)


def allowed(action) -> bool:
    """True if the S3 call succeeds, False if MinIO denies it."""
    try:
        action()
    except S3Error as exc:
        assert exc.code == "AccessDenied", exc
        return False
    return True


def put(c: Minio, bucket: str, key: str):
    return lambda: c.put_object(bucket, key, io.BytesIO(b"x"), 1)


def test_credentials_are_hostile_and_valid():
    for key, secret in HOSTILE:
        assert key.startswith("-") and secret.startswith("-")
        assert len(key) >= 3 and not {"=", ","} & set(key) and key == key.strip()
        assert 8 <= len(secret) <= 40 and "\n" not in secret and "\r" not in secret
    assert all(set(s) & set(" $`;'\"\\") == set(" $`;'\"\\") for _, s in (ROOT, UPLOADER))


def test_setup_succeeds_twice(setup_runs):
    for result in setup_runs:
        assert result.returncode == 0, result.stderr
    assert "already has policy" in setup_runs[1].stderr
    assert "already sends object creations" in setup_runs[1].stderr
    for result in setup_runs:
        for _, secret in HOSTILE:
            assert secret not in result.stdout + result.stderr, "setup.sh printed a secret"


def test_buckets_exist(setup_runs, minio_port):
    root = client(minio_port, ROOT)
    assert {b.name for b in root.list_buckets()} >= {"images", "features", "models", "lake"}


def assert_may_write_the_delta_table(c: Minio, port: int) -> None:
    """What Delta Lake does in the lake bucket: list, write, read and delete its log and data files."""
    log_entry = "images/_delta_log/00000000000000000000.json"
    for key in (log_entry, "images/part-00000.snappy.parquet"):
        assert allowed(put(c, "lake", key))
        assert allowed(lambda k=key: c.get_object("lake", k).read())
    assert allowed(lambda: list(c.list_objects("lake", prefix="images/_delta_log/")))
    assert allowed(lambda: c.remove_object("lake", "images/part-00000.snappy.parquet"))  # VACUUM, OPTIMIZE
    client(port, ROOT).remove_object("lake", log_entry)


def test_uploader_may_only_write_images_and_the_images_table(setup_runs, minio_port):
    up = client(minio_port, UPLOADER)
    assert allowed(put(up, "images", "u/1.jpg"))
    assert allowed(lambda: up.stat_object("images", "u/1.jpg"))  # skip-if-present on re-runs
    assert allowed(lambda: list(up.list_objects("images", prefix="u/")))
    assert not allowed(put(up, "features", "u/1.parquet"))
    assert not allowed(put(up, "models", "u/model.keras"))
    assert not allowed(lambda: up.remove_object("images", "u/1.jpg"))
    # The upload MERGEs its rows into the images table (delta-rs: reads the log, adds files, deletes none).
    log_entry = "images/_delta_log/00000000000000000007.json"
    assert allowed(put(up, "lake", log_entry))
    assert allowed(lambda: up.get_object("lake", log_entry).read())
    assert allowed(lambda: list(up.list_objects("lake", prefix="images/_delta_log/")))
    assert not allowed(lambda: up.remove_object("lake", log_entry))
    assert not allowed(put(up, "lake", "predictions/_delta_log/00000000000000000000.json"))
    assert not allowed(put(up, "lake", "features/part-0.parquet"))
    client(minio_port, ROOT).remove_object("lake", log_entry)


def test_spark_reads_images_and_writes_features_and_models(setup_runs, minio_port):
    root, spark = client(minio_port, ROOT), client(minio_port, SPARK)
    root.put_object("images", "s/2.jpg", io.BytesIO(b"img"), 3)
    assert spark.get_object("images", "s/2.jpg").read() == b"img"
    assert not allowed(put(spark, "images", "s/3.jpg"))
    for bucket in ("features", "models"):
        assert allowed(put(spark, bucket, "s/part-0"))
        assert allowed(lambda b=bucket: spark.get_object(b, "s/part-0").read())
        assert allowed(lambda b=bucket: spark.remove_object(b, "s/part-0"))  # s3a commit renames
    assert not allowed(lambda: spark.make_bucket("spark-made"))


def test_spark_writes_the_delta_table(setup_runs, minio_port):
    assert_may_write_the_delta_table(client(minio_port, SPARK), minio_port)


def test_serve_may_only_read_images_and_models_and_write_the_predictions_table(setup_runs, minio_port):
    """The REST API's key: GET of images and model files, nothing else written but the predictions
    table (auto-enrichment keeps its predictions there), no other bucket; a missing object is
    NoSuchKey (not AccessDenied), as the serving alias is before any promote."""
    root, serve = client(minio_port, ROOT), client(minio_port, SERVE)
    root.put_object("images", "v/1.jpg", io.BytesIO(b"img"), 3)
    root.put_object("models", "v1/labels.json", io.BytesIO(b"{}"), 2)
    root.put_object("features", "v/part-0", io.BytesIO(b"f"), 1)
    assert serve.get_object("images", "v/1.jpg").read() == b"img"
    assert serve.get_object("models", "v1/labels.json").read() == b"{}"
    with pytest.raises(S3Error) as missing:
        serve.get_object("models", "_aliases/serving.json")
    assert missing.value.code == "NoSuchKey"
    for bucket in ("images", "models", "features", "lake"):
        assert not allowed(put(serve, bucket, "v/new"))
    assert allowed(put(serve, "lake", "predictions/_delta_log/00000000000000000000.json"))
    assert serve.get_object("lake", "predictions/_delta_log/00000000000000000000.json").read()
    assert not allowed(put(serve, "lake", "images/_delta_log/00000000000000000000.json"))
    assert not allowed(lambda: serve.remove_object("lake", "predictions/_delta_log/00000000000000000000.json"))
    assert not allowed(lambda: serve.remove_object("images", "v/1.jpg"))
    assert not allowed(lambda: serve.remove_object("models", "v1/labels.json"))
    assert not allowed(lambda: serve.get_object("features", "v/part-0").read())
    assert not allowed(lambda: serve.make_bucket("serve-made"))


def test_orchard_mc_works_with_hostile_root_credentials(setup_runs, minio_port, tools):
    """orchard/stack/mc.py (mc for the native stack and the chaos tests) with the hostile root key,
    `:`, `@` and `%41` included: mc's MC_HOST_* URLs cannot carry those, its config.json can."""
    s = Settings(
        s3_endpoint=f"http://127.0.0.1:{minio_port}",
        s3_access_key=ROOT[0],
        s3_secret_key=ROOT[1],
        cache_dir=tools.cache_dir,
    )
    users = {line.get("accessKey") for line in mc_json(s, "admin", "user", "list", "orchard")}
    assert users >= {UPLOADER[0], SPARK[0], SERVE[0]}


def test_image_uploads_reach_the_webhook_target_with_the_token(setup_runs, minio_port, receiver):
    """setup.sh subscribed the images bucket: an upload by the uploader's key is posted to the
    target (compose: the serve service's /v1/events), authorized by the API key; other buckets not."""
    client(minio_port, SPARK).put_object("features", "w/not-an-image.parquet", io.BytesIO(b"f"), 1)
    client(minio_port, UPLOADER).put_object("images", "w/new photo.jpg", io.BytesIO(b"img"), 3)
    deadline = time.monotonic() + 30
    while "w/new photo.jpg" not in receiver.keys_created() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "w/new photo.jpg" in receiver.keys_created()
    assert not [key for key in receiver.keys_created() if key.startswith("w/not-an-image")]
    headers = next(h for h, body in receiver.posts if "new+photo.jpg" in json.dumps(body))
    assert headers["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"


def test_setup_subscribes_the_native_stacks_webhook_target():
    script = (IMAGES_DIR / "minio" / "setup.sh").read_text()
    assert f"WEBHOOK_ARN={WEBHOOK_ARN}\n" in script
    assert f"arn:minio:sqs::{WEBHOOK_TARGET}:webhook" == WEBHOOK_ARN


def test_setup_fails_without_secrets():
    result = run(["bash", IMAGES_DIR / "minio" / "setup.sh"], env={**os.environ, "MINIO_ROOT_PASSWORD": ""})
    assert result.returncode == 2 and "make secrets" in result.stderr


def test_setup_refuses_a_key_with_a_line_break(tools, tmp_path):
    """mc reads a key as one line: a line break would silently cut it, so setup.sh refuses it
    before it connects (port 9 is closed: nothing is contacted), without printing the secret."""
    secret = "-first-line\nsecond-line"
    result = run_setup(tools, 9, tmp_path, uploader=(UPLOADER[0], secret))
    assert result.returncode == 2
    assert "UPLOADER_S3_SECRET_KEY contains a line break" in result.stderr
    assert "first-line" not in result.stderr and "second-line" not in result.stderr
