#!/usr/bin/env bash
# Usage: scripts/pyvenv.sh NAME PIN... — prints the path of a Python virtual environment's interpreter, with exactly
# the pinned packages PIN... installed from the package index. The environment lives in ${XDG_CACHE_HOME:-~/.cache}/NAME
# and is rebuilt when the pins change. Needs CPython >= 3.12: the first one found on PATH or under pyenv.
set -euo pipefail

name="$1"
shift
venv="${XDG_CACHE_HOME:-$HOME/.cache}/$name"

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

stamp="$*"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$stamp" ]; then
  py="$(find_python)" || { echo "scripts/pyvenv.sh: needs CPython >= 3.12" >&2; exit 1; }
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2
  echo "$stamp" >"$venv/.pins"
fi
echo "$venv/bin/python"
