#!/usr/bin/env bash
# Runs the POSIX suite pjdfstest 0.2.2 (config ../shared/pjdfstest.toml) against a fresh
# deltadrive mount, prints its tally, and fails if any test failed. On failure it prints
# the mount daemon's log.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${DELTADRIVE_BIN:-${CARGO_TARGET_DIR:-target}/debug/deltadrive}"
CONFIG="${PJDFSTEST_CONFIG:-$PWD/../shared/pjdfstest.toml}"
[ -f "$CONFIG" ] || CONFIG="$PWD/tests/pjdfstest.toml"
work=$(mktemp -d /tmp/deltadrive-pjdfs.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/mnt"
cleanup() {
  "$BIN" unmount "$work/mnt" >/dev/null 2>&1 || fusermount3 -uz "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$BIN" mount "$work/mnt" --home "$work/home" --allow-other
# The suite works in a subfolder that every test user can enter.
mkdir -p "$work/mnt/pjdfs" && chmod 777 "$work/mnt/pjdfs"
set +e
(cd "$work/mnt/pjdfs" && NO_COLOR=1 CLICOLOR=0 pjdfstest -c "$CONFIG" -p "$work/mnt/pjdfs") >"$work/out.txt" 2>&1
rc=$?
set -e
# Show every failure with its description and reason.
grep -A3 'FAILED' "$work/out.txt" | head -200 || true
summary=$(grep -a 'Summary' "$work/out.txt" | tail -1 | sed 's/\x1b\[[0-9;]*m//g')
echo "$summary"
failed=$(echo "$summary" | sed -nE 's/.*Summary: ([0-9]+) failed.*/\1/p')
skipped=$(echo "$summary" | sed -nE 's/.* ([0-9]+) skipped.*/\1/p')
passed=$(echo "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
if [ -z "$passed" ]; then
  echo "pjdfstest printed no summary (exit $rc); its output:" >&2
  tail -50 "$work/out.txt" >&2
  cat "$work/home/mount.log" >&2 || true
  exit 1
fi
echo "pjdfstest: ${passed} passed, ${failed} failed, ${skipped} skipped"
if [ "$rc" -ne 0 ] || [ "$failed" != "0" ]; then
  echo "pjdfstest FAILED (exit $rc); mount log:" >&2
  tail -200 "$work/home/mount.log" >&2 || true
  exit 1
fi
