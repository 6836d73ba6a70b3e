#!/usr/bin/env bash
# The main job on one machine: a deltadrive server on its embedded store, a user, this
# machine logged in as one of the user's devices, and the synced folder mounted.
# Usage (as root, after `cargo build --release` or `apt install ./deltadrive_*.deb`):
#   bash packaging/quickstart.sh [MOUNTPOINT]          (default /srv/deltadrive)
# State: server in /var/lib/deltadrive-server, device home in /var/lib/deltadrive-device.
# The binary: $DELTADRIVE_BIN, else target/release/deltadrive, else the installed one.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DELTADRIVE_BIN:-}
if [ -z "$BIN" ]; then
  BIN=target/release/deltadrive
  [ -x "$BIN" ] || ! command -v deltadrive >/dev/null || BIN=$(command -v deltadrive)
fi
MP=${1:-/srv/deltadrive}
DATA=${DELTADRIVE_SERVER_DATA:-/var/lib/deltadrive-server}
HOME_DEV=${DELTADRIVE_DEVICE_HOME:-/var/lib/deltadrive-device}
LISTEN=${DELTADRIVE_LISTEN:-127.0.0.1:8080}
USER_NAME=${DELTADRIVE_USER:-me}
[ -x "$BIN" ] || { echo "no binary at $BIN: run cargo build --release first (or install the .deb)" >&2; exit 1; }
# GET /healthz with bash alone: a minimal Debian has no curl.
healthy() {
  local reply
  reply=$( (exec 3<>"/dev/tcp/${LISTEN%:*}/${LISTEN##*:}" &&
    printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$LISTEN" >&3 && cat <&3) 2>/dev/null) || return 1
  [ "${reply##*$'\n'}" = ok ]
}
# The server's data, the device's home and the mount point hold users' content: root's alone.
install -d -m 0700 "$DATA" "$HOME_DEV" "$MP"
if ! healthy; then
  nohup "$BIN" server --listen "$LISTEN" --data "$DATA" >>"$DATA/server.log" 2>&1 &
  for _ in $(seq 1 100); do healthy && break; sleep 0.1; done
fi
healthy || { echo "the server did not start; see $DATA/server.log" >&2; exit 1; }
pw="$HOME_DEV/password"
if [ ! -f "$pw" ]; then
  (umask 077; head -c 18 /dev/urandom | base64 > "$pw")
  "$BIN" admin --server "http://$LISTEN" --admin-token-file "$DATA/admin.token" user add "$USER_NAME" --password-file "$pw"
fi
[ -f "$HOME_DEV/device.json" ] || "$BIN" login --server "http://$LISTEN" --user "$USER_NAME" --password-file "$pw" --device "$(hostname)" --home "$HOME_DEV"
"$BIN" mount "$MP" --home "$HOME_DEV"
echo "server: http://$LISTEN (data $DATA, log $DATA/server.log); user $USER_NAME (password in $pw)"
echo "synced folder: $MP (device home $HOME_DEV); status: $BIN status --home $HOME_DEV"
