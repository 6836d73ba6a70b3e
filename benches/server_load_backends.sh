#!/usr/bin/env bash
# Runs benches/server_load.rs (dev profile) against servers this script starts and always kills:
#   benches/server_load_backends.sh embedded          # one server, --data
#   tests/scaleout-env.sh benches/server_load_backends.sh pg1   # one postgres_s3 replica
#   tests/scaleout-env.sh benches/server_load_backends.sh pg2   # two replicas, devices spread
# Extra arguments go to the load tool (default: --users 10 --devices 10 --duration-secs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?embedded|pg1|pg2}"; shift
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--users 10 --devices 10 --duration-secs 10)
cargo build -q --bin deltadrive
BIN="${CARGO_TARGET_DIR:-target}/debug/deltadrive"
W="$(mktemp -d /tmp/deltadrive-load.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then for f in "$W"/*.err; do echo "== $f"; tail -n 30 "$f"; done >&2 2>/dev/null || true; fi
  rm -rf "$W"
  exit "$rc"
}
trap cleanup EXIT
start() { # NAME ARGS... ; sets URL
  local n=$1; shift
  DELTADRIVE_LOG=warn "$BIN" server --listen 127.0.0.1:0 "$@" >"$W/$n.out" 2>"$W/$n.err" &
  PIDS+=($!)
  for _ in $(seq 1 300); do grep -q "listening on" "$W/$n.out" 2>/dev/null && break; sleep 0.1; done
  URL="$(sed -n 's/.*listening on //p' "$W/$n.out")"
  [ -n "$URL" ] || { echo "server $n did not start" >&2; exit 1; }
}
PG=(--metadata "${DELTADRIVE_TEST_PG_URL:-}" --metadata-schema "load_$$" \
    --objects "s3://${DELTADRIVE_TEST_S3_BUCKET:-}/load_$$" --admin-token-file "$W/admin.token")
case "$mode" in
  embedded) start a --data "$W/data"; URLS="$URL"; TOK="$W/data/admin.token" ;;
  pg1) start a "${PG[@]}"; URLS="$URL"; TOK="$W/admin.token" ;;
  pg2) start a "${PG[@]}"; URLS="$URL"; start b "${PG[@]}"; URLS="$URLS,$URL"; TOK="$W/admin.token" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
cargo test -q --bench server_load -- "${args[@]}" --server "$URLS" --admin-token-file "$TOK"
