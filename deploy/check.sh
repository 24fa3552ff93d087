#!/usr/bin/env bash
# Deployment checks (CI): lints and renders the Helm chart with the real Helm library (helm-sdkpy), validates the
# values against values.schema.json and the rendered worker config against the worker's config structs, and checks
# that the Dockerfiles and compose file match the workspace. Quiet on success; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_SDKPY_VERSION=0.1.32
PINS=("helm-sdkpy==${HELM_SDKPY_VERSION}" "jsonschema==4.26.0" "PyYAML==6.0.4")

PY="$(scripts/pyvenv.sh mip-ci-venv "${PINS[@]}")"
VENV="$(dirname "$(dirname "$PY")")"

# Helm keeps its caches and config here, away from the user's.
export HELM_CACHE_HOME="$VENV/helm/cache" HELM_CONFIG_HOME="$VENV/helm/config" HELM_DATA_HOME="$VENV/helm/data"
exec "$VENV/bin/python" deploy/check_deploy.py "$@"
