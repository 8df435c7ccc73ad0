"""Any password works in images/es-setup/users.sh and images/kibana/import.sh.

Both hand passwords to curl: in a curl config file (`user = "elastic:..."`, where `"` and `\\`
must be escaped) and, for users.sh, in JSON request bodies (where `"`, `\\` and control
characters must be escaped). The escapers are checked on their own (users.sh sourced: it runs
`main` only when executed), and both scripts run for real, with the real curl, against a fake
Elasticsearch / Kibana on loopback that records what arrives: the exact passwords, every time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from compose_checks import IMAGES_DIR, run

USERS_SH = IMAGES_DIR / "es-setup" / "users.sh"
IMPORT_SH = IMAGES_DIR / "kibana" / "import.sh"

# A leading dash, shell metacharacters, both quotes, backslashes (also before a quote and at the
# end), spaces, `:` (curl splits user:password at the first one), `#`, `%`, non-ASCII letters.
HOSTILE = (
    "-Ze2I $(id) `id`;'\"\\ sp ace",
    'a\\"b\\\\c\\',
    '"',
    "\\",
    "--help",
    "pa:ss@wo#rd %41 ${HOME} $'x' && | < > * ? ~ !",
    "\u00e4\u20ac \U0001d11e sp\u00e4rk",
    " leading and trailing ",
    "\\n\\t\\u0041 literal escapes",
)
# And what only an escaper must survive: every control character (no shell passes NUL).
CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f end"


@dataclass
class Request:
    method: str
    path: str
    user: str  # the decoded Basic credentials, "user:password"
    body: bytes


@dataclass
class FakeServer:
    """Answers like Elasticsearch and Kibana do for the setup scripts; records every request."""

    url: str
    requests: list[Request] = field(default_factory=list)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server_state: FakeServer | None = None

    class Handler(BaseHTTPRequestHandler):
        def handle_request(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            user = base64.b64decode(auth.split(" ", 1)[1]).decode() if auth.startswith("Basic ") else ""
            server_state.requests.append(Request(self.command, self.path, user, body))
            if self.path.startswith("/_cluster/health"):
                answer = {"cluster_name": "fake", "status": "green"}
            elif self.path.startswith("/api/saved_objects/_import"):
                answer = {"success": True, "successCount": 2}
            else:
                answer = {"acknowledged": True}
            data = json.dumps(answer, separators=(",", ":")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = handle_request

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state = FakeServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def curl() -> str:
    """The real curl both scripts use (the Elasticsearch and Kibana images ship it)."""
    found = shutil.which("curl")
    if not found:
        pytest.fail("curl is not installed (apt-get install curl)", pytrace=False)
    return found


def sourced(script: Path, code: str, *args: str, locale: str | None = None) -> subprocess.CompletedProcess:
    """`code` in bash after sourcing `script` (its functions only); args are $1, $2, ...

    $0 must not be the script: users.sh runs `main` when BASH_SOURCE[0] is $0 (executed)."""
    env = {**os.environ, "LC_ALL": locale} if locale else None
    return run(["bash", "-c", f'source "$1"; shift; {code}', "bash", script, *args], env=env)


# The images may run in the C locale (bytes) or a UTF-8 one (characters): either must work.
@pytest.mark.parametrize("locale", ["C", "C.UTF-8"])
@pytest.mark.parametrize("password", [*HOSTILE, CONTROL])
def test_json_string_escapes_any_password(password, locale):
    result = sourced(
        USERS_SH,
        'json_string "$1"; echo; password_body "$1"; echo; ORCHARD_ES_PASSWORD=$1 user_body',
        password,
        locale=locale,
    )
    assert result.returncode == 0, result.stderr
    literal, body, user = result.stdout.split("\n")
    assert json.loads(literal) == password
    assert json.loads(body) == {"password": password}
    assert json.loads(user)["password"] == password


def test_role_body_is_json_with_any_index_names():
    names = ('orchard-"images"', "models\\x")
    result = sourced(USERS_SH, "IMAGES_INDEX=$1 MODELS_INDEX=$2 role_body", *names)
    assert result.returncode == 0, result.stderr
    models, images = json.loads(result.stdout)["indices"]
    assert models["names"] == [names[1]]
    # the alias and its numbered indices (orchard reindex moves the alias: `manage` on both)
    assert images["names"] == [names[0], names[0] + "-*"] and "manage" in images["privileges"]


@pytest.mark.parametrize("password", [*HOSTILE, CONTROL])
def test_curl_config_carries_any_password(fake_server, password):
    """The config written by users.sh, read by the real curl: the exact Basic credentials arrive."""
    result = sourced(
        USERS_SH, 'ELASTIC_PASSWORD=$1; write_curl_config; curl -sS -K "$CURL_CONFIG" "$2/"', password, fake_server.url
    )
    assert result.returncode == 0, result.stderr
    assert [r.user for r in fake_server.requests] == [f"elastic:{password}"]


def test_users_sh_sets_the_exact_passwords(fake_server, tmp_path):
    elastic, kibana, orchard = HOSTILE[0], HOSTILE[1], HOSTILE[5]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "ES_SETUP_URL": fake_server.url,
        "ES_CA_CERT": str(tmp_path / "unused-over-http.crt"),
        "ELASTIC_PASSWORD": elastic,
        "KIBANA_SYSTEM_PASSWORD": kibana,
        "ORCHARD_ES_USERNAME": "orchard_app",
        "ORCHARD_ES_PASSWORD": orchard,
    }
    result = run(["bash", USERS_SH], env=env)
    assert result.returncode == 0, result.stderr
    for secret in (elastic, kibana, orchard):
        assert secret not in result.stdout + result.stderr, "users.sh printed a password"
    requests = fake_server.requests
    assert {r.user for r in requests} == {f"elastic:{elastic}"}
    bodies = {(r.method, r.path): json.loads(r.body) for r in requests if r.body}
    assert bodies[("POST", "/_security/user/kibana_system/_password")] == {"password": kibana}
    assert bodies[("PUT", "/_security/user/orchard_app")]["password"] == orchard
    indices = bodies[("PUT", "/_security/role/orchard_app")]["indices"]
    assert [entry["names"] for entry in indices] == [["orchard-models"], ["orchard-images", "orchard-images-*"]]


def test_import_sh_logs_in_with_the_exact_password(fake_server, tmp_path):
    password = HOSTILE[0] + HOSTILE[1]
    objects = tmp_path / "saved_objects.ndjson"
    objects.write_text('{"type":"index-pattern","id":"orchard-images"}\n')
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "KIBANA_URL": fake_server.url,
        "SAVED_OBJECTS": str(objects),
        "IMPORT_TRIES": "1",
        "ELASTIC_PASSWORD": password,
    }
    result = run(["bash", IMPORT_SH], env=env)
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    assert [(r.method, r.user) for r in fake_server.requests] == [("POST", f"elastic:{password}")]
