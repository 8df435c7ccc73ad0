#!/usr/bin/env bash
# `make test` / `make chaos`: start the native stack if it is not running, run pytest on it, and stop it
# again afterwards if this script started it. Extra arguments go to pytest (default: tests/ minus chaos).
# --no-stack: do not touch the default stack (the chaos suite runs its own).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${ORCHARD_CACHE_DIR:-$HOME/.cache/orchard}
PY="$CACHE/venv/bin/python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

use_stack=1
if [ "${1:-}" = "--no-stack" ]; then use_stack=0; shift; fi
started=0
if [ "$use_stack" = 1 ] && ! bin/orchard -q stack status >/dev/null 2>&1; then
  started=1
  bin/orchard stack up
fi
stop_stack() { if [ "$started" = 1 ]; then bin/orchard -q stack down || true; fi; }
trap stop_stack EXIT

args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests --ignore=tests/chaos)
set +e
# The slowest tests listed at the end: CI time is a budget (under an hour), spent knowingly.
"$PY" -m pytest --durations=30 "${args[@]}"
rc=$?
set -e
# pytest exit 5 means no test ran: that is a failure here, not a pass.
[ "$rc" = 5 ] && echo "no tests were collected" >&2
exit "$rc"
