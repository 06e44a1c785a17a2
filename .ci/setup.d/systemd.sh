#!/usr/bin/env bash
# Tools for the systemd and packaging tests (tests/deployment/), cached outside the
# repository: cargo-deb (in ~/.cargo/bin, pinned so its behaviour cannot change under the
# tests) and the debootstrap root filesystem systemd boots from (under
# /var/cache/echod-tests/).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

bash tests/deployment/systemd-rootfs.sh
