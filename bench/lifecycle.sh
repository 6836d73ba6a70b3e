#!/usr/bin/env bash
# The mount daemon's life cycle, measured for two binaries side by side (issue 16, item 6):
#
#   remount: mount, write a file, `fusermount3 -u`, mount the same home again at once; ROUNDS
#            times. Prints how many immediate remounts failed.
#   stop:    a writer streams BIG_MB MiB into the mount while another creates small files;
#            after LOAD_S seconds the daemon gets SIGTERM. Prints the seconds from SIGTERM to
#            the daemon's exit and its last log line.
#
# usage: bench/lifecycle.sh BASELINE_BIN CANDIDATE_BIN [REPS]
# env:   ROUNDS (10), BIG_MB (3000), LOAD_S (15), WORK (/var/tmp/deltadrive-lifecycle)
# Needs root or a user who may mount FUSE, and fusermount3. Not a speed claim: the stop time
# shows whether a stop is bounded, the remount count whether a remount races the old daemon.
set -euo pipefail
base=$1
cand=$2
reps=${3:-3}
rounds=${ROUNDS:-10}
big_mb=${BIG_MB:-3000}
load_s=${LOAD_S:-15}
work=${WORK:-/var/tmp/deltadrive-lifecycle}
mkdir -p "$work"

remount() { # BIN -> number of failed immediate remounts
  local bin=$1 d fail=0 i
  d=$(mktemp -d "$work/remount.XXXX")
  mkdir "$d/mnt"
  "$bin" mount "$d/mnt" --home "$d/home" >/dev/null
  for i in $(seq 1 "$rounds"); do
    echo "$i" >"$d/mnt/f$i"
    fusermount3 -u "$d/mnt"
    if ! "$bin" mount "$d/mnt" --home "$d/home" >/dev/null 2>&1; then
      fail=$((fail + 1))
      sleep 3
      "$bin" mount "$d/mnt" --home "$d/home" >/dev/null
    fi
  done
  "$bin" unmount "$d/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$d/mnt"
  rm -rf "$d"
  echo "$fail"
}

stop() { # BIN -> seconds from SIGTERM to exit, then the daemon's last log line
  local bin=$1 d pid t0 t1 i
  d=$(mktemp -d "$work/stop.XXXX")
  mkdir "$d/mnt"
  "$bin" mount "$d/mnt" --home "$d/home" >/dev/null
  pid=$(head -1 "$d/home/mount.pid")
  mkdir "$d/mnt/small"
  dd if=/dev/zero of="$d/mnt/big.bin" bs=1M count="$big_mb" status=none 2>/dev/null &
  local big=$!
  # Stops at the first create that fails (the mount went away); its error is not news.
  (for i in $(seq 1 100000); do echo "$i" >"$d/mnt/small/f$i" || break; done) 2>/dev/null &
  local small=$!
  sleep "$load_s"
  t0=$(date +%s.%N)
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  t1=$(date +%s.%N)
  wait "$big" "$small" 2>/dev/null || true
  fusermount3 -u -z "$d/mnt" 2>/dev/null || true
  printf '%.1f\t%s\n' "$(echo "$t1 - $t0" | bc)" "$(tail -1 "$d/home/mount.log" | cut -c29-200)"
  rm -rf "$d"
}

for bin in "$base" "$cand"; do
  echo "== $bin ($(sha256sum "$bin" | cut -c1-12))"
  for r in $(seq 1 "$reps"); do
    echo "remount rep $r: $(remount "$bin") of $rounds immediate remounts failed"
  done
  for r in $(seq 1 "$reps"); do
    echo "stop rep $r: $(stop "$bin")"
  done
done
