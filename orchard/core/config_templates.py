"""Config templates both deployments share: one file per config, beside its image folder.

A template is the config file itself with `${NAME}` placeholders (upper-case names only) where the
native and the compose deployments differ. Each side renders it with what it already has:

* the native launcher (orchard/stack/services.py) renders it here, from settings;
* compose renders it in the container: nginx's image runs envsubst on /etc/nginx/templates/ at
  start, Elasticsearch substitutes `${NAME}` in elasticsearch.yml itself, and the Spark image's
  entrypoint runs this module (`python -m orchard.core.config_templates TEMPLATE OUTPUT`).

Only braced upper-case names are placeholders, so nginx's own `$http_host` and `${host}` pass
through untouched, exactly as with the nginx image's filtered envsubst.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from orchard.core.errors import ConfigError

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def placeholders(text: str) -> set[str]:
    """The variable names a template needs."""
    return set(PLACEHOLDER.findall(text))


def render(text: str, values: Mapping[str, object], source: str = "template") -> str:
    """`text` with every `${NAME}` replaced by `values[NAME]`.

    Raises ConfigError naming every unset variable (and `source`), never renders half a config.
    """
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise ConfigError(f"{source}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def render_file(template: Path, values: Mapping[str, object]) -> str:
    """The rendered text of the template file `template`."""
    return render(template.read_text(), values, source=str(template))


def main(argv: list[str]) -> int:
    """`TEMPLATE OUTPUT`: render TEMPLATE with this process's environment into OUTPUT."""
    if len(argv) != 2:
        print("usage: python -m orchard.core.config_templates TEMPLATE OUTPUT", file=sys.stderr)
        return 2
    template, output = Path(argv[0]), Path(argv[1])
    try:
        text = render_file(template, os.environ)
    except ConfigError as exc:
        print(f"config_templates: {exc}", file=sys.stderr)
        return int(exc.exit_status)
    output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
