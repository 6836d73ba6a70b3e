#!/usr/bin/env bash
# The project's whole test run: formatting, lints, unit and integration tests (real FUSE
# mounts, real RocksDB), the API suite, backend conformance suite and replica test again on the
# scale-out backend (real PostgreSQL + S3 server, tests/scaleout-env.sh), the web side (also in
# headless Chromium), and the POSIX suite
# against a mount. Needs root and the packages from packaging/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked -- --test-threads 2
echo "== scale-out backend (PostgreSQL + S3): conformance, API suite, limits, replicas, web"
bash tests/scaleout-env.sh env DELTADRIVE_TEST_BACKEND=postgres_s3 \
  cargo test --locked --lib server::backend::postgres_s3 -- --test-threads 2
bash tests/scaleout-env.sh env DELTADRIVE_TEST_BACKEND=postgres_s3 \
  cargo test --locked --test api --test limits --test replicas --test security --test web \
  -- --test-threads 2
echo "== fuzz, short run (decoder, then the append path; stable toolchain, scripts/fuzz.sh)"
fuzz_dir="$CARGO_TARGET_DIR/fuzz"
for t in decode_changelog append; do
  FUZZ_TARGET_DIR="$fuzz_dir" FUZZ_BUILD_ONLY=1 bash scripts/fuzz.sh "$t"
done
# A crash, a leak of the 512 MiB limit or a slow unit fails the run, with the fuzzer's report.
fuzz_short() {
  local log
  log=$(mktemp /tmp/deltadrive-fuzz.XXXXXX)
  if FUZZ_TARGET_DIR="$fuzz_dir" bash scripts/fuzz.sh "$1" -max_total_time="$2" \
    -rss_limit_mb=512 -timeout=60 >"$log" 2>&1; then
    tail -n 2 "$log"
  else
    tail -n 60 "$log"
    echo "fuzz target $1 failed (fuzz/artifacts/$1/)"
    return 1
  fi
}
fuzz_short decode_changelog 20
fuzz_short append 40
echo "== benchmark harness, quick mode (proves it still runs; asserts no speed)"
bench_out=$(mktemp -d /tmp/deltadrive-bench.XXXXXX)
python3 bench/run --quick --bin "$CARGO_TARGET_DIR/debug/deltadrive" --out "$bench_out"
# Last, so the run closes on the suite's plain tally line.
echo "== pjdfstest against a mount"
bash tests/pjdfstest.sh
