#!/usr/bin/env bash
# Prints the path of a Debian 12 root filesystem that boots systemd in systemd-nspawn,
# building it once with debootstrap (≈45 s, ≈280 MB) when it is not cached yet.
# The cache lives outside the repository, keyed by the package list, so changing the
# list builds a fresh one. Used by .ci/setup.d/systemd.sh and by
# tests/deployment/systemd.rs.
set -euo pipefail

SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,iproute2,procps
CACHE=${ECHOD_TEST_CACHE:-/var/cache/echod-tests}

key=$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
rootfs="$CACHE/nspawn-rootfs-$key"
if [ -x "$rootfs/usr/lib/systemd/systemd" ]; then
    echo "$rootfs"
    exit 0
fi

# The Debian mirror this machine already uses (one-line or deb822 sources).
mirror=$(
    {
        grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }'
        grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{ print $2 }'
    } | grep -v -- '-security' | head -n1
)
if [ -z "$mirror" ]; then
    echo "rootfs.sh: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.nspawn-rootfs.lock"
flock 9
if [ ! -x "$rootfs/usr/lib/systemd/systemd" ]; then
    tmp="$rootfs.tmp.$$"
    rm -rf "$tmp"
    echo "rootfs.sh: building $rootfs from $mirror" >&2
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$mirror" >&2
    # The container only runs what the test installs: no getty, no journal on disk.
    rm -f "$tmp/etc/systemd/system/getty.target.wants/"*
    mv "$tmp" "$rootfs"
fi
echo "$rootfs"
