#!/usr/bin/env bash
# Build the board check's arm64 rootfs for one Debian suite and pack it: debootstrap (minbase, the
# packages below), then the project installed into /opt/board-venv as README tells a board user
# (pip install '.[board,serve]', no torch, no transformers) plus the test tools that need no torch.
# Usage: build.sh SUITE SOURCE TARBALL   (SOURCE: a copy of the checkout; run.sh calls it when the cache misses)
# This file and pyproject.toml are the cache key: change either and the rootfs is built again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="$1" source="$2" tarball="$3"

# python3-venv/pip: the board user's venv; gcc + libc6-dev: the librkllmrt double is compiled inside;
# systemd: systemd-analyze verify of the unit; ca-certificates for pip over https
packages=python3,python3-venv,python3-pip,ca-certificates,gcc,libc6-dev,systemd
# the dev extra's test tools without the browser driver and the lint tools (those stay on the host); not
# board dependencies: num2words (the video prompt's number words are checked against it), onnxruntime (the
# backend of the rknn-toolkit-lite2 contract double), setuptools (run.sh reinstalls the checkout offline)
test_tools=("pytest>=8" "pytest-timeout>=2.3" "openai>=1.30" "ollama>=0.4" "httpx>=0.27" "jsonschema>=4.20"
            "num2words>=0.5" "onnxruntime>=1.17" "setuptools>=77.0.3,<81")

work="$(dirname "$tarball")/build-$suite.$$"
rootfs="$work/rootfs"
trap 'rm -rf --one-file-system "$work"' EXIT  # enter.sh's mounts die with its mount namespace first
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$rootfs"
echo "board-check: debootstrap $suite (arm64, minbase) into $rootfs"
debootstrap --arch=arm64 --variant=minbase --include="$packages" "$suite" "$rootfs" ${RKSMOLVLM_BOARD_MIRROR:-} \
  > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; echo "board-check: debootstrap failed" >&2; exit 1; }
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*

mkdir -p "$rootfs/src"
cp -a "$source/." "$rootfs/src/"
echo "board-check: pip install '.[board,serve]' and the test tools into /opt/board-venv"
unshare -m --propagation private "$here/enter.sh" "$rootfs" -- /bin/sh -ec "
  python3 -m venv /opt/board-venv
  cd /src
  pip install '.[board,serve]' $(printf "'%s' " "${test_tools[@]}") > /tmp/pip.log 2>&1 || { tail -40 /tmp/pip.log; exit 1; }
  pip list --format=freeze > /opt/board-venv/installed.txt
"
rm -rf "$rootfs/src" "$rootfs/root/.cache"
echo "board-check: packing $tarball"
tar -C "$rootfs" --numeric-owner -cf - . | zstd -q -T0 -3 -o "$tarball.part"
mv "$tarball.part" "$tarball"
