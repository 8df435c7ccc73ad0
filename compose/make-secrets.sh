#!/usr/bin/env bash
# `make secrets`: write compose/.env (or the file given as $1) from compose/.env.example.
#   - empty *_PASSWORD, *_SECRET_KEY, *_ENCRYPTION_KEY and *_API_KEY values get 32 random characters;
#   - version pins are copied from deps/versions.env (the one place they are pinned);
#   - every other value comes from an existing .env if there is one, else from the template.
# Re-running keeps every secret and every local change, and refreshes the pins. The file is 0600.
# Plain bash 3.2 + awk: it runs on macOS's stock bash too.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEMPLATE="$ROOT/compose/.env.example"
VERSIONS="$ROOT/deps/versions.env"
OUT=${1:-$ROOT/compose/.env}

log() { printf '[secrets] %s\n' "$*" >&2; }

# 32 characters from [A-Za-z0-9]: safe unquoted in .env files, JSON, URLs and shell.
random_secret() {
  local value=""
  while [ ${#value} -lt 32 ]; do
    value="$value$(head -c 256 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')"
  done
  printf '%s' "${value:0:32}"
}

# file key: print the value of KEY=... in file (the last one); status 1 if the key is absent.
lookup() {
  [ -f "$1" ] || return 1
  awk -v key="$2" 'index($0, key "=") == 1 { value = substr($0, length(key) + 2); found = 1 }
    END { if (found) print value; exit !found }' "$1"
}

is_secret() {
  case "$1" in *_PASSWORD|*_SECRET_KEY|*_ENCRYPTION_KEY|*_API_KEY) return 0 ;; *) return 1 ;; esac
}

# key template-default: the value to write (pin, else existing, else generated or default).
value_of() {
  local key=$1 default=$2 old
  if lookup "$VERSIONS" "$key"; then
    return 0
  fi
  if old=$(lookup "$OUT" "$key") && { [ -n "$old" ] || ! is_secret "$key"; }; then
    printf '%s\n' "$old"
  elif [ -z "$default" ] && is_secret "$key"; then
    random_secret
    echo
  else
    printf '%s\n' "$default"
  fi
}

main() {
  local tmp line key value generated=""
  [ -f "$TEMPLATE" ] || { log "missing $TEMPLATE"; exit 1; }
  tmp=$(mktemp "$(dirname "$OUT")/.env.XXXXXX")
  chmod 0600 "$tmp"
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      [A-Z]*=*)
        key=${line%%=*}
        value=$(value_of "$key" "${line#*=}")
        if is_secret "$key" && ! lookup "$OUT" "$key" | grep -q .; then generated="$generated $key"; fi
        printf '%s=%s\n' "$key" "$value" ;;
      *)
        printf '%s\n' "$line" ;;
    esac
  done < "$TEMPLATE" > "$tmp"
  mv "$tmp" "$OUT"
  log "wrote $OUT (0600)${generated:+; generated:$generated}"
}

main "$@"
