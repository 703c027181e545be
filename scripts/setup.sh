#!/usr/bin/env bash
# Create .venv at the repo root and install everything the host needs, offline-safe ordering:
# torch 2.13.0 CPU first (so no range pulls a CUDA build), rknn-toolkit2's real deps, then
# rknn-toolkit2 itself with --no-deps (it declares torch<=2.4.0), then this project.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RKSMOLVLM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

stamp="$venv/.rksmolvlm-setup"
want="$(cat "$root/scripts/setup.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "setup: rknn-toolkit2 2.5.0 ships wheels for CPython 3.11 only; set PYTHON=python3.11" >&2
  exit 2
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade 'pip>=24'
"${pip[@]}" install 'torch==2.13.0'
"${pip[@]}" install 'torch==2.13.0' 'numpy==1.26.4' 'setuptools>=77.0.3,<81' \
  'protobuf>=4.21.6,<=4.25.4' 'onnx>=1.16.1,<=1.18.0' 'onnxruntime>=1.17' 'opencv-python<4.12' \
  psutil ruamel.yaml scipy tqdm fast-histogram
"${pip[@]}" install --no-deps 'rknn-toolkit2==2.5.0'
"${pip[@]}" install 'torch==2.13.0' 'numpy==1.26.4' -e "$root[host,serve,dev]"
echo "$want" > "$stamp"
