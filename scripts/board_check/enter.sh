#!/usr/bin/env bash
# Run a command chrooted in an arm64 rootfs (qemu-user via binfmt_misc), with /proc, /sys, /dev, a
# tmpfs /dev/shm and the host's package-index configuration mounted; everything unmounted on exit.
# Usage: enter.sh ROOTFS [--bind HOSTDIR:DIR]... -- COMMAND...   (run it under `unshare -m`: run.sh does)
# The host's pip config files and every local path they name (pip_paths.py), its CA bundle, /etc/hosts
# and /etc/resolv.conf are bind-mounted read-only at the same paths; PIP_* and proxy variables are passed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rootfs="$(cd "$1" && pwd)"; shift
binds=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  [[ "$1" == "--bind" && $# -ge 2 ]] || { echo "enter.sh: expected --bind HOST:DIR or --, got '$1'" >&2; exit 2; }
  binds+=("$2"); shift 2
done
shift

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || echo "enter.sh: could not unmount ${mounted[i]}" >&2
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mnt() {  # mnt TARGET MOUNT-ARGS...: mount and remember it for cleanup
  local target="$1"; shift
  mount "$@" "$target"
  mounted+=("$target")
}
bind_ro() {  # bind_ro HOSTPATH TARGET: a read-only bind of a file or folder
  local source="$1" target="$2"
  if [[ -d "$source" ]]; then mkdir -p "$target"; else mkdir -p "$(dirname "$target")"; [[ -e "$target" ]] || : > "$target"; fi
  mnt "$target" --bind "$source"
  mount -o remount,bind,ro "$target"
}

mnt "$rootfs/proc" -t proc proc
mnt "$rootfs/sys" -t sysfs sysfs
mnt "$rootfs/dev" --bind /dev
mnt "$rootfs/dev/pts" -t devpts devpts
mnt "$rootfs/dev/shm" -t tmpfs -o mode=1777 tmpfs
for file in /etc/hosts /etc/resolv.conf; do
  [[ -e "$file" ]] && bind_ro "$(readlink -f "$file")" "$rootfs$file"
done
while IFS= read -r path; do
  [[ -n "$path" ]] && bind_ro "$path" "$rootfs$path"
done < <(python3 "$here/pip_paths.py")
for spec in ${binds[@]+"${binds[@]}"}; do
  bind_ro "${spec%%:*}" "$rootfs${spec#*:}"
done

# a clean environment: the host's pip and proxy settings, and qemu's CPU (cortex-a76: no SVE to emulate)
environment=(PATH=/opt/board-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
             LANG=C.UTF-8 TMPDIR=/tmp "QEMU_CPU=${QEMU_CPU:-cortex-a76}")
while IFS= read -r -d '' pair; do
  case "$pair" in
    PIP_*|[Hh][Tt][Tt][Pp]_[Pp][Rr][Oo][Xx][Yy]=*|[Hh][Tt][Tt][Pp][Ss]_[Pp][Rr][Oo][Xx][Yy]=*|[Nn][Oo]_[Pp][Rr][Oo][Xx][Yy]=*|CI=*|RKSMOLVLM_*)
      environment+=("$pair") ;;
  esac
done < <(env -0)
chroot "$rootfs" /usr/bin/env -i "${environment[@]}" "$@"
