"""Running the CLI as a user does, for the integration tests: `bin/orchard ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from orchard.stack.process import peak_rss

__all__ = ["ORCHARD", "last_json", "ok", "orchard", "peak_rss"]  # peak_rss: re-exported for the tests

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
