"""The board service: the hardened systemd unit (checked by systemd-analyze) and install.sh, whose
--dry-run prints every action and changes nothing."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the board slice on Python 3.10 (Ubuntu 22.04)
    import tomli as tomllib

from support import ROOT
from rksmolvlm.runtime.server.config import load_config, read_api_key

UNIT = ROOT / "boards" / "systemd" / "rksmolvlm.service"
INSTALL = ROOT / "boards" / "install.sh"
NEEDS_SYSTEMD = ("systemd-analyze is not installed: make .ci/run install Debian's systemd package "
                 "(apt-get install -y systemd) so the unit is verified")


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def rendered_unit(tmp_path):
    """The unit as install.sh renders it for a prefix whose rksmolvlm exists (verify checks ExecStart)."""
    executable = tmp_path / "prefix" / "venv" / "bin" / "rksmolvlm"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    path = tmp_path / "rksmolvlm.service"
    path.write_text(UNIT.read_text().replace("/opt/rksmolvlm", str(tmp_path / "prefix")))
    return path


def test_the_unit_is_hardened_and_talks_to_the_watchdog():
    s = unit_settings()
    for key, value in {"Type": "notify", "NotifyAccess": "main", "User": "rksmolvlm", "Restart": "on-failure",
                       "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                       "DevicePolicy": "closed", "RestartPreventExitStatus": "78", "CapabilityBoundingSet": ""}.items():
        assert s.get(key) == [value], key
    assert s["DeviceAllow"] == ["/dev/dri/renderD129 rw", "/dev/rknpu rw"]
    assert "render" in s["SupplementaryGroups"][0].split()
    assert int(s["WatchdogSec"][0]) >= 10 and s["MemoryMax"][0].endswith("G")
    assert s["ExecStart"] == ["/opt/rksmolvlm/venv/bin/rksmolvlm serve --config /etc/rksmolvlm/config.toml"]
    assert "PrivateDevices" not in s  # it would hide the NPU; DevicePolicy=closed + DeviceAllow instead


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason=NEEDS_SYSTEMD)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    path = rendered_unit(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rksmolvlm.service:" not in output, output  # no "unknown key" or similar warnings about our file


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason=NEEDS_SYSTEMD)
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    path = rendered_unit(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    line = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 3.0, line  # systemd calls ≤ 3.9 "OK"; a plain service scores 9.6


def run_install(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_install_help():
    result = run_install("--help")
    assert result.returncode == 0
    for option in ("--bundle", "--prefix", "--config-dir", "--source", "--api-key", "--no-start", "--dry-run"):
        assert option in result.stdout


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    prefix, config_dir = tmp_path / "opt", tmp_path / "etc"
    result = run_install("--dry-run", "--prefix", str(prefix), "--config-dir", str(config_dir), "--api-key",
                         "--bundle", "/var/lib/rksmolvlm/bundle")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [f"-m venv {prefix}/venv", f"{prefix}/venv/bin/pip install --upgrade '{ROOT}[board,serve]'",
             f"install -d -m 0750 -o root -g rksmolvlm {config_dir}",
             f"install -m 0640 -o root -g rksmolvlm {ROOT}/boards/config.example.toml {config_dir}/config.toml",
             "bundle = \"/var/lib/rksmolvlm/bundle\"", f"write a random key to {config_dir}/api_key",
             f"api_key_file = \"{config_dir}/api_key\"", "/etc/systemd/system/rksmolvlm.service",
             "systemctl daemon-reload", "systemctl enable rksmolvlm.service", "usermod --append --groups render,video"]
    for step in steps:
        assert step in out, f"{step!r} missing from:\n{out}"
    if subprocess.run(["getent", "passwd", "rksmolvlm"], capture_output=True).returncode != 0:
        assert "useradd --system --user-group" in out
    assert "no bundle at /var/lib/rksmolvlm/bundle yet" in out  # so it is not started
    assert not prefix.exists() and not config_dir.exists()


def test_install_keeps_an_existing_config_and_starts_with_a_bundle(tmp_path):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    config = config_dir / "config.toml"
    config.write_text((ROOT / "boards" / "config.example.toml").read_text())
    before = config.read_text()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    result = run_install("--dry-run", "--prefix", str(tmp_path / "opt"), "--config-dir", str(config_dir),
                         "--bundle", str(bundle))
    assert result.returncode == 0, result.stderr
    assert f"keeping the existing {config}" in result.stdout
    value = re.escape(f'bundle = "{bundle}"')
    line = rf"\+ set line \d+ of {re.escape(str(config))} to: {value}\n"
    assert re.search(line, result.stdout)  # just the line asked for
    assert "serve --check --config" in result.stdout and "systemctl restart rksmolvlm.service" in result.stdout
    assert config.read_text() == before


@pytest.mark.parametrize("args, status, message", [
    (["--bogus"], 2, "unknown option '--bogus'"),
    (["--bundle"], 2, "--bundle needs a value"),
    (["--dry-run", "--bundle", "/home/me/model.bundle"], 1, "cannot read /home/me/model.bundle (ProtectHome=yes)"),
    (["--dry-run", "--bundle", "relative/dir"], 1, "--bundle needs an absolute path"),
    (["--dry-run", "--bundle", "/var/lib/../../home/me/model.bundle"], 1,
     "--bundle may not contain . or .. components (got /var/lib/../../home/me/model.bundle): give the path it "
     "leads to, e.g. /home/me/model.bundle"),
    (["--dry-run", "--bundle", "/var/lib/rksmolvlm/bundle/.."], 1, "--bundle may not contain . or .. components"),
    (["--dry-run", "--bundle", "/var/lib/rksmolvlm/./bundle"], 1, "--bundle may not contain . or .. components"),
    (["--dry-run", "--prefix", "/opt/../root/x"], 1, "--prefix may not contain . or .. components"),
    (["--dry-run", "--config-dir", "/etc/.."], 1, "--config-dir may not contain . or .. components"),
    (["--dry-run", "--prefix", "/opt/my dir"], 1, "--prefix must be an absolute path made of letters, digits"),
    (["--dry-run", "--prefix", "/opt/a&b"], 1, "(it goes into the systemd unit): got /opt/a\\&b"),
    (["--dry-run", "--prefix", "opt"], 1, "--prefix must be an absolute path"),
    (["--dry-run", "--config-dir", "/etc/a|b"], 1, "--config-dir must be an absolute path made of letters"),
    (["--dry-run", "--config-dir", "/etc/%h"], 1, "--config-dir must be an absolute path made of letters"),
    (["--dry-run", "--bundle", "/srv/a\nb"], 1, "--bundle may not contain control characters such as a line "
                                               "break or a tab (got $'/srv/a\\nb')"),
    (["--dry-run", "--bundle", "/srv/a\tb"], 1, "--bundle may not contain control characters"),
    (["--dry-run", "--user", "root"], 1, "--user root: the service must not run as root"),
    (["--user", "root"], 1, "--user root: the service must not run as root"),  # refused before asking for root
    (["--dry-run", "--user", "a|b"], 1, "--user must be a plain user name"),
    (["--dry-run", "--user", "Robert'); --"], 1, "--user must be a plain user name"),
])
def test_install_refuses_bad_options(args, status, message):
    result = run_install(*args)
    assert result.returncode == status and message in result.stderr


def test_install_needs_root_unless_dry_run(tmp_path):
    (tmp_path / "id").write_text("#!/bin/sh\necho 1000\n")  # act as an ordinary user, even under root
    (tmp_path / "id").chmod(0o755)
    result = run_install(env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 1 and "run as root" in result.stderr and "--dry-run" in result.stderr


# -- a real run on a fake root: every system command is a stub, the files land in tmp_path ---------------------
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_ROOT/commands.log"
"""
INSTALL_STUB = """#!/bin/bash
args=()  # install without -o/-g: the fake root's owners need not exist
while [ $# -gt 0 ]; do case "$1" in -o|-g) shift 2 ;; *) args+=("$1"); shift ;; esac; done
exec "$REAL_INSTALL" "${args[@]}"
"""


class FakeRoot:
    """A prefix, config dir and unit dir under tmp_path, and stubs for id, getent, useradd, systemctl, …"""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name in ("groupadd", "useradd", "usermod", "chgrp", "systemctl", "runuser"):
            self._stub(name, STUB)
        self._stub("install", INSTALL_STUB)
        self._stub("id", '#!/bin/sh\n[ "$1" = -u ] && [ $# -eq 1 ] && echo 0 || exec /usr/bin/id "$@"\n')
        self._stub("getent", '#!/bin/sh\ngrep "^$2:" "$FAKE_ROOT/$1"\n')  # install.sh checks the name first
        (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/root:/bin/sh\n"
                                         "rksmolvlm:x:990:990::/var/lib/rksmolvlm:/usr/sbin/nologin\n"
                                         "wheely:x:991:0::/:/usr/sbin/nologin\n")
        (tmp_path / "group").write_text("root:x:0:\nrender:x:992:\nvideo:x:44:\nrksmolvlm:x:990:\nwheely:x:0:\n")
        self.prefix, self.config_dir, self.unit_dir = tmp_path / "opt", tmp_path / "etc", tmp_path / "systemd"
        self.unit_dir.mkdir()
        venv = self.prefix / "venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "python").symlink_to(sys.executable)  # "venv exists": no venv is built
        self._stub("pip", STUB, venv)
        self.config = self.config_dir / "config.toml"

    def _stub(self, name, text, where=None):
        path = (where or self.bin) / name
        path.write_text(text)
        path.chmod(0o755)

    def install(self, *args) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_ROOT": str(self.root),
               "REAL_INSTALL": shutil.which("install")}
        return run_install("--prefix", str(self.prefix), "--config-dir", str(self.config_dir), "--unit-dir",
                           str(self.unit_dir), "--python", sys.executable, *args, env=env)

    def commands(self) -> str:
        log = self.root / "commands.log"
        return log.read_text() if log.exists() else ""


@pytest.fixture
def fake_root(tmp_path):
    return FakeRoot(tmp_path)


def _bundle(tmp_path, name: str):
    bundle = tmp_path / "bundles" / name
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    return bundle


@pytest.mark.parametrize("name", ["a&b|c", 'say "cheese" it\'s', "back\\slash\\1&\\0|/x", "$HOME `id` %h ${x} ü"])
def test_install_writes_bundle_paths_into_the_config_exactly(fake_root, name):
    bundle = _bundle(fake_root.root, name)
    result = fake_root.install("--bundle", str(bundle), "--api-key")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(fake_root.config, "rb") as f:
        written = tomllib.load(f)
    assert written["bundle"] == str(bundle)
    assert written["server"]["api_key_file"] == str(fake_root.config_dir / "api_key")
    example = (ROOT / "boards" / "config.example.toml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(example, fake_root.config.read_text().splitlines()) if a != b]
    assert len(changed) == 2 and changed[0][0].startswith("bundle = ") and changed[1][0].startswith("# api_key_file")
    config = load_config(fake_root.config)  # the server reads the same path
    assert config.bundle == str(bundle) and config.server.api_key_file == str(fake_root.config_dir / "api_key")
    key = fake_root.config_dir / "api_key"
    assert len(read_api_key(key)) == 64 and stat.S_IMODE(key.stat().st_mode) == 0o640
    assert stat.S_IMODE(fake_root.config.stat().st_mode) == 0o640
    assert "serve --check --config" in fake_root.commands() and "systemctl restart rksmolvlm.service" in \
        fake_root.commands()


def test_install_is_idempotent_and_changes_only_the_bundle_line(fake_root):
    first, second = _bundle(fake_root.root, "one&two"), _bundle(fake_root.root, "three|four")
    assert fake_root.install("--bundle", str(first), "--api-key", "--no-start").returncode == 0
    unit = (fake_root.unit_dir / "rksmolvlm.service").read_text()
    assert f"ExecStart={fake_root.prefix}/venv/bin/rksmolvlm serve --config {fake_root.config}" in unit
    config, key = fake_root.config.read_text(), (fake_root.config_dir / "api_key").read_text()
    again = fake_root.install("--bundle", str(first), "--api-key", "--no-start")
    assert again.returncode == 0, again.stderr
    assert f'already has bundle = "{first}"' in again.stdout and "keeping the existing API key" in again.stdout
    assert "is up to date" in again.stdout and "+ set line" not in again.stdout
    assert fake_root.config.read_text() == config and (fake_root.config_dir / "api_key").read_text() == key
    moved = fake_root.install("--bundle", str(second), "--no-start")
    assert moved.returncode == 0, moved.stderr
    assert load_config(fake_root.config).bundle == str(second)
    assert [line for line in fake_root.config.read_text().splitlines() if line.startswith("bundle")] == \
        [f'bundle = "{second}"']


def test_install_reads_the_bundle_of_an_existing_config(fake_root):
    bundle = _bundle(fake_root.root, 'q"uo&te')
    assert fake_root.install("--bundle", str(bundle), "--no-start").returncode == 0
    result = fake_root.install()  # no --bundle: the config's bundle (TOML-escaped) is the one checked and started
    assert result.returncode == 0, result.stderr
    assert "no bundle at" not in result.stdout and "systemctl restart rksmolvlm.service" in fake_root.commands()


@pytest.mark.parametrize("user, message", [
    ("toor", "--user toor has uid 0, the powers of root"),
    ("wheely", "--user wheely: its group has gid 0"),
])
def test_install_refuses_uid_0_users(fake_root, user, message):
    for args in (["--user", user], ["--dry-run", "--user", user]):
        result = fake_root.install(*args)
        assert result.returncode == 1 and message in result.stderr
    assert fake_root.commands() == "" and not fake_root.config_dir.exists()
