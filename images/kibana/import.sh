#!/usr/bin/env bash
# kibana-setup: import Orchard's data view and dashboard (saved_objects.ndjson beside this file)
# through Kibana's saved-objects API, on every `docker compose up`. overwrite=true makes it
# idempotent; retries cover a Kibana that is up but still migrating its own indices.
set -euo pipefail

KIBANA=${KIBANA_URL:-http://kibana:5601}
SOURCE=${SAVED_OBJECTS:-/setup/saved_objects.ndjson}
INDEX=${ORCHARD_IMAGES_INDEX:-orchard-images}
TRIES=${IMPORT_TRIES:-60}

log() { printf '[kibana-setup] %s\n' "$*" >&2; }

[ -n "${ELASTIC_PASSWORD:-}" ] || { log "ELASTIC_PASSWORD is empty: run 'make secrets'"; exit 2; }

# Any password works: curl-config quoting shared with es-setup/users.sh.
# shellcheck source-path=SCRIPTDIR source=../lib/quoting.sh
source "${SETUP_LIB_DIR:-$(dirname "${BASH_SOURCE[0]}")/../lib}/quoting.sh"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The objects name the default index (orchard-images); follow ORCHARD_IMAGES_INDEX if it differs.
sed "s/orchard-images/${INDEX}/g" "$SOURCE" > "$WORK/objects.ndjson"
chmod 0700 "$WORK"
printf 'user = %s\n' "$(curl_config_string "elastic:$ELASTIC_PASSWORD")" > "$WORK/curl.conf"

# One import attempt: true when Kibana answered 200 with "success":true.
import_once() {
  local code
  code=$(curl -sS -o "$WORK/response.json" -w '%{http_code}' -K "$WORK/curl.conf" \
    -H 'kbn-xsrf: orchard' -X POST "$KIBANA/api/saved_objects/_import?overwrite=true" \
    --form "file=@$WORK/objects.ndjson") || code=000
  [ "$code" = 200 ] && grep -q '"success":true' "$WORK/response.json"
}

for i in $(seq 1 "$TRIES"); do
  if import_once; then
    log "imported: $(grep -o '"successCount":[0-9]*' "$WORK/response.json")"
    exit 0
  fi
  log "attempt $i/$TRIES failed: $(head -c 300 "$WORK/response.json" 2>/dev/null || true)"
  sleep 5
done
log "could not import the saved objects into $KIBANA"
exit 1
