#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo: build the tiny SmolVLM trained on the shipped images
# (offline), convert it, and ask the bundle the same question about two images.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/rksmolvlm demo "$@"
