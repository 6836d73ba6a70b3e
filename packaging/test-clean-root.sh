#!/usr/bin/env bash
# Installs the .deb on a clean Debian system as a user would, uses it, removes and purges it,
# and checks what is left. Run as root before each release (docs/install.md):
#
#   packaging/test-clean-root.sh [--boot] [--keep] DEB [DBGSYM_DDEB]
#
#   --boot   also boot the root with systemd (systemd-nspawn -b) and run the units under it
#   --keep   keep the root afterwards (its path is printed) instead of deleting it
#
# 1. The clean root: `debootstrap --variant=minbase` of this machine's Debian release from the
#    Debian mirror this machine's apt uses, plus what a standard Debian system has and the
#    checks need (systemd-sysv, dbus, dbus-user-session, libpam-systemd, man-db,
#    bash-completion). Nothing of ours is in it. It is made once (about 1.5 minutes) into a
#    tarball, $DELTADRIVE_CLEAN_ROOT_CACHE [default /var/cache/deltadrive/clean-root-SUITE.tar.zst],
#    and unpacked fresh for every run (seconds). Delete the tarball to make a new one.
# 2. In the root (systemd-nspawn, the host's network): `apt-get install ./deltadrive_*.deb`,
#    whose Depends come from the mirror; then `deltadrive --version`, `man deltadrive`, the bash
#    completion of a word, `mount.fuse.deltadrive --help` and a dry run of the helper. With a
#    DBGSYM_DDEB: its debug file is installed where the binary's build id points.
# 3. With --boot, under the root's own systemd: deltadrive-server.service started (Type=notify:
#    `systemctl start` returns once it listens), its limits, a kill -9 and the restart, the
#    journal, `systemd-analyze security`; a user `ann` whose deltadrive@Drive.service mounts
#    ~/Drive (ready means mounted), syncs a file, restarts after a kill -9, and unmounts on
#    `systemctl --user stop`; then `systemctl stop` of the server, README's
#    `bash packaging/quickstart.sh` with the installed binary, and the server started again
#    so that removing the package must stop it.
# 4. `apt-get remove`, `apt-get purge` and `apt-get autoremove --purge` (what the package pulled
#    in), then: none of the package's files is left, dpkg has forgotten it, the root's file list
#    is the one from before the install except apt's and dpkg's bookkeeping (and, with --boot,
#    the logs and the data below), and nothing named deltadrive is left but the data a user
#    keeps: the server's /var/lib/private/deltadrive-server (and systemd's link to it,
#    /var/lib/deltadrive-server), ann's device home ~/.local/share/deltadrive, and
#    quickstart.sh's device home /var/lib/deltadrive-device and folder /srv/deltadrive.
#
# Needs root, debootstrap, systemd-nspawn (systemd-container), zstd and the network to the
# mirror (packaging/install-deps.sh installs them). Prints one line per check; exits non-zero
# at the first failure, after printing what it saw (with --boot, the units' journal too).

# SC2016: single quotes hold what the root's shell or dpkg-query expands. SC2015: `A && B || fail`
# is meant: fail when A or B is false.
# shellcheck disable=SC2016,SC2015
set -euo pipefail

boot=0
keep=0
deb=
ddeb=
while [ $# -gt 0 ]; do
  case $1 in
    --boot) boot=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "test-clean-root.sh: unknown option $1" >&2; exit 2 ;;
    *)
      if [ -z "$deb" ]; then deb=$1
      elif [ -z "$ddeb" ]; then ddeb=$1
      else echo "test-clean-root.sh: too many arguments" >&2; exit 2
      fi
      ;;
  esac
  shift
done
[ -n "$deb" ] || { echo "usage: test-clean-root.sh [--boot] [--keep] DEB [DBGSYM_DDEB]" >&2; exit 2; }
[ -f "$deb" ] || { echo "test-clean-root.sh: no file $deb" >&2; exit 2; }
[ -z "$ddeb" ] || [ -f "$ddeb" ] || { echo "test-clean-root.sh: no file $ddeb" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "test-clean-root.sh: run it as root" >&2; exit 2; }
for tool in debootstrap systemd-nspawn zstd nsenter dpkg-deb flock; do
  command -v "$tool" >/dev/null || {
    echo "test-clean-root.sh: $tool is missing (bash packaging/install-deps.sh)" >&2
    exit 2
  }
done

say() { printf '%s\n' "$*"; }
ok() { printf 'ok   %s\n' "$*"; }
fail() {
  printf 'FAIL %s\n' "$*" >&2
  exit 1
}

version=$(dpkg-deb -f "$deb" Version)
upstream=${version%-*}
package=$(dpkg-deb -f "$deb" Package)
[ "$package" = deltadrive ] || fail "$deb is package $package, not deltadrive"

# --- 1. the clean root ----------------------------------------------------------------------
# shellcheck disable=SC1091
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || fail "cannot tell this machine's Debian release from /etc/os-release"
mirror=${DELTADRIVE_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The first Debian archive (not the security one) in apt's sources, deb822 or one-line.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')
fi
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')
fi
[ -n "$mirror" ] || fail "no Debian mirror in apt's sources: set DELTADRIVE_DEBIAN_MIRROR"

cache=${DELTADRIVE_CLEAN_ROOT_CACHE:-/var/cache/deltadrive/clean-root-$suite.tar.zst}
include=systemd-sysv,dbus,dbus-user-session,libpam-systemd,man-db,bash-completion
mkdir -p "$(dirname "$cache")"
(
  flock 9
  if [ ! -s "$cache" ]; then
    say "making the clean root once: debootstrap --variant=minbase $suite (from apt's Debian mirror) into $cache"
    work=$(mktemp -d /var/tmp/deltadrive-debootstrap.XXXXXX)
    if ! debootstrap --variant=minbase --include="$include" "$suite" "$work/root" "$mirror" >"$work/log" 2>&1; then
      tail -n 30 "$work/log" >&2
      rm -rf "$work"
      fail "debootstrap failed"
    fi
    tar -C "$work/root" --numeric-owner -cf - . | zstd -q -T0 -3 -o "$cache.tmp"
    mv "$cache.tmp" "$cache"
    rm -rf "$work"
  fi
) 9>"$cache.lock"

scratch=$(mktemp -d /var/tmp/deltadrive-clean-root.XXXXXX)
root=$scratch/root
mkdir -p "$root"
leader=
nspawn_pid=
cleanup() {
  local status=$?
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    if [ "$status" -ne 0 ] && [ -n "$leader" ]; then
      say "----- journal of the deltadrive units (the run failed) -----" >&2
      for match in _SYSTEMD_UNIT=deltadrive-server.service UNIT=deltadrive-server.service \
        _SYSTEMD_USER_UNIT=deltadrive@Drive.service USER_UNIT=deltadrive@Drive.service; do
        nsenter -t "$leader" -a journalctl --no-pager -o short-precise "$match" 2>&1 | tail -n 40 >&2 || true
      done
    fi
    [ -z "$leader" ] || nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
  fi
  if [ "$keep" -eq 1 ]; then
    say "kept the root: $root"
  elif grep -qF " $root" /proc/self/mounts; then
    say "not deleting $scratch: something is still mounted below it" >&2
  else
    rm -rf "$scratch"
  fi
  exit "$status"
}
trap cleanup EXIT
zstd -q -d -c "$cache" | tar -C "$root" --numeric-owner -xf -
mkdir -p "$root/var/tmp/pkg"
cp "$deb" "$root/var/tmp/pkg/"
debname=$(basename "$deb")
[ -z "$ddeb" ] || cp "$ddeb" "$root/var/tmp/pkg/"
ok "clean $suite root unpacked from $cache"

# Runs a command in the root: through nsenter into the booted system with --boot, else in a
# throwaway container (systemd-nspawn) sharing the host's network.
inroot() {
  if [ -n "$leader" ]; then
    nsenter -t "$leader" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
  else
    systemd-nspawn -q --register=no --keep-unit -D "$root" --pipe \
      --setenv=DEBIAN_FRONTEND=noninteractive --setenv=LANG=C.UTF-8 "$@" \
      2> >(grep -v 'Attempted to remove disk file system' >&2)
  fi
}

# The root's file list, without what changes by itself (kernel and runtime file systems,
# temporary files) and without apt's and dpkg's bookkeeping, which installing anything changes.
file_list() {
  (cd "$root" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
    -o -path ./tmp -o -path ./var/tmp -o -path ./var/lib/apt -o -path ./var/cache/apt \
    -o -path ./var/lib/dpkg -o -path ./var/log/apt -o -path ./var/cache/man \
    -o -path ./var/cache/debconf -o -path ./var/cache/ldconfig -o -path ./var/log/journal \
    -o -path ./var/lib/systemd -o -path ./var/lib/private -o -path ./home/ann \
    -o -path ./var/lib/deltadrive-device -o -path ./srv/deltadrive \) -prune \
    -o -print | grep -v -x -e './var/log/dpkg.log' -e './var/log/alternatives.log' \
    -e './var/lib/deltadrive-server' | LC_ALL=C sort)
}

# --- 3a. boot (with --boot) -----------------------------------------------------------------
if [ "$boot" -eq 1 ]; then
  # No udev in a container: make /dev/fuse usable by users, as udev does on Debian.
  systemd-nspawn --register=no --keep-unit -D "$root" -b --console=passive \
    --machine "deltadrive-test-$$" >"$scratch/boot.log" 2>&1 </dev/null &
  nspawn_pid=$!
  for _ in $(seq 1 300); do
    leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$leader" ] || { cat "$scratch/boot.log" >&2; fail "systemd did not start in the root"; }
  # Until systemd's own socket is there, systemctl cannot even ask.
  state=
  for _ in $(seq 1 600); do
    state=$(timeout 120 nsenter -t "$leader" -a systemctl is-system-running --wait 2>&1 || true)
    case $state in
      *'Failed to connect'*) sleep 0.2 ;;
      *) break ;;
    esac
  done
  [ "$state" = running ] || {
    nsenter -t "$leader" -a systemctl --failed --no-pager >&2 || true
    fail "the booted root is '$state', not running"
  }
  ok "booted the root with systemd $(inroot systemctl --version | head -n 1 | cut -d' ' -f2) (systemd-nspawn -b): running"
  inroot sh -c 'umount /dev/fuse 2>/dev/null; rm -f /dev/fuse; mknod -m 0666 /dev/fuse c 10 229'
  inroot useradd -m -s /bin/bash ann
fi

before=$scratch/files-before
file_list >"$before"
inroot dpkg-query -W -f '${Package}\n' | LC_ALL=C sort >"$scratch/packages-before"

# --- 2. install and use ---------------------------------------------------------------------
inroot apt-get update -qq >"$scratch/apt.log" 2>&1 || { cat "$scratch/apt.log" >&2; fail "apt-get update"; }
inroot apt-get install -y -q "/var/tmp/pkg/$debname" >"$scratch/install.log" 2>&1 || {
  cat "$scratch/install.log" >&2
  fail "apt-get install ./$debname"
}
pulled=$(inroot dpkg-query -W -f '${Package}\n' | LC_ALL=C sort | LC_ALL=C comm -13 "$scratch/packages-before" - | tr '\n' ' ')
ok "apt-get install ./$debname; new packages: $pulled"
inroot dpkg -s fuse3 >/dev/null || fail "fuse3 (Depends) was not installed"
inroot dpkg -L deltadrive >"$scratch/owned"
installed_size=$(inroot dpkg-query -W -f '${Installed-Size}' deltadrive)
ok "installed: $(grep -c . "$scratch/owned") paths, Installed-Size ${installed_size} KiB"

v=$(inroot deltadrive --version)
[ "$v" = "deltadrive $upstream" ] || fail "deltadrive --version said '$v', want 'deltadrive $upstream'"
ok "deltadrive --version: $v"

page=$(inroot man -w deltadrive)
[ "$page" = /usr/share/man/man1/deltadrive.1.gz ] || fail "man -w deltadrive: $page"
text=$(inroot env MANPAGER=cat MANWIDTH=80 man deltadrive 2>&1) || fail "man deltadrive: $text"
grep -q 'deltadrive-mount(1)' <<<"$text" || fail "man deltadrive does not list deltadrive-mount(1): $text"
text=$(inroot env MANPAGER=cat MANWIDTH=80 man deltadrive-mount 2>&1) || fail "man deltadrive-mount: $text"
grep -q -- '--foreground' <<<"$text" || fail "man deltadrive-mount lacks --foreground: $text"
ok "man deltadrive, man deltadrive-mount"

# What bash does on TAB: bash-completion loads the packaged file for the command, then the
# completion function fills COMPREPLY.
complete_words() {
  inroot bash -c '
    . /usr/share/bash-completion/bash_completion
    _completion_loader deltadrive
    spec=$(complete -p deltadrive) || exit 3
    fn=$(printf "%s\n" "$spec" | sed -n "s/.* -F \([^ ]*\) .*/\1/p")
    [ -n "$fn" ] || exit 4
    COMP_LINE=$1; COMP_POINT=${#COMP_LINE}; COMP_TYPE=9; COMP_KEY=9
    read -r -a COMP_WORDS <<<"$COMP_LINE"
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    "$fn" deltadrive "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
    printf "%s\n" "${COMPREPLY[@]}"
  ' complete "$1"
}
words=$(complete_words "deltadrive unmo") || fail "bash completion of 'deltadrive unmo' failed ($?)"
[ "$(printf '%s' "$words" | tr -d ' ')" = unmount ] || fail "bash completes 'deltadrive unmo' to '$words'"
words=$(complete_words "deltadrive mount --fore") || fail "bash completion of 'deltadrive mount --fore' failed"
grep -qx -- '--foreground *' <<<"$words" || fail "bash completes 'deltadrive mount --fore' to '$words'"
for f in /usr/share/zsh/vendor-completions/_deltadrive /usr/share/fish/vendor_completions.d/deltadrive.fish; do
  grep -qx ".$f" <(sed 's|^|.|' "$scratch/owned") || fail "$f is not installed"
done
ok "bash completes 'deltadrive unmo' to unmount and 'deltadrive mount --fore' to --foreground; zsh and fish files installed"

text=$(inroot /sbin/mount.fuse.deltadrive --help 2>&1) || fail "mount.fuse.deltadrive --help: $text"
grep -q 'home=H' <<<"$text" || fail "mount.fuse.deltadrive --help: $text"
text=$(inroot sh -c 'mkdir -p /mnt/drive && mount.fuse.deltadrive deltadrive /mnt/drive -fv -o home=/root/dd,_netdev 2>&1') ||
  fail "mount.fuse.deltadrive dry run: $text"
grep -qF 'would run: /usr/bin/deltadrive mount /mnt/drive --home /root/dd' <<<"$text" ||
  fail "mount.fuse.deltadrive dry run: $text"
inroot rmdir /mnt/drive
ok "mount.fuse.deltadrive --help; its dry run runs /usr/bin/deltadrive"

if [ -n "$ddeb" ]; then
  inroot dpkg -i "/var/tmp/pkg/$(basename "$ddeb")" >"$scratch/dbgsym.log" 2>&1 || {
    cat "$scratch/dbgsym.log" >&2
    fail "dpkg -i $(basename "$ddeb")"
  }
  # The binary's build id names its debug file: /usr/lib/debug/.build-id/ab/cdef....debug.
  id=$(readelf -n "$root/usr/bin/deltadrive" | sed -n 's/.*Build ID: *\([0-9a-f]*\).*/\1/p')
  [ -n "$id" ] || fail "the packaged binary has no build id"
  dbg=/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
  [ -f "$root$dbg" ] || fail "deltadrive-dbgsym has no $dbg"
  readelf -S "$root$dbg" 2>/dev/null | grep -q '\.debug_line' || fail "$dbg holds no line tables"
  inroot apt-get purge -y -q deltadrive-dbgsym >/dev/null || fail "apt-get purge deltadrive-dbgsym"
  [ ! -e "$root$dbg" ] || fail "$dbg is left after purging deltadrive-dbgsym"
  ok "deltadrive-dbgsym installs $dbg (the binary's build id, with line tables) and purges clean"
fi

# --- 3b. the units under a real systemd (with --boot) ---------------------------------------
if [ "$boot" -eq 1 ]; then
  inroot systemctl daemon-reload
  # Type=notify: start returns once the server sent READY=1, which it does once it listens.
  inroot timeout 60 systemctl start deltadrive-server.service ||
    fail "systemctl start deltadrive-server"
  healthz() {
    inroot bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>&1 | tail -n 1
  }
  [ "$(healthz)" = ok ] || fail "the server answered '$(healthz)' to /healthz right after systemctl start returned"
  show() { inroot systemctl show -p "$2" --value "$1"; }
  [ "$(show deltadrive-server ActiveState)" = active ] || fail "deltadrive-server is not active"
  ok "systemctl start deltadrive-server returned once it listened (Type=notify): /healthz answers ok"
  say "     limits: MemoryHigh=$(show deltadrive-server MemoryHigh) MemoryMax=$(show deltadrive-server MemoryMax) TasksMax=$(show deltadrive-server TasksMax) LimitNOFILE=$(show deltadrive-server LimitNOFILE)"
  [ "$(show deltadrive-server TasksMax)" != infinity ] || fail "TasksMax is not set"
  [ "$(show deltadrive-server MemoryMax)" != infinity ] || fail "MemoryMax is not set"
  token=/var/lib/private/deltadrive-server/admin.token
  mode=$(inroot stat -c '%a %U' "$token") || fail "no admin token at $token"
  [ "${mode%% *}" = 600 ] || fail "admin token mode $mode"
  ok "admin token at $token ($mode, the dynamic user)"

  pid1=$(show deltadrive-server MainPID)
  inroot systemctl kill -s KILL deltadrive-server.service
  for _ in $(seq 1 100); do
    [ "$(show deltadrive-server NRestarts)" = 1 ] && [ "$(show deltadrive-server ActiveState)" = active ] && break
    sleep 0.1
  done
  pid2=$(show deltadrive-server MainPID)
  [ "$(show deltadrive-server NRestarts)" = 1 ] && [ "$pid2" != "$pid1" ] && [ "$pid2" != 0 ] ||
    fail "no restart after kill -9: NRestarts=$(show deltadrive-server NRestarts) MainPID $pid1 -> $pid2"
  [ "$(healthz)" = ok ] || fail "the restarted server does not answer"
  ok "kill -9 of the server: Restart=on-failure started it again (pid $pid1 -> $pid2), /healthz ok"
  journal=$(inroot journalctl --no-pager -o cat -u deltadrive-server.service)
  for line in 'listening' 'Main process exited, code=killed, status=9/KILL' 'Scheduled restart job'; do
    grep -qF "$line" <<<"$journal" || fail "the journal of deltadrive-server lacks '$line': $journal"
  done
  ok "journal of deltadrive-server: $(grep -m1 -F listening <<<"$journal" | cut -c1-110)"
  security=$(inroot systemd-analyze security --no-pager deltadrive-server.service | tail -n 1)
  say "     systemd-analyze security deltadrive-server.service: ${security#→ }"

  # A user, its device logged in, and its folder mounted by the user unit.
  inroot sh -c 'umask 077; head -c 18 /dev/urandom | base64 > /tmp/ann.pw; chown ann /tmp/ann.pw'
  inroot deltadrive admin --server http://127.0.0.1:8080 --admin-token-file "$token" \
    user add ann --password-file /tmp/ann.pw >/dev/null || fail "deltadrive admin user add ann"
  inroot runuser -u ann -- deltadrive login --server http://127.0.0.1:8080 --user ann \
    --password-file /tmp/ann.pw --device box >/dev/null || fail "deltadrive login as ann"
  inroot loginctl enable-linger ann
  uid=$(inroot id -u ann)
  # The first user manager of a fresh root can take a while (it sets up the user's runtime
  # folder and bus): up to 60 s.
  for _ in $(seq 1 600); do
    inroot test -S "/run/user/$uid/bus" && [ "$(show "user@$uid.service" ActiveState)" = active ] && break
    sleep 0.1
  done
  if ! inroot test -S "/run/user/$uid/bus"; then
    inroot systemctl status --no-pager "user@$uid.service" "user-runtime-dir@$uid.service" >&2 || true
    inroot ls -la "/run/user/$uid" >&2 || true
    fail "ann's user manager did not start (loginctl enable-linger)"
  fi
  asann() {
    inroot runuser -u ann -- env XDG_RUNTIME_DIR="/run/user/$uid" \
      DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" "$@"
  }
  ushow() { asann systemctl --user show -p "$1" --value deltadrive@Drive.service; }
  mounted() { grep -q " /home/ann/Drive fuse" "/proc/$leader/mounts"; }
  asann timeout 90 systemctl --user start deltadrive@Drive.service ||
    fail "systemctl --user start deltadrive@Drive"
  mounted || fail "systemctl --user start returned before ~/Drive was mounted"
  [ "$(ushow ActiveState)" = active ] || fail "deltadrive@Drive is $(ushow ActiveState)"
  ok "ann: systemctl --user start deltadrive@Drive returned with ~/Drive mounted (Type=notify)"
  asann sh -c 'echo "from the user unit" > /home/ann/Drive/hello.txt'
  asann timeout 60 deltadrive wait >/dev/null || fail "deltadrive wait (the file did not reach the server)"
  ok "a file written into ~/Drive reached the server (deltadrive wait)"

  upid1=$(ushow MainPID)
  asann systemctl --user kill -s KILL deltadrive@Drive.service
  # RestartSec=5s; ExecStartPre unmounts the dead mount first.
  for _ in $(seq 1 300); do
    [ "$(ushow NRestarts)" = 1 ] && [ "$(ushow ActiveState)" = active ] && break
    sleep 0.1
  done
  upid2=$(ushow MainPID)
  [ "$(ushow NRestarts)" = 1 ] && [ "$upid2" != "$upid1" ] && [ "$upid2" != 0 ] ||
    fail "no restart of deltadrive@Drive after kill -9: NRestarts=$(ushow NRestarts) MainPID $upid1 -> $upid2"
  mounted || fail "/home/ann/Drive is not mounted after the restart"
  [ "$(asann cat /home/ann/Drive/hello.txt)" = "from the user unit" ] || fail "hello.txt after the restart"
  ok "kill -9 of ann's mount daemon: restarted over the dead mount (pid $upid1 -> $upid2), hello.txt still there"

  asann timeout 90 systemctl --user stop deltadrive@Drive.service || fail "systemctl --user stop deltadrive@Drive"
  ! mounted || fail "/home/ann/Drive is still mounted after systemctl --user stop"
  [ "$(ushow ActiveState)" = inactive ] && [ "$(ushow Result)" = success ] ||
    fail "after stop deltadrive@Drive is $(ushow ActiveState) (result $(ushow Result))"
  ok "systemctl --user stop deltadrive@Drive: unmounted, inactive, result success"
  ujournal=$(inroot journalctl --no-pager -o cat _SYSTEMD_USER_UNIT=deltadrive@Drive.service + USER_UNIT=deltadrive@Drive.service)
  for line in 'Started deltadrive@Drive.service' 'Main process exited, code=killed, status=9/KILL' 'Stopped deltadrive@Drive.service'; do
    grep -qF "$line" <<<"$ujournal" || fail "the journal of deltadrive@Drive lacks '$line': $ujournal"
  done
  ok "journal of deltadrive@Drive: started, killed, restarted, stopped (${#ujournal} bytes, the daemon's own lines too: $(grep -c -i -E 'info|warn' <<<"$ujournal"))"

  inroot timeout 60 systemctl stop deltadrive-server.service || fail "systemctl stop deltadrive-server"
  [ "$(show deltadrive-server ActiveState)" = inactive ] && [ "$(show deltadrive-server Result)" = success ] ||
    fail "after stop deltadrive-server is $(show deltadrive-server ActiveState) (result $(show deltadrive-server Result))"
  grep -qF stopped <<<"$(inroot journalctl --no-pager -o cat -u deltadrive-server.service)" ||
    fail "the server did not log that it stopped"
  ok "systemctl stop deltadrive-server: inactive, result success, 'stopped' in its journal"

  # README's path with a .deb: `apt install ./deltadrive_*.deb && bash packaging/quickstart.sh`
  # (from a clone; the script finds the installed binary), here with the unit's server stopped.
  mkdir -p "$root/var/tmp/pkg/packaging"
  cp "$(dirname "$0")/quickstart.sh" "$root/var/tmp/pkg/packaging/"
  inroot timeout 120 bash /var/tmp/pkg/packaging/quickstart.sh /srv/deltadrive >"$scratch/quickstart.log" 2>&1 || {
    cat "$scratch/quickstart.log" "$root/var/lib/deltadrive-server/server.log" >&2
    fail "bash packaging/quickstart.sh /srv/deltadrive"
  }
  grep -q " /srv/deltadrive fuse" "/proc/$leader/mounts" || fail "quickstart.sh did not mount /srv/deltadrive"
  inroot sh -c 'echo quick > /srv/deltadrive/quick.txt'
  inroot timeout 60 deltadrive wait --home /var/lib/deltadrive-device >/dev/null ||
    fail "deltadrive wait after quickstart.sh"
  inroot deltadrive unmount /srv/deltadrive >/dev/null || fail "deltadrive unmount /srv/deltadrive"
  # minbase has no procps: the host's pgrep looks into the root's PID namespace (host PIDs).
  qs=$(pgrep --ns "$leader" --nslist pid -x -f \
    '/usr/bin/deltadrive server --listen 127.0.0.1:8080 --data /var/lib/deltadrive-server') ||
    fail "no server of quickstart.sh running"
  kill "$qs"
  for _ in $(seq 1 100); do kill -0 "$qs" 2>/dev/null || break; sleep 0.1; done
  ok "quickstart.sh with the installed binary: server, user, device, /srv/deltadrive mounted, a file synced"

  # The server running when the package goes: prerm stops it.
  inroot timeout 60 systemctl start deltadrive-server.service || fail "systemctl start deltadrive-server (after quickstart.sh)"
fi

# --- 4. remove and purge --------------------------------------------------------------------
inroot apt-get remove -y -q deltadrive >"$scratch/remove.log" 2>&1 || { cat "$scratch/remove.log" >&2; fail "apt-get remove"; }
[ ! -e "$root/usr/bin/deltadrive" ] || fail "/usr/bin/deltadrive is left after remove"
if [ "$boot" -eq 1 ]; then
  [ "$(inroot systemctl show -p ActiveState --value deltadrive-server.service)" = inactive ] ||
    fail "the server still runs after apt-get remove"
  ok "apt-get remove deltadrive (prerm stopped the running server)"
else
  ok "apt-get remove deltadrive"
fi
inroot apt-get purge -y -q deltadrive >>"$scratch/remove.log" 2>&1 || { cat "$scratch/remove.log" >&2; fail "apt-get purge"; }
inroot apt-get autoremove --purge -y -q >>"$scratch/remove.log" 2>&1 || { cat "$scratch/remove.log" >&2; fail "apt-get autoremove --purge"; }
if inroot dpkg -s deltadrive >/dev/null 2>&1; then fail "dpkg still knows deltadrive after purge"; fi
if inroot dpkg -s fuse3 >/dev/null 2>&1; then fail "fuse3 (pulled in) is left after autoremove --purge"; fi
# What autoremove keeps of what the package pulled in is kept because another installed
# package recommends it (bookworm's apt recommends ca-certificates, which needs openssl): say
# so, and purge it too, so that the file comparison below judges this package alone.
kept=$(inroot dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' | awk '$1 ~ /^[ir]/ {print $2}' |
  LC_ALL=C sort | LC_ALL=C comm -13 "$scratch/packages-before" - | tr '\n' ' ')
if [ -n "${kept// /}" ]; then
  say "     kept by autoremove (recommended by an installed package, not by deltadrive): $kept"
  # shellcheck disable=SC2086 # a list of package names
  inroot apt-get purge -y -q $kept >>"$scratch/remove.log" 2>&1 || { cat "$scratch/remove.log" >&2; fail "apt-get purge $kept"; }
fi
ls "$root"/var/lib/dpkg/info/deltadrive.* >/dev/null 2>&1 && fail "dpkg's files of deltadrive are left"
while read -r f; do
  [ -d "$root$f" ] && continue # shared folders (/usr/share/man/man1, ...)
  [ ! -e "$root$f" ] && [ ! -L "$root$f" ] || fail "$f is left after purge"
done <"$scratch/owned"
ok "purged: none of its files left, dpkg has forgotten it, what it pulled in is gone too"

after=$scratch/files-after
file_list >"$after"
if ! diff -u "$before" "$after" >"$scratch/files.diff"; then
  cat "$scratch/files.diff" >&2
  fail "the root's files differ from before the install (beyond apt's and dpkg's bookkeeping)"
fi
ok "the root's file list is the one from before the install ($(grep -c . "$after") paths)"

# Not the package's: the test's own copies of the packages, and man-db's cache of the pages
# `man deltadrive` formatted above (man-db's cron job expires it).
left=$(cd "$root" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
  -o -path ./var/tmp/pkg -o -path ./var/cache/man \) -prune \
  -o -iname '*deltadrive*' -print | LC_ALL=C sort)
want=
if [ "$boot" -eq 1 ]; then
  want=$(printf '%s\n' ./home/ann/.local/share/deltadrive ./var/lib/deltadrive-server \
    ./var/lib/private/deltadrive-server ./var/lib/deltadrive-device ./srv/deltadrive | LC_ALL=C sort)
fi
[ "$left" = "$want" ] || fail "left after purge: [$left], want only the users' data: [$want]"
if [ "$boot" -eq 1 ]; then
  ok "left after purge: only the data a user keeps ($(tr '\n' ' ' <<<"$left"))"
else
  ok "nothing named deltadrive is left"
fi
say "PASS: $debname on a clean $suite root"
