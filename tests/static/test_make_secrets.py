"""compose/make-secrets.sh and compose/.env.example: random secrets, pins from one place, re-runnable."""

from __future__ import annotations

import re
import stat

from compose_checks import COMPOSE_FILE, ENV_TEMPLATE, SECRET_KEYS, write_env
from orchard.core.toolchain import read_versions

# ${NAME...} in the compose file, but not $${NAME} (escaped: expanded inside the container).
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)")


def template_keys() -> list[str]:
    return [line.split("=", 1)[0] for line in ENV_TEMPLATE.read_text().splitlines() if re.match(r"[A-Z0-9_]+=", line)]


def test_secrets_are_random_private_and_distinct(tmp_path):
    env_file = write_env(tmp_path / ".env")
    values = read_versions(env_file)
    secrets = [values[k] for k in SECRET_KEYS]
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", s) for s in secrets)
    assert len(set(secrets)) == len(secrets)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    other = read_versions(write_env(tmp_path / "other.env"))
    assert all(other[k] != values[k] for k in SECRET_KEYS), "two runs generated the same secret"


def test_pins_come_from_deps_versions_env(tmp_path, versions):
    values = read_versions(write_env(tmp_path / ".env"))
    pinned = [k for k in template_keys() if k in versions]
    assert {"ES_VERSION", "MINIO_VERSION", "MC_VERSION", "HADOOP_VERSION", "AWS_SDK_BUNDLE_VERSION"} <= set(pinned)
    assert {"DELTA_VERSION", "DELTA_SPARK_SHA256", "DELTA_STORAGE_SHA256"} <= set(pinned)
    assert {k: values[k] for k in pinned} == {k: versions[k] for k in pinned}


def test_rerun_keeps_secrets_and_local_changes(tmp_path):
    env_file = write_env(tmp_path / ".env")
    first = read_versions(env_file)
    env_file.write_text(env_file.read_text().replace("KIBANA_PORT=5601", "KIBANA_PORT=15601"))
    second = read_versions(write_env(env_file))
    assert {k: second[k] for k in SECRET_KEYS} == {k: first[k] for k in SECRET_KEYS}
    assert second["KIBANA_PORT"] == "15601"


def test_an_emptied_secret_is_regenerated(tmp_path):
    env_file = write_env(tmp_path / ".env")
    env_file.write_text(re.sub(r"^ELASTIC_PASSWORD=.*$", "ELASTIC_PASSWORD=", env_file.read_text(), flags=re.M))
    assert len(read_versions(write_env(env_file))["ELASTIC_PASSWORD"]) == 32


def test_template_commits_no_secret_value():
    values = read_versions(ENV_TEMPLATE)
    assert {k: values[k] for k in SECRET_KEYS} == dict.fromkeys(SECRET_KEYS, "")


def test_every_template_variable_is_commented():
    lines = ENV_TEMPLATE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"[A-Z0-9_]+=", line):
            assert number > 0 and lines[number - 1].startswith("# "), f"{line.split('=')[0]} has no comment above it"


def test_every_compose_variable_is_in_the_template():
    used = set(COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text()))
    missing = used - set(template_keys())
    assert not missing, f"compose uses variables .env.example does not define: {sorted(missing)}"


def test_exactly_the_secret_keys_are_generated(tmp_path):
    """*_PASSWORD, *_SECRET_KEY, *_ENCRYPTION_KEY and *_API_KEY (ORCHARD_SERVE_API_KEY) are generated;
    access keys and user names keep the template's value."""
    template = read_versions(ENV_TEMPLATE)
    values = read_versions(write_env(tmp_path / ".env"))
    generated = {k for k in template_keys() if not template[k] and re.fullmatch(r"[A-Za-z0-9]{32}", values[k])}
    assert generated == set(SECRET_KEYS)
    assert values["SERVE_S3_ACCESS_KEY"] == template["SERVE_S3_ACCESS_KEY"] == "orchard-serve"
