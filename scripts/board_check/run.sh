#!/usr/bin/env bash
# The board check: the test slice that needs no torch, transformers, onnxruntime or rknn-toolkit2, run
# on arm64 Debian rootfs under qemu-user (binfmt_misc), with the project installed as a board user
# installs it. Usage: sudo scripts/board_check/run.sh [SUITE...]   (default: bookworm trixie)
#   RKSMOLVLM_BOARD_CACHE   where packed rootfs are kept (default /var/cache/rksmolvlm-board)
#   RKSMOLVLM_BOARD_MIRROR  the Debian mirror for debootstrap (default: debootstrap's own)
#   QEMU_CPU                the emulated CPU (default cortex-a76, RK3588's big core: no SVE to emulate)
# Exits 0 with a loud SKIPPED banner only when this machine cannot emulate arm64 (no root, no
# binfmt_misc, no debootstrap/qemu and no apt-get to install them); test failures exit 1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${RKSMOLVLM_BOARD_CACHE:-/var/cache/rksmolvlm-board}"
suites=("$@")
[[ ${#suites[@]} -gt 0 ]] || suites=(bookworm trixie)

say() { echo "board-check: $*"; }
skip() {
  echo "################################################################################" >&2
  echo "# BOARD CHECK SKIPPED: $*" >&2
  echo "# The arm64 slice did NOT run on this machine." >&2
  echo "################################################################################" >&2
  exit 0
}

check_machine() {
  [[ "$(id -u)" -eq 0 ]] || skip "not root (debootstrap, chroot and binfmt_misc need root)"
  [[ "$(uname -m)" == x86_64 || "$(uname -m)" == aarch64 ]] || skip "unsupported host $(uname -m)"
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ "$(uname -m)" == aarch64 ]] || command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v zstd >/dev/null || missing+=(zstd)
  command -v unshare >/dev/null || missing+=(util-linux)
  if [[ ${#missing[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || skip "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) ||
      skip "could not install ${missing[*]} with apt-get"
  fi
  [[ "$(uname -m)" == aarch64 ]] && return 0
  if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || skip "cannot mount binfmt_misc"
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || skip "binfmt_misc has no enabled qemu-aarch64 entry"
  # F: the kernel opens qemu at registration, so the rootfs needs no qemu copy inside
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || skip "the qemu-aarch64 binfmt entry lacks the F flag"
}

copy_source() {  # copy_source DEST: the checkout's tracked and untracked (not ignored) files
  mkdir -p "$1"
  if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$root" ls-files -z --cached --others --exclude-standard |
      (cd "$root" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$1" -xf -
  else
    tar -C "$root" --exclude=.venv --exclude=.git -cf - . | tar -C "$1" -xf -
  fi
}

remove_work() {  # the unpacked rootfs and the fixtures, only once nothing is mounted below them
  [[ -n "${work:-}" && -d "$work" ]] || return 0
  if grep -q " $work/" /proc/mounts; then
    echo "board-check: something is still mounted under $work: not removing it (umount -R it, then rm -r)" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}

run_slice() {  # run_slice SUITE TARBALL: unpack, install the checkout as it is now, run the slice
  local suite="$1" tarball="$2" rootfs="$work/$1" started=$SECONDS code
  mkdir -p "$rootfs"
  zstd -dc -q "$tarball" | tar -C "$rootfs" --numeric-owner -xf -
  local unpacked=$((SECONDS - started))
  copy_source "$rootfs/src"
  # a copy, not a bind: tests hard-link bundle files into their tmp folders, which needs one filesystem
  cp -a "$work/fixtures" "$rootfs/fixtures"
  started=$SECONDS
  # The rootfs keeps the dependencies; the project itself is reinstalled from this checkout (non-editable).
  # /proc/cpuinfo is RK3588's: qemu-user shows the host's x86 one, on which onnxruntime's CPU probe crashes.
  # PYTHONSAFEPATH: `python -m rksmolvlm` run from /src must import the installed package, not the checkout's.
  # shellcheck disable=SC2016
  unshare -m --propagation private "$here/enter.sh" "$rootfs" --bind "$here/rk3588-cpuinfo:/proc/cpuinfo" -- \
    /usr/bin/env RKSMOLVLM_TEST_FIXTURES=/fixtures RKSMOLVLM_BOARD_SLICE=1 RKSMOLVLM_BOARD_EMULATED=1 PYTHONSAFEPATH=1 \
    /bin/sh -c '
      cd /src && pip install -q --no-deps --no-build-isolation --force-reinstall . > /tmp/reinstall.log 2>&1 ||
        { cat /tmp/reinstall.log; exit 3; }
      echo "board-check: $(python3 --version) $(uname -m), QEMU_CPU=$QEMU_CPU"
      echo "board-check: doctor on an RK3588 device tree with nothing from Rockchip installed (--root):"
      board=/tmp/rk3588 && mkdir -p $board/proc/device-tree && cp /proc/meminfo /proc/cpuinfo $board/proc/
      printf "radxa,rock-5b\0rockchip,rk3588\0" > $board/proc/device-tree/compatible
      (cd / && rksmolvlm doctor --root $board /fixtures/preview-bundles/idefics3-256m) | sed "s/^/  doctor: /"
      exec pytest -q -p no:cacheprovider -rfE --junitxml=/tmp/board-slice.xml tests
    ' && code=0 || code=$?
  local took=$((SECONDS - started))
  local counts
  counts="$(python3 "$here/counts.py" "$rootfs/tmp/board-slice.xml" 2>/dev/null || echo "no results")"
  cp "$rootfs/tmp/board-slice.xml" "$cache/last-$suite.xml" 2>/dev/null || true  # kept for a look afterwards
  echo "$suite: $counts; unpack ${unpacked} s, slice ${took} s (exit $code)" > "$work/$suite.summary"
  return "$code"
}

check_machine
mkdir -p "$cache"
work="$(mktemp -d "${TMPDIR:-/tmp}/rksmolvlm-board.XXXXXX")"
trap remove_work EXIT
# the slices running side by side stop too, with everything they started (their mounts die with their namespaces)
kill_tree() { local pid; for pid in "$@"; do kill_tree $(ps -o pid= --ppid "$pid" 2>/dev/null); kill "$pid" 2>/dev/null; done; }
trap 'kill_tree $(jobs -p); wait; exit 130' INT
trap 'kill_tree $(jobs -p); wait; exit 143' TERM
key="$(cat "$root/pyproject.toml" "$here/build.sh" | sha256sum | cut -c1-16)"
status=0
built=() builds=() summary=()
for suite in "${suites[@]}"; do
  tarball="$cache/$suite-arm64-$key.tar.zst"
  if [[ ! -f "$tarball" ]]; then
    started=$SECONDS
    copy_source "$work/source-$suite"
    "$here/build.sh" "$suite" "$work/source-$suite" "$tarball" || { say "$suite: building the rootfs failed"; status=1; continue; }
    builds+=("$suite: cold build $((SECONDS - started)) s, $(du -h "$tarball" | cut -f1) packed")
    rm -f $(ls "$cache/$suite-arm64-"*.tar.zst | grep -v -- "-$key.tar.zst") 2>/dev/null || true
  else
    say "$suite: cached rootfs $tarball"
  fi
  built+=("$suite:$tarball")
done

# the fixtures that need torch, built once on this host with the project's venv, mounted read-only inside
started=$SECONDS
python="${RKSMOLVLM_VENV:-$root/.venv}/bin/python"
[[ -x "$python" ]] || bash "$root/scripts/setup.sh"
"$python" "$root/scripts/board_check/fixtures.py" "$work/fixtures" || { say "building the fixtures failed"; exit 1; }
say "fixtures built on the host in $((SECONDS - started)) s"

# Each slice runs one pytest under qemu (one core): with two or more cores the suites run side by side,
# their output kept and printed one suite after the other.
started=$SECONDS
if [[ ${#built[@]} -gt 1 && $(nproc) -gt 1 ]]; then
  pids=()
  for entry in "${built[@]}"; do
    run_slice "${entry%%:*}" "${entry#*:}" > "$work/${entry%%:*}.out" 2>&1 &
    pids+=($!)
  done
  say "running the ${#built[@]} slices side by side: ${built[*]%%:*}"
  for i in "${!pids[@]}"; do
    wait "${pids[i]}" || status=1
    entry="${built[i]}"
    echo "===== ${entry%%:*} ====="
    cat "$work/${entry%%:*}.out"
  done
else
  for entry in ${built[@]+"${built[@]}"}; do
    run_slice "${entry%%:*}" "${entry#*:}" || status=1
  done
fi
for suite in ${built[@]+"${built[@]%%:*}"}; do
  [[ -f "$work/$suite.summary" ]] && summary+=("$(cat "$work/$suite.summary")")
done
summary+=("slices took $((SECONDS - started)) s in all")
for line in "${builds[@]}" "${summary[@]}"; do say "$line"; done
[[ $status -eq 0 ]] || say "FAILED: see the failures above"
exit $status
