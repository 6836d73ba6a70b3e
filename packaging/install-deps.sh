#!/usr/bin/env bash
# Installs what building, running and testing deltadrive needs on Debian (run as root).
# Idempotent: safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  fuse3 libfuse3-dev clang libclang-dev pkg-config build-essential ca-certificates \
  rsync fio sqlite3 attr procps postgresql libglib2.0-bin python3 dosfstools fusefat >/dev/null
# (build-essential: also libFuzzer, which scripts/fuzz.sh builds for the fuzz targets on the
# stable toolchain, so neither nightly nor cargo-fuzz is needed;
# postgresql: tests/scaleout-env.sh runs a throwaway cluster from its binaries;
# libglib2.0-bin: gio, as file managers use it, in tests/sync.rs; dosfstools: mkfs.vfat for
# the watched folder on a vfat image in tests/watch.rs; fusefat: mounts that image where the
# kernel has no vfat driver, through FUSE.)
# The POSIX suite switches to these users and groups.
getent group tests >/dev/null || groupadd tests
id -u tests >/dev/null 2>&1 || useradd -g tests -M -s /usr/sbin/nologin tests
# Let mounts of non-root users be shared with other users if asked (allow_other).
grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null || echo 'user_allow_other' >> /etc/fuse.conf
# A real S3 server for the scale-out backend's tests (tests/scaleout-env.sh).
if ! command -v s3s-fs >/dev/null 2>&1 || ! s3s-fs --version 2>/dev/null | grep -q '0.14.1'; then
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi
if ! command -v pjdfstest >/dev/null 2>&1 || ! pjdfstest --version 2>/dev/null | grep -q '0.2.2'; then
  cargo install pjdfstest --version 0.2.2 --locked --quiet
fi
# Packaging: systemd-analyze (unit checks), dpkg-dev (dpkg-shlibdeps for cargo-deb's
# Depends), binutils (strip and objcopy, which split the debug information into the
# -dbgsym package; readelf), man-db (man pages and systemd-analyze's Documentation= check),
# the shellcheck linter, util-linux (mount, setpriv), debootstrap, systemd-container
# (systemd-nspawn) and zstd (the clean Debian root of packaging/test-clean-root.sh), and
# cargo-deb, which builds the .deb.
apt-get install -y -qq --no-install-recommends \
  systemd dpkg-dev binutils man-db shellcheck util-linux mount xz-utils \
  debootstrap systemd-container zstd >/dev/null
# The web side's browser tests (tests/web.rs): Debian's Chromium, driven headless through
# chromedriver; nothing is downloaded at test time.
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
# Users may open /dev/fuse (udev does this on a booted Debian; containers and VMs without
# udev leave it root-only), so the mount helper can run a user's daemon as that user.
if [ -c /dev/fuse ]; then chmod 0666 /dev/fuse; fi
