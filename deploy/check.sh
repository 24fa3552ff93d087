#!/usr/bin/env bash
# Deployment checks (CI): lints and renders the Helm chart with the real Helm library (helm-sdkpy), validates the
# values against values.schema.json and the rendered worker config against the worker's config structs, and checks
# that the Dockerfiles and compose file match the workspace. Quiet on success; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_SDKPY_VERSION=0.1.32
PINS=("helm-sdkpy==${HELM_SDKPY_VERSION}" "jsonschema==4.26.0" "PyYAML==6.0.4")
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/mip-ci-venv"

# helm-sdkpy needs CPython >= 3.12: the first one found on PATH or under pyenv.
find_python() {
  local c
  for c in python3.14 python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
    if [ -x "$c/bin/python3" ]; then echo "$c/bin/python3"; return 0; fi
  done
  return 1
}

stamp="${PINS[*]}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$stamp" ]; then
  py="$(find_python)" || { echo "deploy/check.sh: needs CPython >= 3.12 (helm-sdkpy)" >&2; exit 1; }
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
  echo "$stamp" >"$VENV/.pins"
fi

# Helm keeps its caches and config here, away from the user's.
export HELM_CACHE_HOME="$VENV/helm/cache" HELM_CONFIG_HOME="$VENV/helm/config" HELM_DATA_HOME="$VENV/helm/data"
exec "$VENV/bin/python" deploy/check_deploy.py "$@"
