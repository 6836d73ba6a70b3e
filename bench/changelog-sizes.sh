#!/usr/bin/env bash
# Change-log size and seal CPU for the issue-#3 edit patterns, beside rsync's bytes for the
# same change. Measures the outbox (the encoded, zstd-compressed transactions a device will
# upload) and the mount daemon's CPU time (utime+stime from /proc) around each change.
# Usage: bench/changelog-sizes.sh [--bin PATH] [--reps N]
set -euo pipefail
BIN=${DELTADRIVE_BIN:-target/release/deltadrive}
REPS=3
while [ $# -gt 0 ]; do case "$1" in --bin) BIN=$2; shift 2;; --reps) REPS=$2; shift 2;; *) echo "unknown $1" >&2; exit 2;; esac; done
work=$(mktemp -d /var/tmp/dd-clsizes.XXXXXX)
mp=$work/mnt; home=$work/home; mkdir -p "$mp" "$work/native"
cleanup() { "$BIN" unmount "$mp" >/dev/null 2>&1 || fusermount3 -uz "$mp" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
DELTADRIVE_LOG=info,deltadrive::fs::capture=debug "$BIN" mount "$mp" --home "$home" --quiet-ms 200 >/dev/null
pid=$(head -1 "$home/mount.pid")
clk=$(getconf CLK_TCK)
cpu() { awk -v t="$clk" '{printf "%.0f", ($14+$15)*1000/t}' /proc/$pid/stat; }   # ms
outbox() { "$BIN" status --home "$home" --json | python3 -c 'import json,sys; p=json.load(sys.stdin)["pending_uploads"]; print(p["count"], p["bytes"])'; }
wait_sealed() { # wait until the outbox holds more than $1 entries and stops changing
  local want=$1 n b prev=""
  for _ in $(seq 1 600); do read -r n b < <(outbox); if [ "$n" -gt "$want" ] && [ "$n $b" = "$prev" ]; then echo "$n $b"; return; fi; prev="$n $b"; sleep 0.3; done
  echo "timeout waiting for the outbox" >&2; exit 1; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo "# $(date -u +%F) $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), bin $BIN"
# 1 GiB file of incompressible data.
head -c $((1<<30)) /dev/urandom > "$work/native/big"
cp "$work/native/big" "$mp/big"
read -r n0 b0 < <(wait_sealed 0)
sizes=(); cpus=()
for r in $(seq 1 "$REPS"); do
  c0=$(cpu)
  printf 'X' | dd of="$mp/big" bs=1 seek=$(( (1<<29) + r*4096 )) conv=notrunc status=none
  read -r n1 b1 < <(wait_sealed "$n0")
  c1=$(cpu)
  sizes+=($((b1-b0))); cpus+=($((c1-c0)))
  n0=$n1; b0=$b1
done
seal_cpu=$(grep -o 'sealed 1 transaction(s) in [0-9.]* ms ([0-9.]* ms CPU)' "$home/mount.log" | tail -n "$REPS" | sed -E 's/.*\(([0-9.]+) ms CPU\)/\1/' | median)
echo "1-byte in-place edit of a 1 GiB file: sealing it took ${seal_cpu} ms of CPU (median of the last $REPS seals, thread CPU time)"
echo "1-byte in-place edit of a 1 GiB file: change log $(printf '%s\n' "${sizes[@]}" | median) bytes (median of $REPS: ${sizes[*]}), daemon CPU $(printf '%s\n' "${cpus[@]}" | median) ms (${cpus[*]}; includes the write request)"

# The same file rewritten whole with one byte inserted in the middle (temp + rename).
c0=$(cpu)
{ head -c $((1<<29)) "$mp/big"; printf 'Y'; tail -c +$(( (1<<29) + 1 )) "$mp/big"; } > "$mp/.big.tmp"
mv "$mp/.big.tmp" "$mp/big"
read -r n1 b1 < <(wait_sealed "$n0")
c1=$(cpu)
echo "1 GiB rewritten whole, 1 byte inserted mid-file: change log $((b1-b0)) bytes, daemon CPU $((c1-c0)) ms (includes receiving the 1 GiB write); whole-file upload would be $(( (1<<30) + 1 )) bytes"
n0=$n1; b0=$b1
rm -f "$mp/big"; read -r n0 b0 < <(wait_sealed "$n0")

# 100 MiB text file, 1% of its lines changed, against rsync over a pipe (delta mode).
python3 - "$work/native/text" <<'PY'
import random, sys
random.seed(7)
words = ["alpha","beta","gamma","delta","sync","folder","change","log","device","server","kernel","fuse"]
with open(sys.argv[1], "w") as f:
    size = 0
    i = 0
    while size < 100 * 1024 * 1024:
        line = f"{i:08d} " + " ".join(random.choice(words) for _ in range(10)) + "\n"
        f.write(line); size += len(line); i += 1
PY
cp "$work/native/text" "$mp/text"
cp "$work/native/text" "$work/native/text.old"
read -r n0 b0 < <(wait_sealed "$n0")
python3 - "$work/native/text" <<'PY'
import random, sys
random.seed(8)
lines = open(sys.argv[1]).read().split("\n")
for i in random.sample(range(len(lines) - 1), (len(lines) - 1) // 100):
    lines[i] = lines[i][:9] + "EDITED " + lines[i][9:]
open(sys.argv[1], "w").write("\n".join(lines))
PY
c0=$(cpu)
# An editor's save: write a temp file, rename it over.
cp "$work/native/text" "$mp/.text.tmp" && mv "$mp/.text.tmp" "$mp/text"
read -r n1 b1 < <(wait_sealed "$n0")
c1=$(cpu)
rs=$(rsync --no-whole-file --stats "$work/native/text" "$work/native/text.old" | awk '/Total bytes sent/{gsub(",","",$4); print $4}')
echo "100 MiB text, 1% of lines changed (temp+rename): change log $((b1-b0)) bytes, daemon CPU $((c1-c0)) ms; rsync --no-whole-file sent ${rs} bytes for the same change; whole file $(stat -c %s "$work/native/text") bytes"
