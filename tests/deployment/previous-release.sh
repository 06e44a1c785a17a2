#!/usr/bin/env bash
# Builds the previous release of echod (the commit in previous-release.commit, beside this
# script) from this repository's history into TARGET/compat-<commit>/, once, and prints
# the binary's path. Run by .ci/setup.d/previous-release.sh before the tests (so CI pays
# for the build outside the timed tests) and by tests/deployment/upgrade_compat.rs (which
# then finds it built). A debug build without debug info: the release profile's LTO took
# over 10 minutes on 2 cores; both callers must build with the same settings, or cargo
# rebuilds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="$(mkdir -p "${1:?usage: previous-release.sh TARGET_DIR}" && cd "$1" && pwd)"
commit="$(tr -d '[:space:]' < "$here/previous-release.commit")"
dir="$target/compat-${commit:0:12}"
if [ ! -e "$dir/src/Cargo.lock" ]; then
    rm -rf "$dir/src.tmp"
    mkdir -p "$dir/src.tmp"
    git -C "$repo" archive --format=tar "$commit" | tar -x -C "$dir/src.tmp"
    mv "$dir/src.tmp" "$dir/src"
fi
cd "$dir/src"
env -u CARGO_TARGET_DIR CARGO_PROFILE_DEV_DEBUG=0 ECHOD_REVISION="${commit:0:12}" \
    cargo build --locked --quiet --bin echod --target-dir "$dir/target" </dev/null >&2
echo "$dir/target/debug/echod"
