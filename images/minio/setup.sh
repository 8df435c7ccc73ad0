#!/usr/bin/env bash
# minio-setup: the buckets, one least-privilege policy per service and one access key per service,
# and the images bucket's object creations subscribed to the nodes' ORCHARD webhook target (the
# serve service's auto-enrichment; the target itself is MINIO_NOTIFY_WEBHOOK_*_ORCHARD on every node).
# Re-runnable: `mc mb --ignore-existing`, `policy create` replaces the policy, `user add` resets the
# secret to the one in .env, an already attached policy is not attached twice, and an existing
# subscription is kept.
#
# Environment (from compose/.env): MINIO_ROOT_USER/PASSWORD, UPLOADER_S3_ACCESS_KEY/SECRET_KEY,
# SPARK_S3_ACCESS_KEY/SECRET_KEY, SERVE_S3_ACCESS_KEY/SECRET_KEY, ORCHARD_IMAGES_BUCKET,
# ORCHARD_FEATURES_BUCKET, ORCHARD_MODELS_BUCKET, ORCHARD_LAKE_BUCKET (the Delta table's bucket,
# default lake);
# MINIO_SETUP_ENDPOINT (default http://minio-lb:9000).
#
# Any secret works: the keys reach mc on its standard input, never as arguments (an argument
# starting with `-` is parsed as a flag by mc, and arguments show in `ps` on the Docker host), and
# `--` ends mc's flags before access keys, which may start with `-` too. The one limit is mc's:
# it reads a key as one line, so a key may not contain a line break (refused up front).
set -euo pipefail

ENDPOINT=${MINIO_SETUP_ENDPOINT:-http://minio-lb:9000}
IMAGES=${ORCHARD_IMAGES_BUCKET:-images}
FEATURES=${ORCHARD_FEATURES_BUCKET:-features}
MODELS=${ORCHARD_MODELS_BUCKET:-models}
LAKE=${ORCHARD_LAKE_BUCKET:-lake}
ALIAS=orchard
# The webhook target's ARN: the native stack's too (orchard/stack/services.py WEBHOOK_ARN; the static
# tests compare them).
WEBHOOK_ARN=arn:minio:sqs::ORCHARD:webhook

log() { printf '[minio-setup] %s\n' "$*" >&2; }

require_env() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || { log "$name is empty: run 'make secrets' to write compose/.env"; exit 2; }
  done
}

# mc reads keys from stdin one line each: a key with a line break would be cut short silently.
require_one_line() {
  local name
  for name in "$@"; do
    case "${!name}" in
      *$'\n'* | *$'\r'*) log "$name contains a line break, which mc cannot read"; exit 2 ;;
    esac
  done
}

# Why retries: the load balancer can be up a moment before the erasure set has quorum.
connect() {
  local i
  for i in $(seq 1 60); do
    # `mc alias set ALIAS URL` reads the access key and the secret key from stdin, a line each.
    if printf '%s\n%s\n' "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" \
         | mc alias set -- "$ALIAS" "$ENDPOINT" >/dev/null 2>&1 \
       && mc ready "$ALIAS" >/dev/null 2>&1; then
      log "connected to $ENDPOINT"
      return 0
    fi
    log "waiting for $ENDPOINT ($i/60)"
    sleep 2
  done
  log "MinIO at $ENDPOINT did not become ready"
  return 1
}

# Statement helpers: bucket-level and object-level resources of one bucket.
bucket_arn() { printf '"arn:aws:s3:::%s"' "$1"; }
objects_arn() { printf '"arn:aws:s3:::%s/*"' "$1"; }

# uploader: list and write objects of the images bucket (multipart included); HEAD of an object
# (s3:GetObject) lets it skip images already uploaded, so a re-run uploads nothing twice. In the
# lake bucket, the images table's prefix only (the default ORCHARD_LAKE_URI, s3a://<lake>/images):
# `orchard upload` MERGEs the rows of what it stored into the table with delta-rs, which reads the
# log and writes new data and commit files (conditional writes) and deletes nothing
# (orchard/uploader/table_feed.py). Nothing else of the lake, and no delete anywhere.
uploader_policy() {
  cat <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": [$(bucket_arn "$IMAGES"), $(bucket_arn "$LAKE")]},
    {"Effect": "Allow",
     "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": [$(objects_arn "$IMAGES"), $(objects_arn "$LAKE/images")]}
  ]
}
EOF
}

# spark: read the images; read and write (s3a commits delete temporary objects) features and
# models, and the Delta table in the lake bucket (Delta writes and deletes its log and data files).
spark_policy() {
  cat <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": [$(bucket_arn "$IMAGES"), $(bucket_arn "$FEATURES"), $(bucket_arn "$MODELS"),
                  $(bucket_arn "$LAKE")]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject"],
     "Resource": [$(objects_arn "$IMAGES")]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": [$(objects_arn "$FEATURES"), $(objects_arn "$MODELS"), $(objects_arn "$LAKE")]}
  ]
}
EOF
}

# serve (the REST API): read only, but for the predictions table. Model files and the serving
# alias in the models bucket, image bytes in the images bucket. s3:ListBucket because without it
# MinIO answers a missing object with AccessDenied, not NoSuchKey (no serving alias before the first
# `orchard models promote`). Auto-enrichment keeps its predictions in the lake's predictions table
# (delta-rs writes its log and data files; it deletes nothing): that table's prefix only.
serve_policy() {
  cat <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": [$(bucket_arn "$IMAGES"), $(bucket_arn "$MODELS"), $(bucket_arn "$LAKE")]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject"],
     "Resource": [$(objects_arn "$IMAGES"), $(objects_arn "$MODELS")]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject"],
     "Resource": [$(objects_arn "$LAKE/predictions")]}
  ]
}
EOF
}

make_buckets() {
  local bucket
  for bucket in "$IMAGES" "$FEATURES" "$MODELS" "$LAKE"; do
    mc mb --ignore-existing "$ALIAS/$bucket" >/dev/null
    log "bucket $bucket ok"
  done
}

# policy name, policy function, access key, secret key
grant() {
  local name=$1 policy_fn=$2 key=$3 secret=$4 file
  file=$(mktemp)
  "$policy_fn" > "$file"
  mc admin policy create "$ALIAS" "$name" "$file" >/dev/null
  rm -f "$file"
  # `mc admin user add ALIAS KEY` reads the secret key from stdin.
  printf '%s\n' "$secret" | mc admin user add -- "$ALIAS" "$key" >/dev/null
  if mc admin user info --json -- "$ALIAS" "$key" | grep -q "\"policyName\": *\"[^\"]*$name"; then
    log "user $key already has policy $name"
  else
    mc admin policy attach --user="$key" -- "$ALIAS" "$name" >/dev/null
    log "user $key got policy $name"
  fi
}

# Object creations of the images bucket -> the webhook target (s3:ObjectCreated:*, like the native
# stack's subscription). MinIO refuses a second identical rule, so an existing one is kept.
subscribe_images() {
  if mc event ls "$ALIAS/$IMAGES" "$WEBHOOK_ARN" 2>/dev/null | grep -qF "$WEBHOOK_ARN"; then
    log "bucket $IMAGES already sends object creations to $WEBHOOK_ARN"
  else
    mc event add "$ALIAS/$IMAGES" "$WEBHOOK_ARN" --event put >/dev/null
    log "bucket $IMAGES sends object creations to $WEBHOOK_ARN"
  fi
}

main() {
  require_env MINIO_ROOT_USER MINIO_ROOT_PASSWORD UPLOADER_S3_ACCESS_KEY UPLOADER_S3_SECRET_KEY \
    SPARK_S3_ACCESS_KEY SPARK_S3_SECRET_KEY SERVE_S3_ACCESS_KEY SERVE_S3_SECRET_KEY
  require_one_line MINIO_ROOT_USER MINIO_ROOT_PASSWORD UPLOADER_S3_ACCESS_KEY UPLOADER_S3_SECRET_KEY \
    SPARK_S3_ACCESS_KEY SPARK_S3_SECRET_KEY SERVE_S3_ACCESS_KEY SERVE_S3_SECRET_KEY
  MC_CONFIG_DIR=$(mktemp -d)
  export MC_CONFIG_DIR
  trap 'rm -rf "$MC_CONFIG_DIR"' EXIT
  connect
  make_buckets
  grant orchard-uploader uploader_policy "$UPLOADER_S3_ACCESS_KEY" "$UPLOADER_S3_SECRET_KEY"
  grant orchard-spark spark_policy "$SPARK_S3_ACCESS_KEY" "$SPARK_S3_SECRET_KEY"
  grant orchard-serve serve_policy "$SERVE_S3_ACCESS_KEY" "$SERVE_S3_SECRET_KEY"
  subscribe_images
  log "done"
}

main "$@"
