#!/usr/bin/env bash
# es-certs: a CA and one TLS certificate per Elasticsearch node, made with elasticsearch-certutil
# (as in Elastic's own compose example), into the `certs` volume. Runs in the Elasticsearch image.
# Re-runnable: an existing CA and existing node certificates are kept.
#
#   ca/ca.crt         public CA certificate (0644): every client trusts it (ORCHARD_ES_CA_CERT)
#   ca/ca.key         CA key (0600, root only): never mounted into a node or an app
#   esNN/esNN.{crt,key}  node certificate for HTTP and transport, SAN = esNN, localhost, 127.0.0.1
set -euo pipefail

CERTS=${CERTS_DIR:-/usr/share/elasticsearch/config/certs}
ES_HOME=${ES_HOME:-/usr/share/elasticsearch}
NODES=${ES_CERT_NODES:-es01 es02 es03}

log() { printf '[es-certs] %s\n' "$*" >&2; }

# instances.yml for certutil: one entry per node.
instances_yml() {
  local node
  echo "instances:"
  for node in $NODES; do
    printf '  - name: %s\n    dns: [%s, localhost]\n    ip: [127.0.0.1]\n' "$node" "$node"
  done
}

make_ca() {
  [ -f "$CERTS/ca/ca.crt" ] && { log "CA exists"; return 0; }
  log "creating the CA"
  "$ES_HOME/bin/elasticsearch-certutil" ca --silent --pem --out "$CERTS/ca.zip"
  unzip -o -q "$CERTS/ca.zip" -d "$CERTS"
  rm -f "$CERTS/ca.zip"
}

missing_node_certs() {
  local node
  for node in $NODES; do
    [ -f "$CERTS/$node/$node.crt" ] || return 0
  done
  return 1
}

make_node_certs() {
  missing_node_certs || { log "node certificates exist"; return 0; }
  log "creating certificates for: $NODES"
  instances_yml > "$CERTS/instances.yml"
  "$ES_HOME/bin/elasticsearch-certutil" cert --silent --pem --in "$CERTS/instances.yml" \
    --out "$CERTS/certs.zip" --ca-cert "$CERTS/ca/ca.crt" --ca-key "$CERTS/ca/ca.key"
  unzip -o -q "$CERTS/certs.zip" -d "$CERTS"
  rm -f "$CERTS/certs.zip"
}

# Nodes and Kibana run as uid 1000, gid 0: group-readable keys; the CA key stays root-only.
set_permissions() {
  chown -R root:root "$CERTS" 2>/dev/null || log "not root: ownership left as is"
  find "$CERTS" -type d -exec chmod 0755 {} +
  find "$CERTS" -type f -exec chmod 0640 {} +
  chmod 0644 "$CERTS/ca/ca.crt"
  chmod 0600 "$CERTS/ca/ca.key"
}

main() {
  mkdir -p "$CERTS"
  make_ca
  make_node_certs
  set_permissions
  log "done"
}

main "$@"
