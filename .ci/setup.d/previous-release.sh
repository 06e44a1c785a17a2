#!/usr/bin/env bash
# The previous release of echod, built from the repository's history for the
# compatibility test (tests/deployment/upgrade_compat.rs), before the tests run: the
# build takes minutes on 2 cores and would otherwise compete with timed tests. A shallow
# clone lacks the commit; the test then shows as ignored, and this says why.
set -euo pipefail
cd "$(dirname "$0")/../.."
commit="$(tr -d '[:space:]' < tests/deployment/previous-release.commit)"
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "WARNING: commit $commit is not in this clone's history (shallow?);" \
        "upgrade_compat will be ignored" >&2
    exit 0
fi
time bash tests/deployment/previous-release.sh target
