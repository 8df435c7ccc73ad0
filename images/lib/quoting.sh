#!/usr/bin/env bash
# Quoting helpers sourced by the setup scripts of two images (es-setup/users.sh, kibana/import.sh),
# so that any password works. Plain bash: those images have no jq or python. Compose mounts this
# folder at /setup-lib (SETUP_LIB_DIR); from a checkout the scripts find it beside their folder.

# string: a JSON string literal; `"`, `\` and control characters escaped, the rest as is (UTF-8).
json_string() {
  local s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      '"' | "\\") out+="\\$c" ;;
      [[:cntrl:]]) printf -v c '\\u%04x' "'$c"; out+=$c ;;
      *) out+=$c ;;
    esac
  done
  printf '"%s"' "$out"
}

# string: a double-quoted curl config value; curl unescapes \\ \" \n \r \t \v inside quotes.
curl_config_string() {
  local s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      '"' | "\\") out+="\\$c" ;;
      $'\n') out+='\n' ;;
      $'\r') out+='\r' ;;
      *) out+=$c ;;
    esac
  done
  printf '"%s"' "$out"
}
