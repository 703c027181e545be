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
  --bundle DIR      the bundle to serve (written into the config as it is; keep it outside /home and
                    /root, e.g. /var/lib/rksmolvlm/bundle: the service cannot read home directories)
  --prefix DIR      where the venv goes (default /opt/rksmolvlm; the venv is DIR/venv)
  --config-dir DIR  where config.toml and api_key live (default /etc/rksmolvlm)
                    (--prefix and --config-dir go into the systemd unit: letters, digits, . _ + - /)
  --unit-dir DIR    where rksmolvlm.service goes (default /etc/systemd/system)
  --source SPEC     what pip installs (default: the checkout this script is in, else 'rksmolvlm'
                    from the package index); the extras [board,serve] are added
  --python PY       Python 3.10 or newer for the venv (default: python3); rknn-toolkit-lite2 has
                    wheels for 3.10-3.12 only, so on Debian 13 (3.13) pass a 3.12 interpreter
  --user NAME       service user and group (default rksmolvlm; never root or another uid 0 user)
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
    --unit-dir) need_value "$@"; unit_dir="$2"; shift 2 ;;
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

# -- the values: checked before anything is done ------------------------------------------------
shown() { printf '%q' "$1"; }  # a value as the shell would quote it: newlines and quotes stay visible
# --prefix and --config-dir end up in the unit (ExecStart), where systemd reads %, \, quotes and spaces as syntax.
for option in --prefix --config-dir; do
  value="$prefix"; [[ $option == --config-dir ]] && value="$config_dir"
  [[ "$value" =~ ^/[A-Za-z0-9._+/-]*$ ]] || die "$option must be an absolute path made of letters, digits and" \
    ". _ + - / (it goes into the systemd unit): got $(shown "$value")"
done
# A . or .. component hides where a path leads (/var/lib/../../home/… is a home directory): refused, not resolved.
for option in --prefix --config-dir --bundle; do
  value="$prefix"; [[ $option == --config-dir ]] && value="$config_dir"; [[ $option == --bundle ]] && value="$bundle"
  case "$value/" in
    */./*|*/../*) die "$option may not contain . or .. components (got $(shown "$value")): give the path it" \
      "leads to, e.g. $(realpath -m -- "$value" 2>/dev/null || echo "$state_dir/bundle")" ;;
  esac
done
if [[ -n "$bundle" ]]; then  # only config.toml holds the bundle, TOML-quoted: other characters land as they are
  case "$bundle" in /*) ;; *) die "--bundle needs an absolute path (got $(shown "$bundle"))" ;; esac
  if [[ "$bundle" =~ [[:cntrl:]] ]]; then
    die "--bundle may not contain control characters such as a line break or a tab (got $(shown "$bundle"))"
  fi
  case "$bundle" in
    /home/*|/root/*|/run/user/*)
      die "the service cannot read $bundle (ProtectHome=yes): copy the bundle to $state_dir/bundle and pass that" ;;
  esac
fi
[[ "$service_user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
  die "--user must be a plain user name (lower-case letters, digits, _ and -, at most 32): got $(shown "$service_user")"
if [[ "$service_user" == root ]]; then
  die "--user root: the service must not run as root; leave --user out (a system user 'rksmolvlm' is created)"
fi
if entry="$(getent passwd "$service_user")" && [[ "$(cut -d: -f3 <<<"$entry")" == 0 ]]; then
  die "--user $service_user has uid 0, the powers of root: pick an unprivileged user (or leave --user out)"
fi
if entry="$(getent group "$service_user")" && [[ "$(cut -d: -f3 <<<"$entry")" == 0 ]]; then
  die "--user $service_user: its group has gid 0 (root's group): pick another user (or leave --user out)"
fi

# -- preflight -----------------------------------------------------------------------------------
if [[ $dry_run -eq 0 && $(id -u) -ne 0 ]]; then
  die "run as root (sudo $0 $*), or add --dry-run to see what it would do"
fi
if [[ -z "$python" ]]; then
  python="$(command -v python3 || true)"
fi
if [[ -z "$python" ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  msg="Python 3.10 or newer is needed for the venv: install python3 and python3-venv, or pass --python"
  if [[ $dry_run -eq 1 ]]; then note "warning: $msg"; python="${python:-python3}"; else die "$msg"; fi
elif "$python" -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then
  note "warning: $python is 3.13 or newer: rknn-toolkit-lite2 has no wheel for it, so the vision tower cannot run;"
  note "         pass --python with a 3.10-3.12 interpreter (e.g. python3.12) for a venv that has it"
fi
if ! command -v systemctl >/dev/null; then
  if [[ $dry_run -eq 1 ]]; then note "warning: systemctl not found: this system does not run systemd"
  else die "systemctl not found: the service needs systemd"; fi
fi
if [[ -z "$source_spec" ]]; then
  if [[ -f "$here/../pyproject.toml" ]]; then source_spec="$(cd "$here/.." && pwd)"; else source_spec=rksmolvlm; fi
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
toml_string() {  # "$1" as a TOML basic string (control characters were refused above)
  local value="${1//\\/\\\\}"
  printf '"%s"' "${value//\"/\\\"}"
}
set_key() {  # set_key KEY VALUE: KEY = "VALUE" on the config's KEY line (else its commented '# KEY = ' line)
  local key="$1" line n lines="$config" tmp
  line="$key = $(toml_string "$2")"
  [[ -f "$lines" ]] || lines="$here/config.example.toml"  # a dry run of a fresh install: the config-to-be
  if grep -qxF -- "$line" "$lines"; then note "$config already has $line"; return; fi
  n="$(grep -nE "^$key = " "$lines" | head -n 1 | cut -d: -f1 || true)"
  [[ -n "$n" ]] || n="$(grep -nE "^# ?$key = " "$lines" | head -n 1 | cut -d: -f1 || true)"
  [[ -n "$n" ]] || die "$config has no '$key = ' line: add $line to it yourself"
  echo "+ set line $n of $config to: $line"
  [[ $dry_run -eq 0 ]] || return 0
  # awk takes the line from the environment, not from its program or -v: no character of the value is syntax.
  tmp="$(mktemp "$config.XXXXXX")"
  if ! { LINE="$line" N="$n" awk 'NR == ENVIRON["N"] + 0 { print ENVIRON["LINE"]; next } { print }' "$config" \
           > "$tmp" && chmod --reference="$config" "$tmp" && chown --reference="$config" "$tmp"; }; then
    rm -f "$tmp"; die "could not rewrite $config: set $line in it yourself"
  fi
  mv -f "$tmp" "$config"  # the new config replaces the old in one step
}
if [[ -n "$bundle" ]]; then set_key bundle "$bundle"; fi
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
  set_key api_key_file "$key_file"
fi

# -- unit ----------------------------------------------------------------------------------------
# sed is safe here: the prefix, the config path and the user were held to plain characters above.
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
  # tomllib is 3.11+; on 3.10 the venv has tomli (a dependency of rksmolvlm there)
  read_bundle='import sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
print(tomllib.load(open(sys.argv[1], "rb")).get("bundle", ""))'
  reader="$python"
  if [[ -x "$venv/bin/python" ]]; then reader="$venv/bin/python"; fi
  configured_bundle="$("$reader" -c "$read_bundle" "$config" 2>/dev/null || true)"
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
