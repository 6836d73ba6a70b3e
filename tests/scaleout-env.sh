#!/usr/bin/env bash
# Runs a command against a throwaway scale-out backend: a fresh PostgreSQL cluster (initdb as the
# `postgres` user, unix socket and data in a temp folder, a free TCP port on 127.0.0.1) and an
# s3s-fs S3 server on 127.0.0.1 (data in the temp folder, one bucket). Exports the connection
# settings, runs "$@", and always stops both and removes the folder.
#
#   tests/scaleout-env.sh env DELTADRIVE_TEST_BACKEND=postgres_s3 cargo test --test api
#
# Exported: DELTADRIVE_TEST_PG_URL (unix socket, trust), DELTADRIVE_TEST_PG_TCP_URL with
# DELTADRIVE_TEST_PG_PASSWORD, DELTADRIVE_TEST_PG_CA and DELTADRIVE_TEST_PG_OTHER_CA (TCP, a password,
# TLS), DELTADRIVE_TEST_PSQL, DELTADRIVE_TEST_S3_ENDPOINT, DELTADRIVE_TEST_S3_BUCKET and the
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
# Unix socket: trust. TCP on 127.0.0.1: a password (scram) over TLS, with a certificate signed by a
# CA made for this run (and a second CA that signed nothing, for the refusal), so the tests of
# --metadata-password-file and --metadata-ca-file meet a real password check and a real TLS server.
as_postgres "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  -E UTF8 --locale=C.UTF-8 >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; exit 1; }
TLS="$TMP/tls"
mkdir -p "$TLS"
(
  cd "$TLS"
  for ca in ca other-ca; do
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=deltadrive test $ca" \
      -keyout "$ca.key" -out "$ca.pem" 2>/dev/null
  done
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile ext.cnf -out server.crt 2>/dev/null
)
cp "$TLS/server.crt" "$TLS/server.key" "$PGDATA/"
chmod 600 "$PGDATA/server.key"
if [ "$(id -u)" = 0 ]; then chown postgres: "$PGDATA/server.crt" "$PGDATA/server.key"; fi
chmod 755 "$TLS"
as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/sock/pg.log" -w -t 60 start \
  -o "-p $PG_PORT -k $TMP/sock -c listen_addresses=127.0.0.1 -c ssl=on -c max_connections=400 -c fsync=on" >/dev/null
PG_PASSWORD="pw-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
as_postgres "$PG_BIN/psql" -q -h "$TMP/sock" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
  -c "CREATE ROLE deltadrive_pw LOGIN PASSWORD '$PG_PASSWORD'" \
  -c "GRANT CREATE ON DATABASE postgres TO deltadrive_pw" >/dev/null

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
# The same cluster over TCP: a password and TLS (see above).
export DELTADRIVE_TEST_PG_TCP_URL="host=127.0.0.1 port=$PG_PORT user=deltadrive_pw dbname=postgres"
export DELTADRIVE_TEST_PG_PASSWORD="$PG_PASSWORD"
export DELTADRIVE_TEST_PG_CA="$TLS/ca.pem" DELTADRIVE_TEST_PG_OTHER_CA="$TLS/other-ca.pem"
export DELTADRIVE_TEST_PSQL="$PG_BIN/psql"
export DELTADRIVE_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export DELTADRIVE_TEST_S3_BUCKET="deltadrive-test"
export AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET"
export AWS_ENDPOINT_URL="$DELTADRIVE_TEST_S3_ENDPOINT" AWS_REGION="us-east-1" AWS_ALLOW_HTTP="true"
echo "== scaleout-env: PostgreSQL on $TMP/sock port $PG_PORT, s3s-fs on 127.0.0.1:$S3_PORT" >&2
"$@"
