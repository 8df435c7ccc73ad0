"""Run the official MinIO client (`mc`, built by `make deps`) against the stack's S3 endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from urllib.parse import quote, urlparse

from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain

ALIAS = "orchard"


def mc_env(s: Settings, endpoint: str | None = None) -> dict[str, str]:
    """Environment that defines the `orchard` alias for mc (MC_HOST_*), no config file written."""
    s.require("s3_access_key", "s3_secret_key")
    url = urlparse(endpoint or s.s3_url)
    key = quote(s.s3_access_key.get_secret_value(), safe="")
    secret = quote(s.s3_secret_key.get_secret_value(), safe="")
    env = dict(os.environ)
    env[f"MC_HOST_{ALIAS}"] = f"{url.scheme}://{key}:{secret}@{url.netloc}"
    env["MC_CONFIG_DIR"] = os.path.join(tempfile.gettempdir(), f"orchard-mc-{os.getuid()}")
    return env


def run_mc(
    s: Settings, *args: str, endpoint: str | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `mc ARGS` (use the alias `orchard`); returns the completed process."""
    mc = str(Toolchain.from_cache(s.cache_dir).mc)
    return subprocess.run(
        [mc, *args], env=mc_env(s, endpoint), capture_output=True, text=True, timeout=timeout, check=check
    )


def mc_json(s: Settings, *args: str, **kwargs) -> list[dict]:
    """Run `mc --json ARGS`; returns every JSON line it printed."""
    out = run_mc(s, "--json", *args, **kwargs).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
