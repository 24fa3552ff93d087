#!/usr/bin/env bash
# Deployment checks (CI): lints and renders the Helm chart with the real Helm library (helm-sdkpy), validates the
# values against values.schema.json and the rendered worker and coordinator configs against the JSON Schemas that
# `mip config schema worker|coordinator` generates from the config structs, checks the chart's and compose's flags
# against `mip serve worker|coordinator --help`, and checks that the Dockerfiles and compose file match the
# workspace. Quiet on success; run from anywhere.
# The `mip` binary: MIP_BIN when the caller sets it, else built here (`cargo build -p mip-cli`, debug, into
# CARGO_TARGET_DIR or target/).
set -euo pipefail
# A relative MIP_BIN is relative to the caller's folder, not the repository root.
if [[ -n "${MIP_BIN:-}" && "$MIP_BIN" == */* && "$MIP_BIN" != /* ]]; then
  MIP_BIN="$PWD/$MIP_BIN"
fi
cd "$(dirname "$0")/.."

HELM_SDKPY_VERSION=0.1.32
PINS=("helm-sdkpy==${HELM_SDKPY_VERSION}" "jsonschema==4.26.0" "PyYAML==6.0.4")

if [[ -z "${MIP_BIN:-}" ]]; then
  cargo build -q --locked -p mip-cli
  MIP_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/mip"
fi
export MIP_BIN

PY="$(scripts/pyvenv.sh mip-ci-venv "${PINS[@]}")"
VENV="$(dirname "$(dirname "$PY")")"

# Helm keeps its caches and config here, away from the user's.
export HELM_CACHE_HOME="$VENV/helm/cache" HELM_CONFIG_HOME="$VENV/helm/config" HELM_DATA_HOME="$VENV/helm/data"
exec "$VENV/bin/python" deploy/check_deploy.py "$@"
