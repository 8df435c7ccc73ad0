"""Running the CLI as a user does, for the integration tests: `bin/orchard ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORCHARD = REPO / "bin" / "orchard"


def orchard(*args: str, timeout: float = 1200, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI like a user; stdout/stderr captured; `env` adds (ORCHARD_*) variables to ours."""
    full_env = {**os.environ, **env} if env else None
    return subprocess.run(
        [str(ORCHARD), *args], capture_output=True, text=True, timeout=timeout, check=False, env=full_env
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert exit 0, showing the end of stderr otherwise."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc


def last_json(proc: subprocess.CompletedProcess):
    """The JSON document on the last line of stdout."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_of(pid: int) -> int:
    """VmHWM: the peak resident set of the process's current program (bytes), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((row for row in status.splitlines() if row.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024
