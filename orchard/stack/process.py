"""Processes the launcher starts: spawn detached, remember by pid file, stop only those."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PidRecord:
    """A started process: its pid and create time, so a recycled pid is never mistaken for it."""

    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None if it is gone or the pid was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


def read_pid(pid_file: Path) -> PidRecord | None:
    """The record in `pid_file`, or None if there is none or it is unreadable."""
    try:
        data = json.loads(pid_file.read_text())
        return PidRecord(pid=int(data["pid"]), create_time=float(data["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_pid(pid_file: Path) -> int | None:
    """The pid of the live process recorded in `pid_file`, else None."""
    record = read_pid(pid_file)
    return record.pid if record and record.process() else None


def spawn(argv: list[str], env: dict[str, str], log_file: Path, pid_file: Path, cwd: Path | None = None) -> int:
    """Start `argv` detached in its own session, output appended to `log_file`; returns the pid."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        out.write(f"\n--- orchard: starting {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    create_time = psutil.Process(proc.pid).create_time()
    pid_file.write_text(json.dumps({"pid": proc.pid, "create_time": create_time, "argv": argv}))
    return proc.pid


def stop(pid_file: Path, grace: float = 30.0) -> bool:
    """Stop the recorded process and its children (SIGTERM, then SIGKILL); True if one was running."""
    record = read_pid(pid_file)
    proc = record.process() if record else None
    if proc is None:
        pid_file.unlink(missing_ok=True)
        return False
    family = [proc, *proc.children(recursive=True)]
    _signal_group(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace)
    if alive:
        log.warning("%s did not stop in %.0fs; killing", pid_file.stem, grace)
        _signal_group(proc.pid, signal.SIGKILL)
        for p in alive:
            _kill_quietly(p)
        psutil.wait_procs(alive, timeout=10)
    pid_file.unlink(missing_ok=True)
    return True


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MiB (0 if it is gone)."""
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
        return round(sum(p.memory_info().rss for p in family) / 2**20, 1)
    except psutil.Error:
        return 0.0


def peak_rss(pid: int) -> int:
    """VmHWM: the peak resident set of a process's current program (bytes), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((row for row in status.splitlines() if row.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group the launcher created (pgid == pid, thanks to start_new_session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill_quietly(proc: psutil.Process) -> None:
    with contextlib.suppress(psutil.Error):
        proc.kill()


def last_line(log_file: Path, max_bytes: int = 8192) -> str:
    """The last non-empty line of a log file (for one-line failure reasons)."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 1.0) -> bool:
    """Poll `predicate()` until it is truthy or `timeout` seconds pass; returns the last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
