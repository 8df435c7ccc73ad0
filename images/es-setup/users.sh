#!/usr/bin/env bash
# es-setup: the built-in kibana_system password and Orchard's least-privilege application user.
# Runs in the Elasticsearch image once the cluster answers. Re-runnable: every call replaces.
#
#   kibana_system         password KIBANA_SYSTEM_PASSWORD (Kibana's own connection)
#   role orchard_app      read/write/create only the images and models indices (+ their templates)
#   user ORCHARD_ES_USERNAME / ORCHARD_ES_PASSWORD   the uploader's and the Spark app's login
set -euo pipefail

ES=${ES_SETUP_URL:-https://es01:9200}
CA=${ES_CA_CERT:-/usr/share/elasticsearch/config/certs/ca/ca.crt}
IMAGES_INDEX=${ORCHARD_IMAGES_INDEX:-orchard-images}
MODELS_INDEX=${ORCHARD_MODELS_INDEX:-orchard-models}

log() { printf '[es-setup] %s\n' "$*" >&2; }

require_env() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || { log "$name is empty: run 'make secrets' to write compose/.env"; exit 2; }
  done
}

# Any password works: JSON and curl-config quoting shared with kibana/import.sh.
# shellcheck source-path=SCRIPTDIR source=../lib/quoting.sh
source "${SETUP_LIB_DIR:-$(dirname "${BASH_SOURCE[0]}")/../lib}/quoting.sh"

# The elastic password goes to curl through a 0600 config file, not the command line.
write_curl_config() {
  CURL_CONFIG=$(mktemp)
  chmod 0600 "$CURL_CONFIG"
  printf 'user = %s\n' "$(curl_config_string "elastic:$ELASTIC_PASSWORD")" > "$CURL_CONFIG"
  trap 'rm -f "$CURL_CONFIG"' EXIT
}

# method path [json-body]: prints the response; fails (with the response) unless HTTP 2xx.
es() {
  local out code
  out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' -K "$CURL_CONFIG" --cacert "$CA" \
    -H 'Content-Type: application/json' -X "$1" "$ES$2" ${3:+--data-binary "$3"}) || code=000
  if [ "${code:0:1}" != 2 ]; then
    log "$1 $2 -> HTTP $code: $(cat "$out")"
    rm -f "$out"
    return 1
  fi
  cat "$out"
  rm -f "$out"
}

# Why wait here: the nodes are "healthy" when HTTP answers, the cluster may still be electing.
wait_for_cluster() {
  local i
  for i in $(seq 1 120); do
    if es GET "/_cluster/health?wait_for_status=yellow&timeout=5s" 2>/dev/null | grep -q '"status"'; then
      log "cluster at $ES is up"
      return 0
    fi
    log "waiting for the cluster at $ES ($i/120)"
    sleep 5
  done
  log "Elasticsearch at $ES did not become ready"
  return 1
}

# The images index is an alias of numbered indices: `orchard reindex` creates the next one, moves
# the alias (manage on both names) and may delete the old one.
role_body() {
  cat <<JSON
{
  "cluster": ["monitor", "manage_index_templates"],
  "indices": [
    {"names": [$(json_string "$MODELS_INDEX")],
     "privileges": ["create_index", "read", "write", "view_index_metadata", "maintenance"]},
    {"names": [$(json_string "$IMAGES_INDEX"), $(json_string "$IMAGES_INDEX-*")],
     "privileges": ["manage", "read", "write"]}
  ]
}
JSON
}

# password: the body of POST /_security/user/NAME/_password.
password_body() {
  printf '{"password": %s}' "$(json_string "$1")"
}

user_body() {
  printf '{"password": %s, "roles": ["orchard_app"], "full_name": "Orchard uploader and Spark app"}' \
    "$(json_string "$ORCHARD_ES_PASSWORD")"
}

main() {
  require_env ELASTIC_PASSWORD KIBANA_SYSTEM_PASSWORD ORCHARD_ES_USERNAME ORCHARD_ES_PASSWORD
  write_curl_config
  wait_for_cluster
  es POST /_security/user/kibana_system/_password "$(password_body "$KIBANA_SYSTEM_PASSWORD")" >/dev/null
  log "kibana_system password set"
  es PUT /_security/role/orchard_app "$(role_body)" >/dev/null
  log "role orchard_app: $IMAGES_INDEX, $MODELS_INDEX"
  es PUT "/_security/user/$ORCHARD_ES_USERNAME" "$(user_body)" >/dev/null
  log "user $ORCHARD_ES_USERNAME ok"
}

# Sourced (by tests) it only defines the functions.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
