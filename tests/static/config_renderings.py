"""The config templates both deployments share (images/*/*.template), as compose renders them.

The container's environment is its image's ENV (the final stage of its Dockerfile, build args from
the compose model) under the service's `environment` of the resolved compose model
(`docker compose config`). It is substituted the way each container does it:

* minio-lb: the nginx image's entrypoint runs envsubst on /etc/nginx/templates/*.template with
  the variables its NGINX_ENVSUBST_FILTER matches (`$NAME` and `${NAME}`), nothing else;
* Elasticsearch: its own `${NAME}` substitution in the values of elasticsearch.yml (an unset
  one stops the node), plus the settings it takes from dotted environment variables;
* the orchard/spark image: its entrypoint runs orchard.core.config_templates, the launcher's own
  renderer.

Parsers turn each format into comparable settings (comments and layout dropped).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from orchard.core.config_templates import render
from orchard.core.toolchain import REPO_ROOT

ES_CONFIG_TARGET = "/usr/share/elasticsearch/config/elasticsearch.yml"
# An environment variable Elasticsearch's image takes as a setting: lower-case, dotted.
ES_SETTING_VAR = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


# --- the container's environment --------------------------------------------------------------
def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    result = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage (from its FROM on)."""
    instructions = dockerfile_instructions(dockerfile)
    start = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[start:]


def expand(value: str, variables: dict[str, str]) -> str:
    """Docker's `$NAME` / `${NAME}` expansion in ENV values (unset: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def image_env(dockerfile: Path, build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The ENV of the image the final stage of `dockerfile` builds (KEY=VALUE form only)."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for instruction, text in final_stage(dockerfile):
        if instruction == "ARG":
            name, _, default = text.partition("=")
            args[name] = (build_args or {}).get(name, default)
        elif instruction == "ENV":
            for pair in shlex.split(text):
                key, _, value = pair.partition("=")
                env[key] = expand(value, args | env)
    return env


def dockerfile_of(service: dict) -> Path:
    build = service["build"]
    return Path(build["context"]) / build.get("dockerfile", "Dockerfile")


def container_env(compose_config: dict, name: str) -> dict[str, str]:
    """What the container of compose service `name` sees: image ENV, then the service's."""
    service = compose_config["services"][name]
    env = {}
    if "build" in service:
        env = image_env(dockerfile_of(service), service["build"].get("args") or {})
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None})
    return env


# --- compose's renderings ---------------------------------------------------------------------
def envsubst(text: str, env: dict[str, str], names_pattern: str) -> str:
    """GNU envsubst with the list of defined variables matching `names_pattern`, as the nginx
    image's 20-envsubst-on-templates.sh calls it."""
    names = {n for n in env if re.search(names_pattern, n)}

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return env[name] if name in names else match.group(0)

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def nginx_template_copy(dockerfile: Path) -> tuple[Path, str]:
    """(source in the build context, destination) of the template the minio-lb image copies."""
    for instruction, text in final_stage(dockerfile):
        if instruction == "COPY" and text.split()[0].endswith(".template"):
            source, destination = text.split()[-2:]
            return dockerfile.parent / source, destination
    raise AssertionError(f"{dockerfile} copies no .template")


def compose_nginx_conf(compose_config: dict) -> str:
    """/etc/nginx/nginx.conf of the minio-lb container."""
    env = container_env(compose_config, "minio-lb")
    source, _ = nginx_template_copy(dockerfile_of(compose_config["services"]["minio-lb"]))
    return envsubst(source.read_text(), env, env.get("NGINX_ENVSUBST_FILTER", ""))


def es_config_mount(service: dict) -> Path:
    """The host file a compose Elasticsearch node mounts as its elasticsearch.yml."""
    for volume in service.get("volumes", []):
        if volume["type"] == "bind" and volume["target"] == ES_CONFIG_TARGET:
            return Path(volume["source"])
    raise AssertionError(f"no bind mount of {ES_CONFIG_TARGET}")


def compose_es_settings(compose_config: dict, node: str) -> tuple[dict[str, str], dict[str, str]]:
    """(settings of the mounted elasticsearch.yml after Elasticsearch's substitution, settings
    from dotted environment variables) of compose node `node`."""
    env = container_env(compose_config, node)
    source = es_config_mount(compose_config["services"][node])
    from_file = {}
    for key, value in flat_yaml(source.read_text()).items():
        unset = [n for n in re.findall(r"\$\{(\w+)\}", value) if n not in env]
        assert not unset, f"{node}: {source.name} needs {unset}, unset in its environment"
        from_file[key] = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], value)
    from_env = {k: v for k, v in env.items() if ES_SETTING_VAR.match(k)}
    return from_file, from_env


def spark_template_copy(dockerfile: Path) -> tuple[Path, str]:
    """(source in the repository, destination under WORKDIR) of the spark-defaults template."""
    for instruction, text in final_stage(dockerfile):
        if instruction == "COPY" and "spark-defaults" in text:
            source, destination = text.split()[-2:]
            return REPO_ROOT / source, destination
    raise AssertionError(f"{dockerfile} copies no spark-defaults template")


def compose_spark_defaults(compose_config: dict, name: str) -> str:
    """$SPARK_CONF_DIR/spark-defaults.conf as the entrypoint of compose service `name` renders it."""
    source, _ = spark_template_copy(dockerfile_of(compose_config["services"][name]))
    return render(source.read_text(), container_env(compose_config, name), source=str(source))


# --- parsers -----------------------------------------------------------------------------------
def nginx_directives(text: str) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """(enclosing blocks, directive, arguments) of every simple directive, in order."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};"]+', re.sub(r"#[^\n]*", "", text))
    directives, context, words = [], [], []
    for token in tokens:
        if token == "{":
            context.append(" ".join(words))
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            context.pop()
        elif token == ";":
            directives.append((tuple(context), words[0], tuple(words[1:])))
            words = []
        else:
            words.append(token)
    assert not context and not words, "unbalanced nginx config"
    return directives


def flat_yaml(text: str) -> dict[str, str]:
    """`key: value` lines of a flat YAML file, values as text (quotes and comments dropped)."""
    settings = {}
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        key, sep, value = line.partition(": ")
        assert sep and key not in settings, f"not a flat, unique `key: value` line: {raw!r}"
        settings[key] = value.strip().strip("'\"")
    return settings


def spark_properties(text: str) -> dict[str, str]:
    """`key value` lines of spark-defaults.conf (Java properties, whitespace-separated)."""
    properties = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        assert key not in properties, f"{key} twice"
        properties[key] = value.strip()
    return properties
