#!/usr/bin/env bash
# Entry point of the orchard/spark image. One image, several roles (the compose service picks one):
#   master               the Spark standalone master (spark://spark-master:7077, UI :8080)
#   worker               a Spark worker registering with $ORCHARD_SPARK_MASTER (scale freely)
#   submit ARGS...       `orchard ARGS...` as the driver of a spark-submit against the master
#   seed [ARGS...]       upload /input, or a generated synthetic dataset when /input is empty
#   orchard ARGS...      the orchard CLI in-process (setup, serve, dataset, upload, search, ...)
#   anything else        exec'd as is
# Settings are the ORCHARD_* variables of the native deployment; nothing here is compose-specific
# except addresses: each container advertises its own IP, so scaled workers never collide.
set -euo pipefail

spark_class() { exec "$SPARK_HOME/bin/spark-class" "$@"; }

# The container's address on the compose network: what executors and the master connect back to.
own_ip() { hostname -i | awk '{print $1}'; }

# spark-defaults.conf from the template the native launcher renders too, by the same renderer, with
# this container's environment (image ENV + compose's x-spark-conf-env); fails naming an unset one.
render_spark_defaults() {
  python -m orchard.core.config_templates /opt/orchard/images/spark/spark-defaults.conf.template \
    "$SPARK_CONF_DIR/spark-defaults.conf"
}

# Seed the lake: upload /input if something is mounted there, else a synthetic dataset.
# SYNTH_ARGS / UPLOAD_ARGS: extra flags of `orchard dataset synth` / `orchard upload`.
seed() {
  local src=/input synth_args upload_args
  read -ra synth_args <<< "${SYNTH_ARGS:-}"
  read -ra upload_args <<< "${UPLOAD_ARGS:-}"
  if [ -z "$(ls -A /input 2>/dev/null)" ]; then
    python -m orchard dataset synth /data/synth "${synth_args[@]}"
    src=/data/synth
  fi
  exec python -m orchard upload "$src" "${upload_args[@]}" "$@"
}

main() {
  local role=${1:-orchard}
  [ $# -gt 0 ] && shift
  case "$role" in
    master|worker|submit) render_spark_defaults ;;
  esac
  case "$role" in
    master)
      spark_class org.apache.spark.deploy.master.Master \
        --host "$(hostname)" --port 7077 --webui-port 8080 "$@" ;;
    worker)
      spark_class org.apache.spark.deploy.worker.Worker \
        --host "$(own_ip)" --webui-port 8081 \
        --cores "${ORCHARD_SPARK_WORKER_CORES:-1}" --memory "${ORCHARD_SPARK_WORKER_MEMORY:-4g}" \
        --work-dir /home/orchard/work "$@" "${ORCHARD_SPARK_MASTER:?}" ;;
    submit)
      # The app sets everything else (s3a endpoint and keys, executor memory) from settings.
      exec "$SPARK_HOME/bin/spark-submit" --master "${ORCHARD_SPARK_MASTER:?}" \
        --conf "spark.driver.host=$(own_ip)" --conf spark.driver.bindAddress=0.0.0.0 \
        --driver-memory "${SPARK_DRIVER_MEMORY:-2g}" /usr/local/lib/orchard/submit.py "$@" ;;
    seed)
      seed "$@" ;;
    orchard)
      exec python -m orchard "$@" ;;
    *)
      exec "$role" "$@" ;;
  esac
}

main "$@"
