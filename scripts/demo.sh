#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo: build a tiny SmolVLM offline and convert it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/rksmolvlm demo "$@"
