"""The chaos suite's own native stack, and the helpers its tests share.

The suite kills real processes, so it never touches the shared default stack: it starts a
separate one under `out/chaos/run-<time>/home` on shifted ports (194xx), once per session, runs
every CLI command against it with the same ORCHARD_* environment, and stops and purges it at the
end (its logs are copied to `out/chaos/last-logs/` first). Stacks left by a crashed earlier run
are stopped before a new one starts (they are this suite's own: found under out/chaos/).

Every fault test records a row (fault, files/documents involved, lost) in the session's ledger;
the table is printed at the end of the run and written to out/chaos/results.{json,md}.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError

from orchard.core.health import get_json
from orchard.core.settings import ENV_PREFIX, Settings, load_settings
from orchard.stack import launcher, process
from orchard.stack.mc import mc_json, run_mc
from orchard.stack.services import Layout

log = logging.getLogger("chaos")

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "out" / "chaos"
ORCHARD = REPO / "bin" / "orchard"

# The chaos stack: its own ports and smaller heaps (it runs beside the default stack on 2 cores).
CHAOS_OVERRIDES: dict[str, Any] = {
    "minio_port": 19400,
    "minio_node_port": 19401,
    "minio_console_port": 19411,
    "es_http_port": 19420,
    "es_transport_port": 19430,
    "spark_master_port": 19477,
    "spark_ui_port": 19480,
    "spark_worker_ui_port": 19481,
    "serve_port": 19460,
    "es_heap": "512m",
    "spark_worker_memory": "2g",
}
# Spark conf of every job here: executors must fit the 2g workers, small tasks retry finely.
SPARK_CONF = ("--conf", "spark.executor.memory=1g", "--conf", "spark.driver.memory=1g")
DEV_STACK_VAR = "CHAOS_DEV_STACK"
DEFAULT_PORTS = {"minio_port": 9000, "es_http_port": 9200, "spark_master_port": 7077, "serve_port": 8600}


# --------------------------------------------------------------------------------------------
# The ledger: one row per injected fault, printed and written at the end of the session.
# --------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Rows of (fault, involved, lost); `lost` must be 0 everywhere."""

    rows: list[dict] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def record(self, fault: str, involved: str, lost: int, **extra: Any) -> None:
        self.rows.append({"fault": fault, "involved": involved, "lost": lost, **extra})
        log.info("ledger: %s | %s | lost %d", fault, involved, lost)

    def markdown(self) -> str:
        lines = ["| fault injected | files / documents involved | lost |", "|---|---|---|"]
        lines += [f"| {r['fault']} | {r['involved']} | {r['lost']} |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(
            json.dumps({"rows": self.rows, "figures": self.figures}, indent=2, default=str) + "\n"
        )
        (directory / "results.md").write_text(self.markdown())


LEDGER = Ledger()


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault table after the run (also in out/chaos/results.md)."""
    if not LEDGER.rows:
        return
    terminalreporter.section("chaos results")
    terminalreporter.write(LEDGER.markdown())
    for key, value in LEDGER.figures.items():
        terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def ledger() -> Iterator[Ledger]:
    yield LEDGER
    LEDGER.write(OUT)


# --------------------------------------------------------------------------------------------
# Running the CLI against the chaos stack.
# --------------------------------------------------------------------------------------------
COMMANDS: list[Background] = []  # every CLI command of the session (for the security checks)
SECRETS: set[str] = set()  # secrets the session created, besides the stack's own (never in a log)
# Files that hold secrets by design, or binary data: not logs.
NOT_LOGS = re.compile(r"(credentials\.env$|/data/minio\d/|/data/es\d\d/|\.(jpg|png|npy|keras|parquet|crc)$)")


def find_secrets(root: Path, values: set[str]) -> list[str]:
    """'path: secret #i' for every log-like file under `root` that contains one of `values`."""
    hits = []
    needles = [v.encode() for v in sorted(values) if len(v) >= 8]
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not NOT_LOGS.search(str(p))):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        hits += [f"{path}: secret #{i}" for i, needle in enumerate(needles) if needle in data]
    return hits


@dataclass
class Run:
    """A finished CLI command: exit status and output (also kept in a log file)."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    log_path: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, chars: int = 4000) -> str:
        return f"$ {' '.join(self.argv)}\nexit {self.returncode}\n{self.output[-chars:]}"


class Background:
    """A CLI command running in the background (output to files)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        # Open for the command's whole life (it writes into them until it ends); closed in _result().
        self._out = open(log_dir / f"{name}.stdout", "w+b")  # noqa: SIM115
        self._err = open(log_dir / f"{name}.stderr", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._out, stderr=self._err, cwd=REPO, start_new_session=True
        )
        self.listening: set[str] = set()  # ip:port of every socket the command's processes listened on
        COMMANDS.append(self)
        threading.Thread(target=self._watch_sockets, daemon=True).start()

    def _watch_sockets(self) -> None:
        """Sample the listening sockets of the command and its children (e.g. a Spark driver JVM)."""
        while self.proc.poll() is None:
            try:
                family = psutil.Process(self.proc.pid).children(recursive=True)
                pids = {self.proc.pid, *(p.pid for p in family)}
                self.listening |= {
                    f"{c.laddr.ip}:{c.laddr.port}"
                    for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids
                }
            except psutil.Error:
                pass
            time.sleep(1.0)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stderr_so_far(self) -> str:
        return Path(self._err.name).read_text(errors="replace")

    def wait(self, timeout: float) -> Run:
        """Wait for the command; on timeout kill it and fail the test with its output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            run = self._result()
            pytest.fail(f"timed out after {timeout:.0f}s:\n{run.tail()}")
        return self._result()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def _result(self) -> Run:
        self.proc.wait()
        self._out.seek(0)
        self._err.seek(0)
        stdout = self._out.read().decode(errors="replace")
        stderr = self._err.read().decode(errors="replace")
        self._out.close()
        self._err.close()
        self.log_path.write_text(f"$ {' '.join(self.argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        return Run(self.argv, self.proc.returncode, stdout, stderr, self.log_path)


# --------------------------------------------------------------------------------------------
# The isolated stack.
# --------------------------------------------------------------------------------------------
class ChaosStack:
    """The suite's own native stack: settings, environment, CLI runs, process kills, checks."""

    def __init__(self, run_dir: Path, salt: int = 0) -> None:
        self.run_dir = run_dir
        self.salt = salt  # 0 on a fresh stack; makes names and content unique on a reused one
        self.home = run_dir / "home"
        self.cli_dir = run_dir / "cli"
        self.data_dir = run_dir / "data"
        for d in (self.home, self.cli_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.overrides = {"home": self.home, **CHAOS_OVERRIDES}
        self.env = chaos_env(self.overrides)
        self.settings = load_settings(**self.overrides)  # without credentials until `up`
        self.layout = Layout(self.home)
        self._runs = 0

    def dataset(self, base: str) -> str:
        """A dataset name unique in this stack (`base` itself on a fresh stack)."""
        return f"{base}-{self.salt}" if self.salt else base

    def seed(self, base: int) -> int:
        """A synthesis seed whose images no earlier run on this stack used (ids are content hashes)."""
        return base + self.salt * 10_000

    # --- lifecycle ------------------------------------------------------------------------
    def up(self, **overrides: Any) -> None:
        """Start whatever is down (with extra setting overrides) and wait until all is healthy."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        assert_not_default(settings)
        launcher.up(settings)
        self.settings = load_settings(**self.overrides)  # now with the generated credentials

    def down(self) -> None:
        launcher.down(self.settings, purge=False)

    # --- CLI ------------------------------------------------------------------------------
    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return [str(ORCHARD), *args]

    def _name(self, args: tuple[str, ...]) -> str:
        """`<n>-<subcommand>-<dataset or last path part>` for the command's log files."""
        self._runs += 1
        words = [a for a in args if not a.startswith("-")]
        command = next((w for w in words if "/" not in w), "cli")
        paths = [Path(w).name for w in words if "/" in w]
        target = args[args.index("--dataset") + 1] if "--dataset" in args else (paths[0] if paths else "")
        return f"{self._runs:03d}-" + re.sub(r"[^a-z0-9]+", "-", f"{command}-{target}".lower()).strip("-")[:50]

    def cli(self, *args: str, timeout: float = 900, env: dict[str, str] | None = None) -> Run:
        """Run `bin/orchard ARGS` on the chaos stack to completion (fails the test on timeout)."""
        return self.start(*args, env=env).wait(timeout)

    def start(self, *args: str, env: dict[str, str] | None = None) -> Background:
        """Start `bin/orchard ARGS` in the background (`env`: extra variables)."""
        argv = self._argv(args)
        log.info("$ %s", " ".join(argv))
        return Background(argv, {**self.env, **(env or {})}, self.cli_dir, self._name(args))

    # --- processes ------------------------------------------------------------------------
    def pid(self, service: str) -> int | None:
        return process.running_pid(self.layout.pid_file(service))

    def kill(self, service: str) -> int:
        """SIGKILL a service like a crashed node: its process group and every descendant."""
        assert_not_default(self.settings)
        record = process.read_pid(self.layout.pid_file(service))
        proc = record.process() if record else None
        assert proc is not None, f"{service} is not running"
        family = [proc, *proc.children(recursive=True)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.kill()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"{service}: {alive} survived SIGKILL"
        log.info("SIGKILLed %s (pid %d, %d processes)", service, proc.pid, len(family))
        return proc.pid

    def stop(self, service: str) -> None:
        """Stop a service gracefully (SIGTERM, then SIGKILL after the grace time)."""
        assert_not_default(self.settings)
        process.stop(self.layout.pid_file(service))

    # --- clients --------------------------------------------------------------------------
    def es(self, **kwargs):
        from orchard.core.clients import es_client

        return es_client(self.settings, **kwargs)

    def s3(self, endpoint: str | None = None):
        from orchard.core.clients import s3_client

        s = self.settings if endpoint is None else self.settings.model_copy(update={"s3_endpoint": endpoint})
        return s3_client(s)

    def node_url(self, index: int) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.minio_node_port + index}"

    def mc(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run_mc(self.settings, *args, timeout=timeout, check=check)

    def mc_json(self, *args: str, timeout: float = 300, check: bool = True) -> list[dict]:
        return mc_json(self.settings, *args, timeout=timeout, check=check)

    def spark_master(self) -> dict:
        return get_json(f"http://{self.settings.bind_host}:{self.settings.spark_ui_port}/json/")


def chaos_env(overrides: dict[str, Any]) -> dict[str, str]:
    """The environment of every command: no ORCHARD_* of the caller, the chaos settings instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "SPARK_CONF_DIR"}
    env.update({ENV_PREFIX + k.upper(): str(v) for k, v in overrides.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def assert_not_default(s: Settings) -> None:
    """Refuse to touch the shared default stack (its home or its ports)."""
    default_home = Settings.model_fields["home"].default_factory()
    shared = s.home.resolve() == Path(default_home).resolve() or any(
        getattr(s, k) == v for k, v in DEFAULT_PORTS.items()
    )
    if shared:
        pytest.exit(
            f"chaos suite refused to act on the shared stack ({s.home}, ports {s.minio_port}/"
            f"{s.es_http_port}/{s.spark_master_port})",
            returncode=3,
        )


def stop_stale_stacks() -> None:
    """Stop and delete chaos stacks a crashed earlier session left running (this suite's own)."""
    for old in sorted(OUT.glob("run-*/home")):
        stale = load_settings(home=old, **CHAOS_OVERRIDES)
        dev = old.parent.name == "run-dev"  # a CHAOS_DEV_STACK: stopped (same ports), data kept
        stopped = launcher.down(stale, purge=not dev)
        if stopped:
            log.warning("stopped %d processes of an earlier chaos stack in %s", len(stopped), old)
        if not dev:
            shutil.rmtree(old.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos(ledger: Ledger) -> Iterator[ChaosStack]:
    """The session's isolated native stack, healthy; stopped and purged at the end.

    With CHAOS_DEV_STACK=1 (for working on the suite) the stack in out/chaos/run-dev is reused
    and left running, and names and seeds are salted so runs do not see each other's data.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    if os.environ.get(DEV_STACK_VAR) == "1":
        stack = ChaosStack(OUT / "run-dev", salt=int(time.time()) % 100_000)
        stack.up()
        yield stack
        return
    stop_stale_stacks()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    stack = ChaosStack(OUT / f"run-{stamp}")
    began = time.monotonic()
    try:
        stack.up()
        LEDGER.figures["chaos stack start (s)"] = round(time.monotonic() - began)
        yield stack
    finally:
        # The security test greps the logs as they are when it runs; this covers every later test.
        secrets = {stack.settings.s3_secret_key.get_secret_value(), *SECRETS} if stack.settings.s3_secret_key else set()
        leaks = find_secrets(stack.run_dir, secrets)
        keep = OUT / "last-logs"
        shutil.rmtree(keep, ignore_errors=True)
        for source in (stack.home / "logs", stack.cli_dir):
            if source.exists():
                shutil.copytree(
                    source, keep / source.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.hprof")
                )
        for executor_log in stack.layout.data.glob("spark-worker-*/app-*/*/std*"):  # executors' output
            target = keep / "executors" / executor_log.relative_to(stack.layout.data)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(executor_log, target)
        launcher.down(stack.settings, purge=True)
        shutil.rmtree(stack.run_dir, ignore_errors=True)
        assert not leaks, "secrets in the session's logs:\n" + "\n".join(leaks)


# --------------------------------------------------------------------------------------------
# Waiting, hashing, counting.
# --------------------------------------------------------------------------------------------
def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.2,
    while_: Callable[[], bool] | None = None,
) -> Any:
    """Poll until `predicate()` is truthy (returns it); fail naming `what` on timeout or when
    `while_()` turns false first (e.g. the command under test already exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if while_ is not None and not while_():
            pytest.fail(f"gave up waiting for {what}: the command finished first")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def object_sha256(client, bucket: str, key: str) -> str:
    """sha256 of an object's bytes as read back through `client`."""
    response = client.get_object(bucket, key)
    try:
        return hashlib.sha256(response.read()).hexdigest()
    finally:
        response.close()
        response.release_conn()


def object_keys(client, bucket: str, prefix: str) -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)}


READ_ERRORS = (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError)


def unreadable_objects(client, bucket: str, expected: dict[str, str]) -> dict[str, str]:
    """key -> why, for every expected key (-> sha256) that cannot be read back with that sha256."""
    bad = {}
    for key, sha in expected.items():
        try:
            got = object_sha256(client, bucket, key)
        except READ_ERRORS as exc:
            bad[key] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if got != sha:
            bad[key] = f"sha256 {got[:12]} != {sha[:12]}"
    return bad


def dataset_query(dataset: str, *filters: dict) -> dict:
    return {"bool": {"filter": [{"term": {"dataset": dataset}}, *filters]}}


def count_docs(es, index: str, dataset: str, *filters: dict) -> int:
    """Documents of `dataset` matching `filters` (after a refresh)."""
    es.indices.refresh(index=index)
    return int(es.count(index=index, query=dataset_query(dataset, *filters))["count"])


def count_predicted(es, index: str, dataset: str) -> int:
    """Documents of `dataset` with a prediction label (fast: no refresh, for polling)."""
    query = dataset_query(dataset, {"exists": {"field": "prediction.label"}})
    return int(es.count(index=index, query=query)["count"])


def dataset_docs(es, index: str, dataset: str) -> dict[str, dict]:
    """key -> hit (with _id, _version, _source) of every document of `dataset`."""
    es.indices.refresh(index=index)
    hits = es.search(index=index, query=dataset_query(dataset), size=10_000, version=True)["hits"]["hits"]
    return {hit["_source"]["key"]: hit for hit in hits}


def prediction_problems(docs: dict[str, dict], version: str) -> dict[str, str]:
    """key -> problem for every document without a good prediction by `version`, or written twice.

    A document is created once by the upload (_version 1) and gets one prediction update
    (_version 2); a retried task that re-sends the same prediction is a noop. A higher _version
    means the document was written twice with different results.
    """
    problems = {}
    for key, hit in docs.items():
        pred = hit["_source"].get("prediction") or {}
        if not pred.get("label"):
            problems[key] = f"no prediction ({pred.get('error') or 'missing'})"
        elif pred.get("model_version") != version:
            problems[key] = f"predicted by {pred.get('model_version')}"
        elif hit["_version"] != 2:
            problems[key] = f"_version {hit['_version']}: written more than once"
    return problems


def read_json_line(text: str) -> dict:
    """The last line of `text` that is a JSON object (a command's --json summary)."""
    for raw in reversed(text.strip().splitlines()):
        line = raw.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary in output:\n{text[-2000:]}")


# --------------------------------------------------------------------------------------------
# Datasets and the shared model.
# --------------------------------------------------------------------------------------------
def synth(chaos: ChaosStack, name: str, per_class: int, seed: int, classes: int = 3, test_per_class: int = 0) -> Path:
    """`orchard dataset synth` into the run's data dir; returns the tree."""
    out = chaos.data_dir / name
    run = chaos.cli(
        "dataset",
        "synth",
        str(out),
        "--classes",
        str(classes),
        "--per-class",
        str(per_class),
        "--test-per-class",
        str(test_per_class),
        "--seed",
        str(seed),
        "--workers",
        "2",
    )
    assert run.returncode == 0, run.tail()
    return out


def upload_args(tree: Path, dataset: str, *extra: str) -> tuple[str, ...]:
    return ("upload", str(tree), "--dataset", dataset, *extra)


def upload(chaos: ChaosStack, tree: Path, dataset: str, *extra: str, timeout: float = 600) -> Run:
    run = chaos.cli(*upload_args(tree, dataset, *extra), timeout=timeout)
    assert run.returncode == 0, run.tail()
    return run


def infer_args(dataset: str, version: str, *extra: str) -> tuple[str, ...]:
    """`orchard infer` with small tasks (a lost executor costs little) and the chaos Spark conf."""
    return (
        "infer",
        "--dataset",
        dataset,
        "--model",
        version,
        "--images-per-partition",
        "8",
        "--batch-size",
        "8",
        "--json",
        *SPARK_CONF,
        *extra,
    )


SEEDED_IMAGES = 120


def seeded_dataset(chaos: ChaosStack, name: str, seed: int) -> str:
    """A new dataset of 120 uploaded images (3 classes x 40), every document indexed; its name."""
    dataset = chaos.dataset(name)
    upload(chaos, synth(chaos, dataset, per_class=40, seed=chaos.seed(seed)), dataset)
    assert count_docs(chaos.es(), chaos.settings.images_index, dataset) == SEEDED_IMAGES
    return dataset


def assert_every_image_predicted(run: Run, docs: dict[str, dict], problems: dict[str, str], images: int) -> None:
    """The infer run ended 0 having accounted every image, and every document holds its prediction."""
    assert run.returncode == 0, run.tail()
    summary = read_json_line(run.stdout)
    assert summary["images"] == images and summary["failed"] == 0, summary
    assert len(docs) == images and not problems, dict(list(problems.items())[:10])


def files_by_key(tree: Path, dataset: str) -> dict[str, Path]:
    """key -> file of a synthesized tree (Training/<Class>/<file>), derived without the uploader."""
    splits = {"Training": "train", "Test": "test"}
    keys = {}
    for path in sorted(tree.rglob("*.jpg")):
        split_dir, class_dir = path.relative_to(tree).parts[:2]
        label = re.sub(r"[^\w.-]+", "_", class_dir.lower()).strip("_.")
        keys[f"{dataset}/{splits[split_dir]}/{label}/{path.name}"] = path
    return keys


@pytest.fixture(scope="session")
def model_version(chaos: ChaosStack) -> str:
    """A tiny CNN trained once per session on the chaos stack (3 classes, 1 epoch).

    On a CHAOS_DEV_STACK, CHAOS_MODEL=<version> reuses a model trained by an earlier run.
    """
    if chaos.salt and os.environ.get("CHAOS_MODEL"):
        return os.environ["CHAOS_MODEL"]
    dataset = chaos.dataset("chaos-train")
    tree = synth(chaos, dataset, per_class=16, test_per_class=4, seed=chaos.seed(1000))
    upload(chaos, tree, dataset)
    run = chaos.cli(
        "train",
        "--dataset",
        dataset,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--images-per-partition",
        "16",
        "--json",
        *SPARK_CONF,
        timeout=900,
    )
    assert run.returncode == 0, run.tail()
    return read_json_line(run.stdout)["version"]
