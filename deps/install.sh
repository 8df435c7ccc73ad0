#!/usr/bin/env bash
# make deps: install everything Orchard's native stack needs, idempotently, cached under
# ~/.cache/orchard (override with ORCHARD_CACHE_DIR). A second run finds every stamp and does nothing.
#
#   python venv   ~/.cache/orchard/venv            (requirements.txt, hash-stamped)
#   minio, mc     ~/.cache/orchard/bin/             (go install at pinned commits, go.sum verified)
#   elasticsearch ~/.cache/orchard/elasticsearch-V  (Maven Central zip, sha256 verified)
#   s3a + Delta   ~/.cache/orchard/jars/            (Maven Central, sha256 verified)
#   nginx         Debian package (the single S3 endpoint in front of the 4 MinIO nodes)
#   chromium      Debian package (headless browser of the report and serving-page tests)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/deps/versions.env"
CACHE=${ORCHARD_CACHE_DIR:-$HOME/.cache/orchard}
PY=${ORCHARD_PYTHON:-python3.11}
M2="$CACHE/m2"
mkdir -p "$CACHE/bin" "$CACHE/jars" "$CACHE/dl" "$M2"

log() { printf '[deps] %s\n' "$*" >&2; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

check_sha256() { # file expected
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ -z "$2" ] && die "no sha256 pinned for $1 (got $got): add it to deps/versions.env"
  [ "$got" = "$2" ] || die "sha256 mismatch for $1: expected $2, got $got"
}

check_toolchain() {
  have "$PY" || PY=python3
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || die "Python 3.11 is required (set ORCHARD_PYTHON to its path)"
  have go || die "Go is required to build MinIO from source (https://go.dev/doc/install)"
  have mvn || die "Maven is required to fetch Elasticsearch and the s3a jars"
  have java || die "Java 17+ is required by Elasticsearch and Spark"
  java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])' || die "Java 17+ is required: $(java -version 2>&1 | head -1)"
}

install_apt_packages() {
  local want=()
  have nginx || want+=(nginx-light)           # the load balancer in front of MinIO
  if [ "$(id -u)" = 0 ]; then have setfacl || want+=(acl); fi  # see ensure_service_user
  have chromium || want+=(chromium)           # headless browser: the report and serving-page tests render pages
  # a font for the pages' text in screenshots (Chromium renders none without one)
  [ -d /usr/share/fonts/truetype/dejavu ] || want+=(fonts-dejavu-core)
  [ ${#want[@]} = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages: run 'sudo apt-get install ${want[*]}' once"
  log "apt-get install ${want[*]}"
  # Keep apt from starting a system nginx on port 80: we run our own, on our own port.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

ensure_service_user() {
  # Elasticsearch refuses to run as root: as root, the launcher runs it as this system user
  # and grants it traverse-only ACLs on the directories above the distribution and the data.
  [ "$(id -u)" = 0 ] || return 0
  id orchard >/dev/null 2>&1 && return 0
  log "creating system user 'orchard' (runs Elasticsearch when the stack is started as root)"
  useradd --system --no-create-home --shell /usr/sbin/nologin orchard
}

install_venv() {
  local venv="$CACHE/venv" want
  want=$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)
  if [ -f "$venv/.orchard-requirements" ] && [ "$(cat "$venv/.orchard-requirements")" = "$want" ]; then
    return 0
  fi
  log "python venv at $venv (requirements.txt changed or missing)"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip==24.3.1
  "$venv/bin/pip" install -q --cache-dir "$CACHE/pip" -r "$ROOT/requirements.txt"
  echo "$want" > "$venv/.orchard-requirements"
}

go_install() { # name module version
  local dest="$CACHE/bin/$1-$3"
  [ -x "$dest/$1" ] && { ln -sfn "$dest/$1" "$CACHE/bin/$1"; return 0; }
  log "go install $2@$3 (building from source, a few minutes)"
  mkdir -p "$dest.tmp"
  # GOFLAGS=-mod=mod is not needed: go install verifies module checksums against go.sum and sumdb.
  GOBIN="$dest.tmp" CGO_ENABLED=0 go install "$2@$3"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  ln -sfn "$dest/$1" "$CACHE/bin/$1"
}

mvn_fetch() { # group artifact version type dest sha256
  local g=$1 a=$2 v=$3 t=$4 dest=$5 sha=$6
  if [ -f "$dest" ]; then check_sha256 "$dest" "$sha"; return 0; fi
  log "maven: $g:$a:$v:$t"
  local out="$CACHE/dl/mvn-$a-$v.log"
  mvn -C -B -Dstyle.color=never -Dmaven.repo.local="$M2" dependency:get -Dtransitive=false \
    -Dartifact="$g:$a:$v:$t" >"$out" 2>&1 || { tail -20 "$out" >&2; die "maven could not fetch $g:$a:$v:$t"; }
  local src="$M2/${g//.//}/$a/$v/$a-$v.$t"
  check_sha256 "$src" "$sha"
  cp "$src" "$dest.tmp" && mv "$dest.tmp" "$dest"
}

install_elasticsearch() {
  local home="$CACHE/elasticsearch-$ES_VERSION" zip="$CACHE/dl/elasticsearch-$ES_VERSION.zip"
  [ -x "$home/bin/elasticsearch" ] && return 0
  mvn_fetch org.elasticsearch.distribution.integ-test-zip elasticsearch "$ES_VERSION" zip "$zip" "$ES_ZIP_SHA256"
  log "unpacking Elasticsearch $ES_VERSION"
  rm -rf "$home.tmp" && mkdir -p "$home.tmp"
  (cd "$home.tmp" && unzip -q "$zip")
  mv "$home.tmp/elasticsearch-$ES_VERSION" "$home" && rm -rf "$home.tmp"
}

install_jars() {
  mvn_fetch org.apache.hadoop hadoop-aws "$HADOOP_VERSION" jar \
    "$CACHE/jars/hadoop-aws-$HADOOP_VERSION.jar" "$HADOOP_AWS_SHA256"
  mvn_fetch software.amazon.awssdk bundle "$AWS_SDK_BUNDLE_VERSION" jar \
    "$CACHE/jars/bundle-$AWS_SDK_BUNDLE_VERSION.jar" "$AWS_SDK_BUNDLE_SHA256"
  mvn_fetch io.delta delta-spark_2.13 "$DELTA_VERSION" jar \
    "$CACHE/jars/delta-spark_2.13-$DELTA_VERSION.jar" "$DELTA_SPARK_SHA256"
  mvn_fetch io.delta delta-storage "$DELTA_VERSION" jar \
    "$CACHE/jars/delta-storage-$DELTA_VERSION.jar" "$DELTA_STORAGE_SHA256"
}

main() {
  local start=$SECONDS
  check_toolchain
  install_apt_packages
  ensure_service_user
  install_venv
  go_install minio "$MINIO_MODULE" "$MINIO_VERSION"
  go_install mc "$MC_MODULE" "$MC_VERSION"
  install_elasticsearch
  install_jars
  # Static validators of the compose deployment (compose CLI, hadolint, shellcheck).
  bash "$ROOT/deps/install-static-tools.sh"
  log "ready in $((SECONDS - start))s (cache: $CACHE)"
}

main "$@"
