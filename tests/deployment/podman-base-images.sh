#!/usr/bin/env bash
# Makes the local base images the container test (tests/deployment/container.rs) builds
# deploy/Dockerfile with, because no registry can be pulled from here: a Debian 12 builder
# with the machine's own Rust toolchain, and the crates of Cargo.lock vendored beside it
# (so the build runs offline).
# Everything is cached under CACHE (default $ECHOD_TEST_CACHE/podman, ECHOD_TEST_CACHE
# defaulting to /var/cache/echod-tests), keyed by its inputs, so only the first run pays
# (debootstrap and import ≈ 2 min).
#
# Usage: base-images.sh [CACHE]   — prints the builder image and the vendor directory,
# one a line: podman build --build-arg BUILDER_IMAGE=IMAGE --volume VENDOR:/opt/echod-vendor:ro
set -euo pipefail
cache=${1:-${ECHOD_TEST_CACHE:-/var/cache/echod-tests}/podman}
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# Podman's own configuration: runc (crun fails on hybrid cgroups), rlimits the sandbox
# allows, overlay storage kept between runs (run state on tmpfs, so a reboot clears it).
cat >"$cache/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=8192:8192"]
[engine]
runtime = "runc"
CONF
cat >"$cache/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "/run/echod-tests/podman-$(echo "$cache" | sha256sum | cut -c1-8)"
CONF
export CONTAINERS_CONF="$cache/containers.conf" CONTAINERS_STORAGE_CONF="$cache/storage.conf"

# 1. A minimal Debian with a C toolchain (the linker and a static glibc; make builds jemalloc).
packages="gcc,libc6-dev,make"
rootfs="$cache/rootfs-builder-$(echo "bookworm $packages" | sha256sum | cut -c1-12)"
if [ ! -e "$rootfs/.complete" ]; then
    rm -rf "$rootfs" "$rootfs.tmp"
    # The Debian mirror apt already uses (only package registries are reachable).
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian' | head -n1 || true)
    debootstrap --variant=minbase --include="$packages" bookworm "$rootfs.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs.tmp/var/cache/apt/archives/"*.deb "$rootfs.tmp/var/lib/apt/lists/"*
    mv "$rootfs.tmp" "$rootfs"
    touch "$rootfs/.complete"
fi

# 2. The builder image: that rootfs + the machine's Rust toolchain, with cargo pointed at
#    vendored crates in /opt/echod-vendor (mounted at build time: podman build --volume).
sysroot=$(rustc --print sysroot)
rust_version=$(rustc --version | cut -d' ' -f2)
image="localhost/echod-test-builder:rust-$rust_version-$(basename "$rootfs" | cut -d- -f3)"
if ! podman image exists "$image"; then
    ctx=$(mktemp -d "$cache/builder-ctx.XXXXXX")
    trap 'rm -rf "$ctx"' EXIT
    cp -a "$rootfs" "$ctx/root"
    # rustc, cargo and the host's std only (laid out as rustc expects its sysroot):
    # no docs, sources or extra tools.
    mkdir -p "$ctx/root/usr/local/rust/bin" "$ctx/root/usr/local/rust/lib/rustlib" \
        "$ctx/root/usr/local/cargo" "$ctx/root/opt/echod-vendor"
    cp -a "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$ctx/root/usr/local/rust/bin/"
    cp -a "$sysroot/lib/"lib* "$ctx/root/usr/local/rust/lib/"
    cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$ctx/root/usr/local/rust/lib/rustlib/"
    # Source replacement lives in CARGO_HOME's config, which the Dockerfile's cache
    # mount on $CARGO_HOME/registry does not hide.
    cat >"$ctx/root/usr/local/cargo/config.toml" <<CONF
[source.crates-io]
replace-with = "vendored"
[source.vendored]
directory = "/opt/echod-vendor"
[net]
offline = true
CONF
    tar -C "$ctx/root" -c . | podman import --quiet \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
    # Builders for other toolchains are dead weight now.
    podman images --format '{{.Repository}}:{{.Tag}}' localhost/echod-test-builder \
        | grep -vxF "$image" | xargs -r podman rmi >/dev/null 2>&1 || true
fi

# 3. The crates of Cargo.lock, vendored (keyed by the lock file).
vendor="$cache/vendor-$(sha256sum "$repo/Cargo.lock" | cut -c1-12)"
if [ ! -e "$vendor/.complete" ]; then
    rm -rf "$vendor"
    # From the local crate cache when it has every crate of Cargo.lock (all platforms'),
    # else fetched once (CI reaches the crates registry; the build inside cannot).
    vendor() { (cd "$repo" && cargo vendor --quiet --locked --versioned-dirs "$@" "$vendor" >/dev/null); }
    vendor --offline 2>/dev/null || vendor
    find "$cache" -maxdepth 1 -name 'vendor-*' ! -path "$vendor" -exec rm -rf {} +
    touch "$vendor/.complete"
fi
echo "$image"
echo "$vendor"
