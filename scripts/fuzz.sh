#!/usr/bin/env bash
# Builds and runs one cargo-fuzz target of fuzz/ on the stable toolchain, without cargo-fuzz:
# the same instrumentation flags cargo-fuzz passes (SanitizerCoverage for libFuzzer, no
# sanitizer), set by hand. Usage:
#   scripts/fuzz.sh TARGET [libFuzzer options...]
# e.g. scripts/fuzz.sh append -max_total_time=60 -rss_limit_mb=512
# FUZZ_BUILD_ONLY=1 only builds. The corpus is fuzz/corpus/TARGET, crashes go to fuzz/artifacts/TARGET/. Needs a C++ compiler
# (libfuzzer-sys builds libFuzzer).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target=${1:?usage: scripts/fuzz.sh TARGET [libFuzzer options...]}
shift
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# As cargo-fuzz: coverage counters, comparison tracing, the `fuzzing` cfg, debug assertions.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros.
cargo build --release --locked --bin "$target" --target "$triple"
[ -z "${FUZZ_BUILD_ONLY:-}" ] || exit 0
mkdir -p "corpus/$target" "artifacts/$target"
exec "$CARGO_TARGET_DIR/$triple/release/$target" -artifact_prefix="artifacts/$target/" \
  "$@" "corpus/$target"
