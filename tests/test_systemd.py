"""The board service: the hardened systemd unit (checked by systemd-analyze) and install.sh, whose
--dry-run prints every action and changes nothing."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

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
    assert f"s|^#? ?bundle = .*|bundle = \"{bundle}\"|" in result.stdout  # just the line asked for
    assert "serve --check --config" in result.stdout and "systemctl restart rksmolvlm.service" in result.stdout
    assert config.read_text() == before


@pytest.mark.parametrize("args, status, message", [
    (["--bogus"], 2, "unknown option '--bogus'"),
    (["--bundle"], 2, "--bundle needs a value"),
    (["--dry-run", "--bundle", "/home/me/model.bundle"], 1, "cannot read /home/me/model.bundle (ProtectHome=yes)"),
    (["--dry-run", "--bundle", "relative/dir"], 1, "--bundle needs an absolute path"),
    (["--dry-run", "--prefix", "/opt/my dir"], 1, "may not contain spaces"),
])
def test_install_refuses_bad_options(args, status, message):
    result = run_install(*args)
    assert result.returncode == status and message in result.stderr


def test_install_needs_root_unless_dry_run(tmp_path):
    (tmp_path / "id").write_text("#!/bin/sh\necho 1000\n")  # act as an ordinary user, even under root
    (tmp_path / "id").chmod(0o755)
    result = run_install(env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 1 and "run as root" in result.stderr and "--dry-run" in result.stderr
