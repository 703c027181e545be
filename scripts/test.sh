#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# --fast: the developer's lane, -m "not slow" (no checkpoint or bundle building, rknn-toolkit2, training,
# hostile-network timing or browser); CI runs everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not slow")
  else
    args+=("$arg")
  fi
done
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest ${args[@]+"${args[@]}"}
