#!/usr/bin/env bash
# Builds the Debian package of deltadrive with cargo-deb (cargo install cargo-deb --locked).
#
#   packaging/build-deb.sh                 # release build, then the .deb (what users get)
#   packaging/build-deb.sh --dev           # dev-profile build, then the .deb (for tests)
#   packaging/build-deb.sh --no-build      # package the binary already built (with --dev: the dev one)
#   packaging/build-deb.sh --bin PATH      # package this binary (tests/packaging.rs)
#   packaging/build-deb.sh -o DIR          # where the .deb goes [default: TARGET/debian]
#
# Before packaging it writes the generated assets beside the binary (deb-assets/: man pages
# from `deltadrive man`, shell completions from `deltadrive completions`), so they always
# describe the binary that is packaged. cargo-deb strips the binary in the .deb and puts its
# debug information into a second package, deltadrive-dbgsym_VERSION_ARCH.ddeb (`dbgsym` in
# Cargo.toml). Prints the path of the .ddeb, then that of the .deb on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
bin=
out=
while [ $# -gt 0 ]; do
  case $1 in
    --dev) profile=dev ;;
    --release) profile=release ;;
    --no-build) build=0 ;;
    --bin) bin=$2; build=0; shift ;;
    -o) out=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

command -v cargo-deb >/dev/null || {
  echo "build-deb.sh: cargo-deb is missing (bash packaging/install-deps.sh, or cargo install cargo-deb --locked)" >&2
  exit 1
}

target=${CARGO_TARGET_DIR:-}
if [ -z "$target" ]; then
  target=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
fi
case $profile in
  dev) dir=debug; profile_flag=(--profile dev) ;;
  release) dir=release; profile_flag=(--release) ;;
esac
if [ "$build" -eq 1 ]; then
  cargo build --locked "${profile_flag[@]}" --bin deltadrive
fi
bin=${bin:-$target/$dir/deltadrive}
[ -x "$bin" ] || { echo "build-deb.sh: no binary at $bin (build it first, or drop --no-build)" >&2; exit 1; }

# cargo-deb reads the binary and the generated assets from TARGET/release (Cargo.toml's
# "target/release/..." assets). Any other binary (dev profile, --bin; cargo-deb refuses dev
# profiles) is staged as a release tree of its own, so no release build is needed and the
# real release tree is left alone.
stage=$target
if [ "$profile" = dev ] || [ "$bin" != "$target/release/deltadrive" ]; then
  stage=$(mktemp -d "${TMPDIR:-/tmp}/deltadrive-deb.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/release"
  cp "$bin" "$stage/release/deltadrive"
fi
assets=$stage/release/deb-assets
rm -rf "$assets"
mkdir -p "$assets/completions"
"$bin" man "$assets/man1"
gzip -9n "$assets"/man1/*.1
"$bin" completions bash >"$assets/completions/deltadrive"
"$bin" completions zsh >"$assets/completions/_deltadrive"
"$bin" completions fish >"$assets/completions/deltadrive.fish"

out=${out:-$target/debian}
mkdir -p "$out"
extra=()
# A package of a dev binary is for tests: compress fast.
[ "$stage" = "$target" ] || extra+=(--fast)
# cargo-deb prints the path of each package it wrote on stdout, the .deb last.
CARGO_TARGET_DIR=$stage cargo deb --no-build -o "$out" "${extra[@]}"
