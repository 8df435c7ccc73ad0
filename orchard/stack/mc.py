"""Run the official MinIO client (`mc`, built by `make deps`) against the stack's S3 endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain

ALIAS = "orchard"


@contextmanager
def mc_env(s: Settings, endpoint: str | None = None) -> Iterator[dict[str, str]]:
    """Environment for mc in which the alias `orchard` is defined; valid inside the `with` only.

    The alias lives in the config.json of a private temporary MC_CONFIG_DIR (0700, the file 0600),
    removed on exit. Why not MC_HOST_orchard (a URL with the key and secret as its user info, no
    file at all): mc splits that URL with a regular expression and never percent-decodes it, so a
    secret with a `:` (read as the start of a session token) or one that needs %-escaping cannot
    be passed that way. In JSON any key works, and no key is ever on a command line.
    """
    access_key, secret_key = s.secret("s3_access_key"), s.secret("s3_secret_key")
    url = urlparse(endpoint or s.s3_url)
    alias = {
        "url": f"{url.scheme}://{url.netloc.rpartition('@')[2]}",
        "accessKey": access_key,
        "secretKey": secret_key,
        "api": "s3v4",
        "path": "auto",
    }
    with tempfile.TemporaryDirectory(prefix="orchard-mc-") as config_dir:
        fd = os.open(Path(config_dir) / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": "10", "aliases": {ALIAS: alias}}, fh)
        env = dict(os.environ)
        # Either would take precedence over config.json for the alias.
        env.pop(f"MC_HOST_{ALIAS}", None)
        env.pop("MC_CONFIG_ENV_FILE", None)
        env["MC_CONFIG_DIR"] = config_dir
        yield env


def run_mc(
    s: Settings, *args: str, endpoint: str | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `mc ARGS` (use the alias `orchard`); returns the completed process."""
    mc = str(Toolchain.from_cache(s.cache_dir).mc)
    with mc_env(s, endpoint) as env:
        return subprocess.run([mc, *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


def mc_json(
    s: Settings, *args: str, endpoint: str | None = None, timeout: float = 120, check: bool = True
) -> list[dict]:
    """Run `mc --json ARGS` (options as `run_mc`); returns every JSON line it printed."""
    out = run_mc(s, "--json", *args, endpoint=endpoint, timeout=timeout, check=check).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
