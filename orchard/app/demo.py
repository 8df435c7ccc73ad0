"""`orchard demo` (`make demo`): the main job end to end on the stack, with an HTML report.

stack up -> synth -> upload -> spark -> train -> infer -> features -> report, each stage timed.
synth and upload run the `orchard` commands a user would type, as child processes (logs in
<out>/logs/<stage>.log); train, infer and features call the same functions as `orchard train |
infer | features`, in one Spark application so that its executors start once (logs in
<out>/logs/spark.log). The report lists the command that runs each stage alone. The stack is
stopped at the end, also after a failure, unless --keep.

Re-running is cheap and safe: the synthetic tree is byte-identical (files are kept), the upload
finds everything present, training registers a new model version, and the report shows the
newest version of the dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click

from orchard.app import report as reporting
from orchard.app.cli import settings_from
from orchard.app.report import Stage, human_seconds
from orchard.app.upload_cli import synth_size_options
from orchard.core.errors import ExitStatus, OrchardError
from orchard.core.settings import Settings, load_settings
from orchard.core.toolchain import REPO_ROOT
from orchard.spark_app.bovw import BovwPlan, run_bovw
from orchard.spark_app.features import run_features
from orchard.spark_app.infer import raise_for_failures, run_inference
from orchard.spark_app.registry import FAMILY_BOVW
from orchard.spark_app.session import build_session, executor_count
from orchard.spark_app.train import run_training
from orchard.spark_app.transfer import BASES, TransferPlan, run_transfer
from orchard.stack import launcher
from orchard.stack.setup import setup_stack

log = logging.getLogger(__name__)

# Default size: small enough that `make demo` (stack start, upload, train, infer, features, report)
# finishes well inside 15 minutes on 2 cores; README.md "The two commands" lists the flags that grow it.
DEFAULT_CLASSES = 8
DEFAULT_PER_CLASS = 40
DEFAULT_TEST_PER_CLASS = 15
DEFAULT_EPOCHS = 5
LOG_TAIL = 15  # lines of a failed stage's log shown on the terminal


class StageFailed(OrchardError):
    """A demo stage failed: one line naming the stage, with the stage's own exit status."""

    def __init__(self, stage: str, reason: str, status: int = ExitStatus.FAILURES) -> None:
        super().__init__(f"demo failed at stage '{stage}': {reason}")
        self.stage = stage
        try:
            self.exit_status = ExitStatus(status)
        except ValueError:  # e.g. a child killed by a signal: -9
            self.exit_status = ExitStatus.FAILURES


@dataclass(frozen=True)
class DemoOptions:
    """The flags of one demo run."""

    dataset: str = "demo"
    classes: int = DEFAULT_CLASSES
    per_class: int = DEFAULT_PER_CLASS
    test_per_class: int = DEFAULT_TEST_PER_CLASS
    epochs: int = DEFAULT_EPOCHS
    seed: int | None = None
    source: Path | None = None  # a real class-per-folder tree (Fruits-360) instead of synthetic data
    out: Path = Path("out/report")
    base: str | None = None  # transfer learning from this pretrained base instead of the CNN from scratch
    family: str | None = None  # bovw: the bag-of-visual-words family instead of a CNN

    @property
    def synth_seed(self) -> int:
        """The synthesis seed: given, or derived from the dataset name. Document ids are content
        hashes shared by the whole stack, so two datasets must not draw the same images."""
        return self.seed if self.seed is not None else zlib.crc32(self.dataset.encode()) % 1_000_000

    @property
    def logs(self) -> Path:
        return self.out / "logs"


def dataset_dir(s: Settings, o: DemoOptions) -> Path:
    """Where the synthetic tree of these options lives (one tree per size and seed, reused)."""
    name = f"{o.dataset}-{o.classes}x{o.per_class}+{o.test_per_class}-seed{o.synth_seed}"
    return s.home / "datasets" / name


@dataclass
class DemoRun:
    """One run of the stages; `stages` collects their timings."""

    s: Settings
    o: DemoOptions
    echo: Callable[[str], None] = click.echo
    stages: list[Stage] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what stages learnt: version, image counts, ...

    def child_env(self) -> dict[str, str]:
        """The environment of child commands: this checkout on PYTHONPATH, this run's home."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env["ORCHARD_HOME"] = str(self.s.home)
        return env

    def orchard(self, stage: str, *args: str) -> str:
        """Run `orchard ARGS` as a child process, stderr to the stage's log; returns its stdout.

        Raises StageFailed with the child's last error line and exit status if it fails.
        """
        self.o.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.o.logs / f"{stage}.log"
        argv = [sys.executable, "-m", "orchard", *args]
        log.debug("running %s (log %s)", shlex.join(argv), log_file)
        with log_file.open("w") as err:
            proc = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, env=self.child_env(), check=False
            )
        if proc.returncode != 0:
            self.show_tail(log_file)
            raise StageFailed(
                stage,
                f"`orchard {shlex.join(args)}` exited {proc.returncode}: {last_error(log_file)} (log: {log_file})",
                proc.returncode,
            )
        return proc.stdout

    def show_tail(self, log_file: Path) -> None:
        """The end of a failed stage's log, on stderr."""
        lines = log_file.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        click.echo("\n".join(f"    | {line}" for line in lines), err=True)

    def timed(self, name: str, unit: str, body: Callable[[], tuple[int | None, int | None, str]]) -> None:
        """Run one stage; record its time, item count, work (for the throughput) and command."""
        self.echo(f"==> {name} ...")
        began = time.monotonic()
        items, work, command = body()
        stage = Stage(name, round(time.monotonic() - began, 2), items, unit, work, command)
        self.stages.append(stage)
        rate = f", {stage.per_second:.1f} {unit}/s" if stage.per_second else ""
        self.echo(
            f"    {name}: {human_seconds(stage.seconds)}{f' ({items:,} {unit}{rate})' if items is not None else ''}"
        )

    # --- the stages ---------------------------------------------------------------------------

    def stack_up(self) -> tuple[int, int, str]:
        try:
            rows = launcher.up(self.s)
        except OrchardError as exc:
            raise StageFailed(
                "stack", f"{exc} (see `orchard stack status` and `orchard stack logs NAME`)", exc.exit_status
            ) from exc
        self.s = load_settings(home=self.s.home)  # the credentials may have been generated just now
        return len(rows), 0, "orchard stack up"  # work 0: a service count has no throughput

    def setup(self) -> tuple[None, None, str]:
        """--no-stack: the services in the settings are already running; create buckets and indices."""
        try:
            setup_stack(self.s)
        except OrchardError as exc:
            raise StageFailed("setup", str(exc), exc.exit_status) from exc
        return None, None, "orchard setup"

    def synth(self) -> tuple[int, None, str]:
        o = self.o
        out = dataset_dir(self.s, o)
        args = [
            "dataset",
            "synth",
            str(out),
            "--classes",
            str(o.classes),
            "--per-class",
            str(o.per_class),
            "--test-per-class",
            str(o.test_per_class),
            "--seed",
            str(o.synth_seed),
        ]
        self.orchard("synth", *args)
        self.facts["source"] = out
        return o.classes * (o.per_class + o.test_per_class), None, "orchard " + shlex.join(args)

    def upload(self) -> tuple[int, None, str]:
        source = self.o.source or self.facts["source"]
        report = (self.o.logs / "upload-report.json").absolute()
        args = ["upload", str(source), "--dataset", self.o.dataset, "--report", str(report)]
        self.orchard("upload", *args)
        counts = json.loads(report.read_text())["counts"]
        if counts.get("skipped"):
            log.warning("upload skipped %d files (duplicates or unsupported): see %s", counts["skipped"], report)
        items = sum(counts.get(k, 0) for k in ("uploaded", "present", "skipped", "failed"))
        if not counts.get("uploaded", 0) + counts.get("present", 0):
            raise StageFailed(
                "upload",
                f"no images found under {source} (expected <split>/<label>/<image>, "
                f"e.g. Training/Apple/0_100.jpg; see {report})",
            )
        self.facts["upload"] = counts
        return items, None, "orchard " + shlex.join(args[:4])

    @property
    def spark_log(self) -> Path:
        return self.o.logs / "spark.log"

    def spark_stage(self, stage: str, call: Callable[[], object]):
        """Run one Spark stage's function; any failure becomes StageFailed naming the stage."""
        try:
            return call()
        except OrchardError as exc:
            raise StageFailed(stage, f"{exc} (log: {self.spark_log})", exc.exit_status) from exc
        except Exception as exc:
            log.exception("stage %s failed", stage)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise StageFailed(stage, f"{type(exc).__name__}: {first[:300]} (log: {self.spark_log})") from exc

    def start_spark(self, holder: dict) -> tuple[int, int, str]:
        """Start the demo's Spark application (driver JVM, executors, shipped packages)."""
        spark = self.spark_stage("spark", lambda: build_session(self.s, f"orchard-demo-{self.o.dataset}"))
        holder["spark"] = spark
        executors = self.spark_stage("spark", lambda: executor_count(spark))
        return executors, 0, f"(each Spark command starts its own application on {self.s.spark_master_url})"

    def train(self, spark) -> tuple[int, None, str]:
        """Items: train images x epochs (each epoch passes every train image through the model or head)."""
        o = self.o
        if o.family == FAMILY_BOVW:
            doc = self.spark_stage("train", lambda: run_bovw(spark, self.s, BovwPlan(o.dataset)))
            self.facts["version"] = doc["version"]
            return int(doc["train_images"]), None, f"orchard train --dataset {o.dataset} --family bovw"
        if o.base:
            plan = TransferPlan(o.dataset, o.base, epochs=o.epochs)
            doc = self.spark_stage("train", lambda: run_transfer(spark, self.s, plan))
        else:
            doc = self.spark_stage("train", lambda: run_training(spark, self.s, o.dataset, epochs=o.epochs))
        self.facts["version"] = doc["version"]
        images = int(doc["train_images"])
        base = f" --base {o.base}" if o.base else ""
        return images * o.epochs, None, f"orchard train --dataset {o.dataset}{base} --epochs {o.epochs}"

    def infer(self, spark) -> tuple[int, None, str]:
        version = self.facts["version"]
        summary = self.spark_stage("infer", lambda: run_inference(spark, self.s, self.o.dataset, version))
        self.spark_stage("infer", lambda: raise_for_failures(summary))
        return int(summary["images"]), None, f"orchard infer --dataset {self.o.dataset} --model {version}"

    def features(self, spark) -> tuple[int, None, str]:
        version = self.facts["version"]
        summary = self.spark_stage("features", lambda: run_features(spark, self.s, self.o.dataset, version))
        self.spark_stage("features", lambda: raise_for_failures(summary))
        return int(summary["images"]), None, f"orchard features --dataset {self.o.dataset} --model {version}"

    def run_spark_stages(self) -> None:
        """train, infer and features in ONE Spark application: its executors (Python workers with
        TensorFlow imported, the model cached) serve all three instead of three cold starts.
        Driver and Spark logs go to <out>/logs/spark.log."""
        self.o.logs.mkdir(parents=True, exist_ok=True)
        self.echo(f"    (Spark logs: {self.spark_log})")
        holder: dict = {}
        with stderr_to(self.spark_log):
            try:
                self.timed("spark", "executors", partial(self.start_spark, holder))
                for name, unit, body in (
                    ("train", "image-epochs", self.train),
                    ("infer", "images", self.infer),
                    ("features", "images", self.features),
                ):
                    self.timed(name, unit, partial(body, holder["spark"]))
            finally:
                if "spark" in holder:
                    holder["spark"].stop()

    def run_pipeline(self, native: bool = True) -> None:
        """stack up (or setup), synth (unless --source), upload, then the Spark stages."""
        if native:
            self.timed("stack up", "services", self.stack_up)
        else:
            self.timed("setup", "", self.setup)
        if self.o.source is None:
            self.timed("synth", "images", self.synth)
        self.timed("upload", "files", self.upload)
        self.run_spark_stages()

    def report(self):
        """Query the stack and write the report; the report stage's own time is in it too."""
        self.echo("==> report ...")
        began = time.monotonic()
        try:
            page = reporting.prepare(self.s, self.o.dataset)
            if not self.stages:  # --report-only: keep the timings of the run that made this model, if known
                self.stages = previous_stages(self.o.out / "summary.json", page.data)
            seconds = round(time.monotonic() - began, 2)
            stage = Stage(
                "report",
                seconds,
                page.data.totals.get("total"),
                "documents",
                command=f"orchard demo --report-only --dataset {shlex.quote(self.o.dataset)}",
            )
            page.data.stages = reporting.stage_rows([*self.stages, stage])
            path = reporting.write(page, self.o.out)
        except OrchardError as exc:
            raise StageFailed("report", str(exc), exc.exit_status) from exc
        except Exception as exc:
            log.debug("report failed", exc_info=True)
            raise StageFailed("report", f"{type(exc).__name__}: {exc}") from exc
        self.stages.append(stage)
        self.echo(f"    report: {human_seconds(seconds)}")
        return path, page.data


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 to `path` (truncated): Python logging and the JVMs started meanwhile
    write there instead of flooding the terminal, which keeps the stage lines (stdout)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def previous_stages(summary_file: Path, data) -> list[Stage]:
    """The pipeline stages recorded in an earlier summary.json of the same dataset and model version
    (without its report stage); [] when there is none or it belongs to another run."""
    try:
        old = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return []
    same_model = (old.get("model") or {}).get("version") == (data.model or {}).get("version")
    if old.get("dataset") != data.dataset or not same_model:
        return []
    fields = ("name", "seconds", "items", "unit", "work", "command")
    return [Stage(**{k: st.get(k) for k in fields}) for st in old.get("stages", []) if st.get("name") != "report"]


def last_error(log_file: Path) -> str:
    """The last ERROR line of a log (without its timestamp), else its last non-empty line."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if " ERROR " in line or line.startswith(("Error:", "Traceback")):
            return line.split(": ", 1)[-1] if " ERROR " in line else line
    return lines[-1] if lines else "no output"


def summary_lines(data, stages: list[Stage], page: Path) -> list[str]:
    """The terminal summary: dataset, model, accuracy, stage times, where the report is."""
    splits = " · ".join(f"{sp} {data.totals.get(sp, 0):,}" for sp in data.splits)
    lines = [
        "",
        f"Orchard demo: dataset {data.dataset}",
        f"  images    {data.totals.get('total', 0):,} ({splits}) in {data.classes} classes",
    ]
    if data.model:
        m = data.model
        passes = (
            f"{m.get('epochs')} L-BFGS iterations" if m.get("family") == FAMILY_BOVW else f"{m.get('epochs')} epochs"
        )
        lines.append(
            f"  model     {m['version']} ({m.get('architecture')}, {m.get('params', 0):,} parameters, {passes})"
        )
        acc = "-" if data.accuracy is None else f"{data.accuracy:.1%}"
        lines.append(
            f"  accuracy  {acc} on {data.test_split} ({data.correct:,}/{data.predicted:,} predictions in "
            f"Elasticsearch); model evaluation {m.get('metrics', {}).get('test_accuracy', 0):.1%}"
        )
    lines.append(f"  {'stage':<10}{'time':>12}{'items':>22}{'per second':>12}")
    for st in stages:
        items = f"{st.items:,} {st.unit}" if st.items is not None else ""
        rate = f"{st.per_second:.1f}" if st.per_second else "-"
        lines.append(f"  {st.name:<10}{human_seconds(st.seconds):>12}{items:>22}{rate:>12}")
    lines.append(f"  {'total':<10}{human_seconds(sum(st.seconds for st in stages)):>12}")
    lines.append(f"  report    {page.absolute()}")
    return lines


def stop_stack(s: Settings) -> None:
    """Stop the native stack (data kept); a failure to stop is logged, not raised."""
    try:
        stopped = launcher.down(s)
        click.echo(f"stack stopped ({len(stopped)} processes; data kept; `make demo KEEP=1` leaves it running)")
    except (OrchardError, OSError) as exc:
        log.error("could not stop the stack: %s", exc)


@click.command()
@click.option("--keep", is_flag=True, help="Leave the stack running afterwards [make demo KEEP=1].")
@click.option("--dataset", default="demo", show_default=True, help="Dataset name (reused: re-runs are cheap).")
@synth_size_options(DEFAULT_CLASSES, DEFAULT_PER_CLASS, DEFAULT_TEST_PER_CLASS, min_classes=2, min_images=1)
@click.option("--epochs", type=click.IntRange(1), default=DEFAULT_EPOCHS, show_default=True)
@click.option("--seed", type=int, default=None, help="Synthesis seed [default: derived from --dataset].")
@click.option(
    "--base",
    type=click.Choice(BASES),
    default=None,
    help="Train by transfer learning from this ImageNet-pretrained base (as `orchard train --base`).",
)
@click.option(
    "--family",
    type=click.Choice([FAMILY_BOVW]),
    default=None,
    help="Train the bag-of-visual-words family (as `orchard train --family bovw`) instead of a CNN.",
)
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A real class-per-folder tree (e.g. Fruits-360 with Training/ and Test/) instead of synthetic data.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out/report"),
    show_default=True,
    help="Report directory (index.html, summary.json, logs/).",
)
@click.option(
    "--no-stack",
    is_flag=True,
    help="Use the services in the settings as they are (compose, AWS S3 + EMR): run `orchard setup` "
    "instead of starting and stopping the native stack.",
)
@click.option(
    "--report-only",
    is_flag=True,
    help="Only rebuild the report of --dataset from a running stack (no stages, the stack is left as is).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    keep: bool,
    dataset: str,
    classes: int,
    per_class: int,
    test_per_class: int,
    epochs: int,
    seed: int | None,
    base: str | None,
    family: str | None,
    source: Path | None,
    out: Path,
    no_stack: bool,
    report_only: bool,
) -> int:
    """The main job end to end: stack, synthetic data, upload, Elephas training, inference,
    features + PCA, and a self-contained HTML report (OUT/index.html)."""
    if family and base:
        raise click.UsageError("--base and --family bovw are two different model families: choose one")
    options = DemoOptions(dataset, classes, per_class, test_per_class, epochs, seed, source, out, base, family)
    run = DemoRun(settings_from(ctx), options)
    try:
        if not report_only:
            run.run_pipeline(native=not no_stack)
        page, data = run.report()
    finally:
        if not (keep or report_only or no_stack):
            stop_stack(run.s)
    click.echo("\n".join(summary_lines(data, run.stages, page)))
    return ExitStatus.OK
