#!/usr/bin/env bash
# Runs a command against a throwaway scale-out backend: a fresh PostgreSQL cluster (initdb as the
# `postgres` user, unix socket and data in a temp folder, a free TCP port on 127.0.0.1) and an
# s3s-fs S3 server on 127.0.0.1 (data in the temp folder, one bucket). Exports the connection
# settings, runs "$@", and always stops both and removes the folder.
#
#   tests/scaleout-env.sh env DELTADRIVE_TEST_BACKEND=postgres_s3 cargo test --test api
#
# Exported: DELTADRIVE_TEST_PG_URL, DELTADRIVE_TEST_S3_ENDPOINT, DELTADRIVE_TEST_S3_BUCKET and the
# usual AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$PG_BIN/initdb" ] || { echo "scaleout-env: PostgreSQL not installed (packaging/install-deps.sh)" >&2; exit 1; }
S3S_FS="${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}"
[ -x "$S3S_FS" ] || { echo "scaleout-env: s3s-fs not installed (packaging/install-deps.sh)" >&2; exit 1; }

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

TMP="$(mktemp -d /tmp/deltadrive-scaleout.XXXXXX)"
chmod 755 "$TMP"
PGDATA="$TMP/pg"
S3_PID=""
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
  local rc=$?
  if [ -n "$S3_PID" ]; then kill "$S3_PID" 2>/dev/null || true; wait "$S3_PID" 2>/dev/null || true; fi
  if [ -f "$PGDATA/postmaster.pid" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [ "$rc" != 0 ]; then
    echo "== scaleout-env: exit $rc; PostgreSQL log:" >&2; tail -n 50 "$TMP/sock/pg.log" >&2 2>/dev/null || true
    echo "== s3s-fs log:" >&2; tail -n 50 "$TMP/s3.log" >&2 2>/dev/null || true
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$PGDATA" "$TMP/sock"
if [ "$(id -u)" = 0 ]; then chown postgres: "$PGDATA" "$TMP/sock"; fi
PG_PORT="$(free_port)"
as_postgres "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; exit 1; }
as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/sock/pg.log" -w -t 60 start \
  -o "-p $PG_PORT -k $TMP/sock -c listen_addresses='' -c max_connections=400 -c fsync=on" >/dev/null

S3_PORT="$(free_port)"
S3_KEY="deltadrive-test"
S3_SECRET="deltadrive-test-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
mkdir -p "$TMP/s3/deltadrive-test"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" "$TMP/s3" >"$TMP/s3.log" 2>&1 &
S3_PID=$!
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then break; fi
  kill -0 "$S3_PID" 2>/dev/null || { cat "$TMP/s3.log" >&2; exit 1; }
  sleep 0.1
done

# The unix socket in the temp folder (tokio-postgres key=value syntax).
export DELTADRIVE_TEST_PG_URL="host=$TMP/sock port=$PG_PORT user=postgres dbname=postgres"
export DELTADRIVE_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export DELTADRIVE_TEST_S3_BUCKET="deltadrive-test"
export AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET"
export AWS_ENDPOINT_URL="$DELTADRIVE_TEST_S3_ENDPOINT" AWS_REGION="us-east-1" AWS_ALLOW_HTTP="true"
echo "== scaleout-env: PostgreSQL on $TMP/sock port $PG_PORT, s3s-fs on 127.0.0.1:$S3_PORT" >&2
"$@"
