#!/usr/bin/env bash
# Remakes docs/img/file-manager.png (and docs/img/file-status.png): a real file manager
# (Thunar, under Xvfb) showing a synced folder. A throwaway server, one user and two of her
# devices ("laptop" and "desktop") run on this machine; files written into the laptop's
# mount are waited for on the desktop's mount, and Thunar opens the desktop's copy. The
# second picture is an xterm on the same folder reading each file's user.deltadrive.status.
# Usage (Debian, as root, after `cargo build`): bash scripts/screenshot.sh
# Binary: $DELTADRIVE_BIN, else $CARGO_TARGET_DIR/debug/deltadrive, else target/debug/deltadrive.
# Set SKIP_APT=1 to skip installing the packages. Everything it starts it stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BIN=${DELTADRIVE_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/deltadrive}
[ -x "$BIN" ] || { echo "no binary at $BIN: run cargo build (or set DELTADRIVE_BIN)" >&2; exit 1; }
BIN=$(realpath "$BIN")
OUT=$REPO/docs/img
[ "$(id -u)" = 0 ] || { echo "run as root (installs packages, mounts FUSE)" >&2; exit 1; }
# A private mount namespace: the desktop's folder can then be /home/ann/Drive (on a tmpfs
# over /home that only this script sees), and every mount ends with the script at the latest.
if [ -z "${DELTADRIVE_SHOT_NS:-}" ]; then
  DELTADRIVE_SHOT_NS=1 exec unshare --mount --propagation private bash "$0" "$@"
fi
mount -t tmpfs -o mode=755 deltadrive-shot-home /home

if [ "${SKIP_APT:-}" != 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(xvfb thunar tumbler xterm x11-apps x11-utils xdotool imagemagick pngquant dbus-x11
        fonts-dejavu-core adwaita-icon-theme shared-mime-info fuse3 attr curl)
  apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi

T=$(mktemp -d /tmp/deltadrive-shot.XXXXXX)
SERVER_PID='' XVFB_PID='' THUNAR_PID='' XTERM_PID=''
MOUNTS=()
cleanup() {
  set +e
  for p in $XTERM_PID $THUNAR_PID; do kill "$p" 2>/dev/null; done
  [ -s "$T/dbus.pid" ] && kill "$(cat "$T/dbus.pid")" 2>/dev/null
  [ -n "$XVFB_PID" ] && kill "$XVFB_PID" 2>/dev/null
  sleep 0.5
  for mp in "${MOUNTS[@]}"; do
    "$BIN" unmount "$mp" --timeout 20 >/dev/null 2>&1 || fusermount3 -u -z "$mp" 2>/dev/null
  done
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  # Only remove the temp dir when nothing is mounted below it any more.
  if ! grep -q " $T/" /proc/mounts; then rm -rf "$T"; else echo "left $T (still mounted)" >&2; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# --- a server on a free port, a user, two devices -------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
mkdir -p "$T/server"
"$BIN" server --listen "127.0.0.1:$PORT" --data "$T/server" >"$T/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do curl -fsS "$URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$URL/healthz" >/dev/null || { cat "$T/server.log" >&2; echo "server did not start" >&2; exit 1; }
(umask 077; head -c 18 /dev/urandom | base64 >"$T/password")
"$BIN" admin --server "$URL" --admin-token-file "$T/server/admin.token" user add ann --password-file "$T/password" >/dev/null

# The desktop's folder is ~/Drive of the home Thunar runs with.
DESK_HOME=/home/ann
LAPTOP_MP=$T/laptop/Drive DESKTOP_MP=$DESK_HOME/Drive
mkdir -p "$LAPTOP_MP" "$DESKTOP_MP" "$DESK_HOME/Documents" "$DESK_HOME/Downloads"
for dev in laptop desktop; do
  "$BIN" login --server "$URL" --user ann --password-file "$T/password" --device "$dev" --home "$T/dev-$dev" >/dev/null
done
"$BIN" mount "$LAPTOP_MP" --home "$T/dev-laptop"; MOUNTS+=("$LAPTOP_MP")
"$BIN" mount "$DESKTOP_MP" --home "$T/dev-desktop"; MOUNTS+=("$DESKTOP_MP")

# --- a small, ordinary tree, written on the laptop -------------------------------------------
src=$T/src; mkdir -p "$src"
convert -size 800x500 plasma:steelblue-orange -blur 0x2 "$src/harbour.jpg"
convert -size 640x400 gradient:'#1d3557-#a8dadc' -font DejaVu-Sans-Bold -fill white -gravity center -pointsize 44 \
  -annotate 0 'Q3 review' "$src/slide-1.png"
convert rose: -resize 300x "$src/rose.png"
(
  cd "$LAPTOP_MP"
  mkdir -p Documents/Invoices Pictures/Holiday Projects/website Music
  cat >Documents/meeting-notes.md <<'EOF'
# Meeting notes, 14 March
- Budget for Q3 agreed; Sam sends the sheet by Friday.
- Website launch moves to April.
EOF
  printf 'month,rent,food,travel\nJan,950,310,120\nFeb,950,290,80\nMar,950,335,410\n' >Documents/budget.csv
  printf 'Dear Ms Lind,\n\nthank you for your letter of 2 March.\n' >Documents/letter.txt
  for n in 0142 0143 0144; do printf 'Invoice %s\nTotal: 240.00 EUR\n' "$n" >"Documents/Invoices/invoice-$n.txt"; done
  cp "$src/harbour.jpg" Pictures/Holiday/harbour.jpg
  cp "$src/rose.png" Pictures/Holiday/garden.png
  cp "$src/slide-1.png" Pictures/slide-1.png
  printf '<!doctype html>\n<title>Lind & Co</title>\n<h1>Welcome</h1>\n' >Projects/website/index.html
  printf 'body { font-family: sans-serif; }\n' >Projects/website/style.css
  printf '#!/bin/sh\nrsync -a site/ web:/srv/www/\n' >Projects/website/deploy.sh; chmod +x Projects/website/deploy.sh
  cp "$src/harbour.jpg" Pictures/wallpaper.jpg
  printf 'Shopping: bread, coffee, lemons\n' >todo.txt
  cp "$src/harbour.jpg" harbour.jpg
  cp Documents/budget.csv "budget 2026.csv"
  cp Documents/meeting-notes.md notes.md
  printf 'Drive of ann: synced by deltadrive.\n' >README.txt
)
"$BIN" wait --home "$T/dev-laptop" --timeout-secs 60 >/dev/null
"$BIN" wait --home "$T/dev-desktop" --timeout-secs 60 >/dev/null
for f in Documents/budget.csv Pictures/Holiday/harbour.jpg Projects/website/deploy.sh README.txt; do
  cmp -s "$LAPTOP_MP/$f" "$DESKTOP_MP/$f" || { echo "$f did not reach the desktop" >&2; exit 1; }
done
echo "the desktop has the laptop's tree"

# --- Thunar on the desktop's folder, under Xvfb ----------------------------------------------
DISP=:$(for n in $(seq 91 120); do [ -e "/tmp/.X11-unix/X$n" ] || [ -e "/tmp/.X$n-lock" ] || { echo "$n"; break; }; done)
Xvfb "$DISP" -screen 0 1280x800x24 -nolisten tcp >"$T/xvfb.log" 2>&1 &
XVFB_PID=$!
export DISPLAY=$DISP
for _ in $(seq 1 50); do xdpyinfo >/dev/null 2>&1 && break; sleep 0.1; done
xdpyinfo >/dev/null 2>&1 || { cat "$T/xvfb.log" >&2; echo "Xvfb did not start on $DISP" >&2; exit 1; }
mkdir -p "$T/run" && chmod 700 "$T/run"
# The desktop session runs as uid 1000 in a user namespace mapped onto root: Thunar sees a
# normal user (no "you are using the root account" bar) and the kernel still sees root, the
# owner of the FUSE mounts. It gets a D-Bus session bus of its own (dbus-launch).
as_ann() {
  env HOME=$DESK_HOME USER=ann LOGNAME=ann XDG_CONFIG_HOME=$DESK_HOME/.config \
    XDG_CACHE_HOME=$DESK_HOME/.cache XDG_DATA_HOME=$DESK_HOME/.local/share XDG_RUNTIME_DIR="$T/run" \
    GTK_THEME=Adwaita NO_AT_BRIDGE=1 \
    unshare --user --map-user=1000 --map-group=1000 "$@"
}
cat >"$T/session.sh" <<EOF
eval "\$(dbus-launch --sh-syntax)"
echo "\$DBUS_SESSION_BUS_PID" >"$T/dbus.pid"
# Details view (names, sizes, types, dates), the address as a path bar, no hidden files.
xfconf-query -c thunar -p /last-view -n -t string -s ThunarDetailsView
xfconf-query -c thunar -p /last-location-bar -n -t string -s ThunarLocationButtons
xfconf-query -c thunar -p /last-show-hidden -n -t bool -s false
xfconf-query -c thunar -p /misc-date-style -n -t string -s THUNAR_DATE_STYLE_YYYYMMDD 2>/dev/null
exec thunar "$DESKTOP_MP"
EOF
as_ann bash "$T/session.sh" >"$T/thunar.log" 2>&1 &
THUNAR_PID=$!

window_of() { # $1 pid, $2 class: the visible top-level window id
  local w
  for _ in $(seq 1 150); do
    w=$(xdotool search --onlyvisible --pid "$1" --class "$2" 2>/dev/null | tail -1)
    [ -n "$w" ] && { echo "$w"; return; }
    sleep 0.1
  done
  return 1
}
shoot() { # $1 window, $2 output png
  import -window "$1" "$T/shot.png"
  pngquant --force --quality 60-90 --strip --output "$2" "$T/shot.png" 2>/dev/null || convert "$T/shot.png" -strip "$2"
  echo "wrote $2 ($(stat -c %s "$2") bytes)"
}
w=$(window_of "$THUNAR_PID" Thunar) || { cat "$T/thunar.log" >&2; echo "no Thunar window" >&2; exit 1; }
xdotool windowsize "$w" 900 560 windowmove "$w" 0 0
sleep 4 # let it list the folder and draw the icons
mkdir -p "$OUT"
shoot "$w" "$OUT/file-manager.png"
kill "$THUNAR_PID" 2>/dev/null || true; THUNAR_PID=""

# --- each file's sync state, in a terminal on the same folder -------------------------------
cat >"$T/status.sh" <<EOF
cd "$DESKTOP_MP"
show() { printf '\$ %s\n' "\$*"; eval "\$@"; }
show ls -F
show getfattr -n user.deltadrive.status README.txt Documents/budget.csv Pictures/Holiday/harbour.jpg
show 'echo draft >new.txt; getfattr -n user.deltadrive.status --only-values new.txt; echo'
show 'deltadrive wait; getfattr -n user.deltadrive.status --only-values new.txt; echo'
printf '\$ '
exec sleep 600
EOF
mkdir -p "$T/bin" && ln -sf "$BIN" "$T/bin/deltadrive"
as_ann env PATH="$T/bin:$PATH" DELTADRIVE_HOME="$T/dev-desktop" \
  xterm -geometry 100x20+0+0 -fa 'DejaVu Sans Mono' -fs 10 -bg '#1e1e1e' -fg '#e0e0e0' \
  -title 'ann@desktop: ~/Drive' -e bash "$T/status.sh" >"$T/xterm.log" 2>&1 &
XTERM_PID=$!
w=$(window_of "$XTERM_PID" XTerm) || { cat "$T/xterm.log" >&2; echo "no xterm window" >&2; exit 1; }
sleep 3
shoot "$w" "$OUT/file-status.png"
