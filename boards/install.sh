#!/usr/bin/env bash
# Install rksmolvlm's server on a Rockchip board as a systemd service. Idempotent: run it again to
# upgrade; an existing config is kept (only the lines you ask to change are edited).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: sudo boards/install.sh [options]

Installs rksmolvlm (board + serve extras) into a venv, creates the system user 'rksmolvlm',
/etc/rksmolvlm/config.toml (from boards/config.example.toml, kept if it exists), the systemd unit
rksmolvlm.service, then enables and (re)starts it.

Options:
  --bundle DIR      the bundle to serve (written into the config; keep it outside /home and /root,
                    e.g. /var/lib/rksmolvlm/bundle: the service cannot read home directories)
  --prefix DIR      where the venv goes (default /opt/rksmolvlm; the venv is DIR/venv)
  --config-dir DIR  where config.toml and api_key live (default /etc/rksmolvlm)
  --source SPEC     what pip installs (default: the checkout this script is in, else 'rksmolvlm'
                    from the package index); the extras [board,serve] are added
  --python PY       Python 3.11 or newer for the venv (default: python3.11, else python3)
  --user NAME       service user and group (default rksmolvlm)
  --api-key         require an API key: create DIR/api_key (if absent) and point the config at it
  --no-start        install and enable, but do not (re)start the service
  --dry-run         print every action without doing anything
  -h, --help        show this help

After installing: systemctl status rksmolvlm; journalctl -u rksmolvlm -f;
curl http://127.0.0.1:8080/health
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=/opt/rksmolvlm
config_dir=/etc/rksmolvlm
unit_dir=/etc/systemd/system
service_user=rksmolvlm
state_dir=/var/lib/rksmolvlm
bundle=""
source_spec=""
python=""
api_key=0
start=1
dry_run=0

die() { echo "install.sh: error: $*" >&2; exit 1; }
note() { echo "install.sh: $*"; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "install.sh: $1 needs a value (see --help)" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) need_value "$@"; bundle="$2"; shift 2 ;;
    --prefix) need_value "$@"; prefix="$2"; shift 2 ;;
    --config-dir) need_value "$@"; config_dir="$2"; shift 2 ;;
    --source) need_value "$@"; source_spec="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --user) need_value "$@"; service_user="$2"; shift 2 ;;
    --api-key) api_key=1; shift ;;
    --no-start) start=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# Every change goes through run: printed, and done unless --dry-run.
run() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

venv="$prefix/venv"
config="$config_dir/config.toml"
key_file="$config_dir/api_key"
unit="$unit_dir/rksmolvlm.service"
[[ $dry_run -eq 1 ]] && note "dry run: printing the actions, changing nothing"

# -- preflight -----------------------------------------------------------------------------------
if [[ $dry_run -eq 0 && $(id -u) -ne 0 ]]; then
  die "run as root (sudo $0 $*), or add --dry-run to see what it would do"
fi
if [[ -z "$python" ]]; then
  python="$(command -v python3.11 || command -v python3 || true)"
fi
if [[ -z "$python" ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  msg="Python 3.11 or newer is needed for the venv: install python3.11 and python3.11-venv, or pass --python"
  if [[ $dry_run -eq 1 ]]; then note "warning: $msg"; python="${python:-python3.11}"; else die "$msg"; fi
fi
if ! command -v systemctl >/dev/null; then
  if [[ $dry_run -eq 1 ]]; then note "warning: systemctl not found: this system does not run systemd"
  else die "systemctl not found: the service needs systemd"; fi
fi
if [[ -z "$source_spec" ]]; then
  if [[ -f "$here/../pyproject.toml" ]]; then source_spec="$(cd "$here/.." && pwd)"; else source_spec=rksmolvlm; fi
fi
for path in "$prefix" "$config_dir" "$bundle"; do
  [[ "$path" =~ [[:space:]\|] ]] && die "paths may not contain spaces or '|' (got '$path')"
done
if [[ -n "$bundle" ]]; then
  case "$bundle" in /*) ;; *) die "--bundle needs an absolute path (got '$bundle')" ;; esac
  case "$bundle" in
    /home/*|/root/*|/run/user/*)
      die "the service cannot read $bundle (ProtectHome=yes): copy the bundle to $state_dir/bundle and pass that" ;;
  esac
fi

# -- user and groups -----------------------------------------------------------------------------
for group in render video; do  # the NPU device nodes' groups (SupplementaryGroups in the unit)
  if getent group "$group" >/dev/null; then note "group $group exists"; else run groupadd --system "$group"; fi
done
if getent passwd "$service_user" >/dev/null; then
  note "user $service_user exists"
else
  run useradd --system --user-group --home-dir "$state_dir" --no-create-home --shell /usr/sbin/nologin \
    --comment "rksmolvlm server" "$service_user"
fi
run usermod --append --groups render,video "$service_user"

# -- venv ----------------------------------------------------------------------------------------
if [[ -x "$venv/bin/python" ]]; then note "venv $venv exists"; else run "$python" -m venv "$venv"; fi
run "$venv/bin/pip" install --upgrade "$source_spec[board,serve]"

# -- config --------------------------------------------------------------------------------------
run install -d -m 0750 -o root -g "$service_user" "$config_dir"
fresh=0
if [[ -f "$config" ]]; then
  note "keeping the existing $config"
else
  run install -m 0640 -o root -g "$service_user" "$here/config.example.toml" "$config"
  fresh=1
fi
set_key() {  # set_key KEY VALUE: replace the (possibly commented) 'KEY = ...' line of the config
  local key="$1" value="$2"
  if [[ -f "$config" ]]; then
    if grep -qxF "$key = $value" "$config"; then note "$config already has $key = $value"; return; fi
    grep -Eq "^#? ?$key = " "$config" || die "$config has no '$key = ' line: add $key = $value to it yourself"
  fi
  run sed -i -E "s|^#? ?$key = .*|$key = $value|" "$config"
}
if [[ -n "$bundle" ]]; then set_key bundle "\"$bundle\""; fi
if [[ $api_key -eq 1 ]]; then
  if [[ -f "$key_file" ]]; then
    note "keeping the existing API key in $key_file"
  else
    echo "+ write a random key to $key_file (mode 640, group $service_user)"
    if [[ $dry_run -eq 0 ]]; then
      (umask 027 && "$python" -c 'import secrets; print(secrets.token_hex(32))' > "$key_file")
      chgrp "$service_user" "$key_file"
    fi
  fi
  set_key api_key_file "\"$key_file\""
fi

# -- unit ----------------------------------------------------------------------------------------
rendered="$(sed -e "s|/opt/rksmolvlm|$prefix|g" -e "s|/etc/rksmolvlm/config.toml|$config|g" \
                -e "s|^User=rksmolvlm|User=$service_user|" -e "s|^Group=rksmolvlm|Group=$service_user|" \
                "$here/systemd/rksmolvlm.service")"
if [[ -f "$unit" ]] && [[ "$(cat "$unit")" == "$rendered" ]]; then
  note "$unit is up to date"
else
  if [[ $dry_run -eq 1 ]]; then
    echo "+ install -m 0644 <boards/systemd/rksmolvlm.service for $prefix and $config> $unit"
  else
    tmp_unit="$(mktemp)"
    trap 'rm -f "$tmp_unit"' EXIT
    printf '%s\n' "$rendered" > "$tmp_unit"
    run install -m 0644 "$tmp_unit" "$unit"
  fi
  run systemctl daemon-reload
fi
run systemctl enable rksmolvlm.service

# -- check and start -----------------------------------------------------------------------------
configured_bundle="$bundle"
if [[ -z "$configured_bundle" && -f "$config" ]]; then
  configured_bundle="$(sed -n -E 's/^bundle = "(.*)"$/\1/p' "$config" | head -n 1)"
fi
configured_bundle="${configured_bundle:-$state_dir/bundle}"
if [[ ! -f "$configured_bundle/manifest.json" ]]; then
  note "no bundle at $configured_bundle yet: copy it there (owned by root, readable by $service_user), then"
  note "  systemctl restart rksmolvlm"
  start=0
else
  run runuser -u "$service_user" -- "$venv/bin/rksmolvlm" serve --check --config "$config"
fi
if [[ $start -eq 1 ]]; then
  run systemctl restart rksmolvlm.service
  note "started: systemctl status rksmolvlm; journalctl -u rksmolvlm -f; curl http://127.0.0.1:8080/health"
else
  note "not started (systemctl start rksmolvlm when ready)"
fi
