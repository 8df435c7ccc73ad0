"""`orchard serve` under load: latency and requests/s of POST /v1/predict at 1, 8 and 32 concurrent
clients, against the model's own images/s in the same run (what micro-batching recovers).

One run, one dataset (`bench-serve-<seed>`: --classes x --per-class train + --test-per-class test
100x100 JPEGs written by `orchard dataset synth`, uploaded with the real uploader), in this order:

  train       `orchard train` (the default CNN, --epochs) -> VERSION
  features    `orchard features --model VERSION` (embeddings in the documents: neighbours exist)
  promote     `orchard models promote VERSION`
  serve       `python -m orchard serve --port <free port>` as a child process; waits (bounded,
              --ready-timeout) until /healthz is ready with VERSION
  clients_N   for N in --levels (1 8 32): N clients, each posting ONE test image as multipart
              (--k similar images, 5) as soon as its previous answer came, for --seconds after
              --warmup untimed seconds: p50/p99 latency (ms), requests/s, the server's own median
              ms per part (Server-Timing: read, decode, model = queue + call, similar);
              /healthz's largest_batch and where neighbours were searched (the service's
              memory, or Elasticsearch: ORCHARD_SERVE_LOCAL_KNN_MAX) after it. The clients are
              vegeta (Go, pinned in deps/versions.env, built on first use): Python clients on the
              same 2 cores took half a core at 480 requests/s, and one httpx pool shared by 32
              requests caps near 380.
              The largest level runs in --rounds rounds, each right after a model_only round
              (below): the machine's speed drifts by tens of percent within minutes (other
              tenants, steal), so the level and the model alone are timed side by side and their
              ratio is of the sums over the rounds.
  clients_N_predict_only   the largest level again with k=0 (in the same rounds): predictions
              alone, what micro-batching makes of the model's images/s
  model_only  VERSION loaded in this process (load_predictor), predict_on_batch on 32 preprocessed
              test images (the card's preprocessing, as orchard/serving/predictor.py builds inputs)
              after a warm-up, --model-seconds in all (split over the rounds; the service is idle
              meanwhile): images/s
  enrich      --enrich-per-class x --classes new images (a second dataset, `bench-serve-new-<seed>`)
              uploaded with `orchard upload`; the stack's own `serve` service predicts each from
              MinIO's notification with VERSION (promoted above). Delay per image: from its
              document's uploaded_at to the moment a reader of the index first sees its prediction
              (polled every 0.25 s from the upload's start: a large upload's first images are
              predicted before it ends; includes Elasticsearch's 1 s refresh): p50/p99/max seconds

Prints one JSON line per step and, last, one JSON object with p50_ms_N, p99_ms_N, rps_N per level
(and p50_ms_32_predict_only, ...), model_only_ips, rps_32_over_model_only,
rps_32_predict_only_over_model_only (and their values per round, *_rounds), largest_batch (after
the last level), enrich_p50_s and enrich_p99_s.

  PYTHONPATH=. ~/.cache/orchard/venv/bin/python bench/serve.py [--classes 5 --per-class 40 --test-per-class 10]

Needs the stack (`bin/orchard stack up`); the service runs on loopback (no API key). Leaves the
dataset's objects, rows and the version in place, and the version promoted.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from transfer import REPO, orchard, prepare, report_steps, split_facts, train_step

log = logging.getLogger("bench.serve")
LEVELS = (1, 8, 32)
MODEL_BATCH = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per level (in all)")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before each level (each round)")
    parser.add_argument("--model-seconds", type=float, default=12.0, help="model-only timing (in all)")
    parser.add_argument("--rounds", type=int, default=3, help="model-only and largest-level rounds, alternated")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /healthz ready")
    parser.add_argument("--enrich-per-class", type=int, default=20, help="new images per class for the enrich step")
    parser.add_argument("--enrich-timeout", type=float, default=300.0, help="seconds to wait for every prediction")
    parser.add_argument("--k", type=int, default=5, help="similar lake images asked per request (0: prediction only)")
    parser.add_argument("--seed", type=int, default=None, help="default: the current time (fresh content)")
    return parser.parse_args(argv)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of values, linear between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def held_out_images(tree: Path) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the synthesized test split (OUT/Test/<Class>/*.jpg)."""
    files = sorted((tree / "Test").rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no test images under {tree / 'Test'}")
    return [(path.name, path.read_bytes()) for path in files]


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    """`python -m orchard serve --port PORT` in the background, its output to log_path."""
    # Its own events inbox: the stack's service holds the home's (and it alone gets MinIO's events).
    inbox = log_path.with_name("inbox.sqlite3")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ORCHARD_SERVE_INBOX": str(inbox)}
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchard", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the service and wait for it (killed if it does not stop within 30 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(base: str, version: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> float:
    """Seconds until /healthz says ready with `version`; SystemExit with the service's log if not."""
    import httpx

    began = time.monotonic()
    last: dict | str = "no answer"
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"orchard serve exited ({proc.returncode}):\n{tail(log_path)}")
        try:
            last = httpx.get(f"{base}/healthz", timeout=5).json()
            if last.get("ready") and last.get("model") == version:
                return time.monotonic() - began
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    raise SystemExit(f"orchard serve not ready with {version} after {timeout:.0f} s ({last}):\n{tail(log_path)}")


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def vegeta() -> Path:
    """The pinned vegeta binary (deps/versions.env), built with `go install` on first use."""
    from orchard.core.settings import load_settings
    from orchard.core.toolchain import read_versions

    versions = read_versions()
    module, version = versions["VEGETA_MODULE"], versions["VEGETA_VERSION"]
    binary = load_settings().cache_dir / "bin" / f"vegeta-{version}" / "vegeta"  # ORCHARD_CACHE_DIR
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise SystemExit("bench/serve.py needs Go to build its load generator (vegeta): install Go")
    log.info("building vegeta %s with go install (once, ~15 s)", version)
    staging = binary.parent.with_suffix(".tmp")
    subprocess.run(["go", "install", f"{module}@{version}"], env={**os.environ, "GOBIN": str(staging)}, check=True)
    staging.replace(binary.parent)
    return binary


def write_targets(path: Path, base: str, images: list[tuple[str, bytes]], k: int) -> Path:
    """vegeta's JSON targets: one multipart POST /v1/predict per image (as a browser sends a photo)."""
    with path.open("w") as out:
        for i, (name, content) in enumerate(images):
            boundary = f"orchard-bench-{i:05d}"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            )
            body = head.encode() + content + f"\r\n--{boundary}--\r\n".encode()
            target = {
                "method": "POST",
                "url": f"{base}/v1/predict?k={k}",
                "body": base64.b64encode(body).decode(),
                "header": {"Content-Type": [f"multipart/form-data; boundary={boundary}"]},
            }
            out.write(json.dumps(target) + "\n")
    return path


def attack(binary: Path, targets: Path, clients: int, seconds: float) -> list[dict]:
    """`clients` vegeta workers, each posting its next target as soon as its previous answer came
    (closed loop, one keep-alive connection each), for `seconds`: one dict per request (code,
    latency ns, timestamp, headers; bodies not kept)."""
    workers = [f"-workers={clients}", f"-max-workers={clients}", f"-connections={clients}"]
    command = [str(binary), "attack", f"-targets={targets}", "-format=json", "-rate=0", *workers]
    command += [f"-duration={seconds}s", "-max-body=0", "-timeout=60s"]
    results = subprocess.run(command, capture_output=True, check=True).stdout
    encoded = subprocess.run([str(binary), "encode", "-to=json"], input=results, capture_output=True, check=True)
    return [json.loads(line) for line in encoded.stdout.splitlines() if line.strip()]


def load_level(binary: Path, targets: Path, clients: int, seconds: float, warmup: float) -> dict:
    """`clients` concurrent clients for `seconds` after `warmup` untimed seconds (connections
    opened, the model traced for the batch sizes of this level): latency percentiles (ms),
    requests/s of the successful ones, the server's median ms per part (its Server-Timing)."""
    if warmup > 0:
        attack(binary, targets, clients, warmup)
    results = attack(binary, targets, clients, seconds)
    ok = [r for r in results if r["code"] == 200]
    failures = [f"{r['code']}: {r['error']}" for r in results if r["code"] != 200]
    parts: dict[str, list[float]] = {}
    for r in ok:
        add_server_timing(parts, ", ".join(r.get("headers", {}).get("Server-Timing", [])))
    latencies = [r["latency"] / 1e9 for r in ok]
    wall = span_seconds(results)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "clients": clients,
        "requests": len(ok),
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "seconds": round(wall, 2),
        "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "rps": round(len(ok) / wall, 1) if wall > 0 else None,
        # where the server spent a request (its Server-Timing header), median ms per part; the
        # rest of p50_ms is HTTP and the event loop
        "server_p50_ms": {name: round(percentile(values, 50) or 0, 1) for name, values in parts.items()},
    }


def span_seconds(results: list[dict]) -> float:
    """Seconds from the first request sent to the last answer received."""
    if not results:
        return 0.0
    sent = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp() for r in results]
    return max(t + r["latency"] / 1e9 for t, r in zip(sent, results, strict=True)) - min(sent)


def add_server_timing(parts: dict[str, list[float]], header: str) -> None:
    """Add each `name;dur=ms` of a Server-Timing header to parts[name]."""
    for item in filter(None, (piece.strip() for piece in header.split(","))):
        name, _, duration = item.partition(";dur=")
        if duration:
            parts.setdefault(name, []).append(float(duration))


def run_levels(
    o: argparse.Namespace, base: str, images: list[tuple[str, bytes]], work: Path, model: ModelTimer
) -> list[dict]:
    """Each --levels level with --k neighbours per request; the largest in --rounds rounds, each
    after a model-only round and followed by the same level with no neighbours (predictions alone:
    what micro-batching makes of the model's images/s). Returns the levels and, last, model_only."""
    binary = vegeta()
    largest = max(o.levels)
    plan = [(largest, o.k)] + ([(largest, 0)] if o.k else [])
    levels = []
    for clients in (n for n in o.levels if n != largest):
        log.info("%d concurrent clients, %d similar images per request", clients, o.k)
        targets = targets_of(o, base, images, work, o.k)
        levels.append(level_step(o, base, load_level(binary, targets, clients, o.seconds, o.warmup), o.k))
    rounds: dict[int, list[dict]] = {k: [] for _, k in plan}
    alone = []
    for r in range(o.rounds):
        alone.append(model.time(o.model_seconds / o.rounds))
        for clients, k in plan:
            log.info("round %d/%d: %d concurrent clients, %d similar images per request", r + 1, o.rounds, clients, k)
            targets = targets_of(o, base, images, work, k)
            rounds[k].append(load_level(binary, targets, clients, o.seconds / o.rounds, o.warmup))
    levels += [level_step(o, base, merged_rounds(rounds[k]), k) for _, k in plan]
    return [*levels, merged_model_rounds(alone)]


def targets_of(o: argparse.Namespace, base: str, images: list[tuple[str, bytes]], work: Path, k: int) -> Path:
    """The vegeta targets file of requests asking `k` neighbours."""
    return write_targets(work / f"targets-k{k}.json", base, images, k)


def level_step(o: argparse.Namespace, base: str, level: dict, k: int) -> dict:
    """A level's step: its name, and the service's largest batch and neighbour search after it."""
    name = f"clients_{level['clients']}" + ("" if k == o.k else "_predict_only")
    health = healthz(base)
    step = {"step": name, "k": k, **level, "largest_batch_so_far": health.get("largest_batch")}
    step["neighbours"] = health.get("neighbours")  # searched in memory or by Elasticsearch
    return step


def merged_rounds(rounds: list[dict]) -> dict:
    """One level of its rounds: requests/s of the sums, the worst p99, the median p50 and the median
    of each round's server part medians, the first failure of any (a summary of each round kept under
    `rounds`)."""
    requests, seconds = sum(r["requests"] for r in rounds), sum(r["seconds"] for r in rounds)
    parts = {name for r in rounds for name in r["server_p50_ms"]}
    return {
        "clients": rounds[0]["clients"],
        "requests": requests,
        "failures": sum(r["failures"] for r in rounds),
        "first_failure": next((r["first_failure"] for r in rounds if r["first_failure"]), None),
        "seconds": round(seconds, 2),
        "p50_ms": percentile([r["p50_ms"] for r in rounds if r["p50_ms"] is not None], 50),
        "p99_ms": max((r["p99_ms"] for r in rounds if r["p99_ms"] is not None), default=None),
        "rps": round(requests / seconds, 1) if seconds > 0 else None,
        "server_p50_ms": {
            name: percentile([r["server_p50_ms"][name] for r in rounds if name in r["server_p50_ms"]], 50)
            for name in sorted(parts)
        },
        "rounds": [{name: r[name] for name in ("requests", "seconds", "rps", "p50_ms", "p99_ms")} for r in rounds],
    }


def healthz(base: str) -> dict:
    """The service's /healthz."""
    import httpx

    return httpx.get(f"{base}/healthz", timeout=10).json()


class ModelTimer:
    """VERSION's network loaded in this process (load_predictor) and one batch of MODEL_BATCH
    preprocessed test images (the card's preprocessing, as orchard/serving/predictor.py builds inputs)."""

    def __init__(self, version: str, images: list[tuple[str, bytes]]):
        import numpy as np

        from orchard.core.settings import load_settings
        from orchard.spark_app.images import decode_image
        from orchard.spark_app.local_prediction import load_predictor
        from orchard.spark_app.preprocess import preprocessor

        self.net, card = load_predictor(load_settings(), version)
        prep = preprocessor(card["preprocessing"])
        size = tuple(int(v) for v in card["input_size"])
        channels = int(card.get("channels", 3))
        pictures = [images[i % len(images)][1] for i in range(MODEL_BATCH)]
        self.batch = np.stack([prep(decode_image(p, (size[0], size[1]), channels)) for p in pictures])
        for _ in range(3):  # trace and warm up, outside the timing
            self.net.predict_on_batch(self.batch)

    def time(self, seconds: float) -> dict:
        """predict_on_batch of the batch, repeated for `seconds`: calls and images/s."""
        calls, began = 0, time.monotonic()
        while time.monotonic() - began < seconds:
            self.net.predict_on_batch(self.batch)
            calls += 1
        wall = time.monotonic() - began
        return {"calls": calls, "seconds": round(wall, 2), "images_per_second": round(calls * MODEL_BATCH / wall, 1)}


def merged_model_rounds(rounds: list[dict]) -> dict:
    """The model_only step of its rounds: images/s of the sums."""
    calls, seconds = sum(r["calls"] for r in rounds), sum(r["seconds"] for r in rounds)
    ips = round(calls * MODEL_BATCH / seconds, 1)
    return {
        "step": "model_only",
        "batch": MODEL_BATCH,
        "calls": calls,
        "seconds": round(seconds, 2),
        "images_per_second": ips,
        "rounds": rounds,
    }


def enrichment(o: argparse.Namespace, seed: int, work: Path, version: str) -> dict:
    """Upload new images and time how soon the stack's service has predicted each (see the docstring).
    The index is polled while the upload runs: a large upload's first images are predicted long
    before its last ones are stored."""
    from orchard.core.clients import es_client
    from orchard.core.settings import load_settings

    s = load_settings()
    es = es_client(s)
    dataset, tree = f"bench-serve-new-{seed + 1}", work / "new" / "tree"
    counts = ("--classes", str(o.classes), "--per-class", str(o.enrich_per_class), "--test-per-class", "1")
    orchard("dataset", "synth", str(tree), *counts, "--seed", str(seed + 1))
    query = {"bool": {"filter": [{"term": {"dataset": dataset}}, {"term": {"prediction.model_version": version}}]}}
    seen: dict[str, float] = {}
    began, deadline = time.time(), time.time() + o.enrich_timeout
    upload, errors = start_upload(tree, dataset, work / "new" / "upload.err")
    total: int | None = None
    upload_s: float | None = None
    while time.time() < deadline and (total is None or len(seen) < total):
        if total is None and upload.poll() is not None:  # stored and indexed: the count is final
            if upload.returncode != 0:
                raise SystemExit(f"orchard upload failed ({upload.returncode}): {errors.read_text()[-3000:]}")
            upload_s = time.time() - began
            total = es.count(index=s.images_index, query={"term": {"dataset": dataset}})["count"]
        now = time.time()
        hits = es.search(index=s.images_index, query=query, size=10_000, source_includes=["uploaded_at"])
        for hit in hits["hits"]["hits"]:
            uploaded = datetime.fromisoformat(hit["_source"]["uploaded_at"].replace("Z", "+00:00")).timestamp()
            seen.setdefault(hit["_id"], now - uploaded)
        time.sleep(0.25)
    delays = sorted(seen.values())
    return {
        "step": "enrich",
        "dataset": dataset,
        "images": total,
        "upload_seconds": round(upload_s, 1) if upload_s is not None else None,
        "predicted": len(seen),
        "p50_s": round(percentile(delays, 50) or 0, 2) if delays else None,
        "p99_s": round(percentile(delays, 99) or 0, 2) if delays else None,
        "max_s": round(delays[-1], 2) if delays else None,
    }


def start_upload(tree: Path, dataset: str, errors: Path) -> tuple[subprocess.Popen, Path]:
    """`orchard upload TREE --dataset DATASET` started in the background, its stderr into `errors`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "orchard", "-q", "upload", str(tree), "--dataset", dataset]
    with errors.open("w") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink), errors


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per /healthz poll
    o = parse_args(argv)
    seed = o.seed if o.seed is not None else int(time.time()) % 1_000_000
    with tempfile.TemporaryDirectory(prefix="orchard-bench-serve-") as tmp:
        work = Path(tmp)
        dataset = prepare(o, seed, work, "bench-serve")
        images = held_out_images(work / "tree")
        train = train_step("train", dataset, o.epochs)
        version = train["version"]
        log.info("trained %s; embedding the dataset", version)
        summary, wall = orchard("features", "--dataset", dataset, "--model", version, "--json")
        features = {"step": "features", "images": (summary or {}).get("images"), "wall_seconds": round(wall, 1)}
        orchard("models", "promote", version)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = work / "serve.log"
        proc = start_server(port, log_path)
        try:
            ready = {
                "step": "serve",
                "port": port,
                "ready_seconds": round(wait_ready(base, version, proc, o.ready_timeout, log_path), 1),
            }
            *levels, alone = run_levels(o, base, images, work, ModelTimer(version, images))
            health = healthz(base)
        finally:
            stop_server(proc)
        log.info("uploading new images: the stack's service predicts them from MinIO's notifications")
        enrich = enrichment(o, seed, work, version)
    by = report_steps([train, features, {"step": "promote", "version": version}, ready, *levels, alone, enrich])
    result: dict = {**split_facts(o, dataset), "version": version, "steps": by}
    for level in levels:
        n, suffix = level["clients"], "" if level["k"] == o.k else "_predict_only"
        result.update({f"{name}_{n}{suffix}": level[name] for name in ("p50_ms", "p99_ms", "rps")})
    model_ips = alone["images_per_second"]
    result["model_only_ips"] = model_ips
    for name in ("rps_32", "rps_32_predict_only"):
        rps = result.get(name)
        result[f"{name}_over_model_only"] = round(rps / model_ips, 3) if rps and model_ips else None
        level = by.get(name.replace("rps", "clients"), {})
        result[f"{name}_over_model_only_rounds"] = [
            round(r["rps"] / m["images_per_second"], 3)
            for r, m in zip(level.get("rounds", []), alone["rounds"], strict=False)
            if r["rps"]
        ]
    result["largest_batch"] = levels[-1]["largest_batch_so_far"] if levels else None
    result["model_calls"] = health.get("model_calls")
    result["images_predicted"] = health.get("images_predicted")
    result["enrich_p50_s"] = enrich["p50_s"]
    result["enrich_p99_s"] = enrich["p99_s"]
    result["enrich_predicted"] = f"{enrich['predicted']}/{enrich['images']}"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
