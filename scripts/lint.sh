#!/usr/bin/env bash
# The lint and type gate (CI runs it after the tests): ruff over the checkout, mypy over the board
# package (scripts/typecheck.py). Both always run; exits non-zero when either finds anything.
# Needs the dev extra in .venv (scripts/setup.sh installs it).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-.venv/bin/python}"
status=0
echo "== ruff check"
"$python" -m ruff check --no-fix --output-format concise . || status=1
echo "== mypy (board package)"
"$python" scripts/typecheck.py || status=1
if [ "$status" -ne 0 ]; then
  echo "lint: findings above (ruff rules and mypy settings: pyproject.toml [tool.ruff], [tool.mypy])" >&2
fi
exit "$status"
