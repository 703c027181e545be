"""The server's config file: a validated schema with errors naming the key and the fix, the shipped
example, and command-line flags overriding the file."""

import argparse
import logging
import os
import stat
import subprocess
import sys

import pytest

from support import ROOT
from rksmolvlm.cli import build_parser, main
from rksmolvlm.runtime.server import resolve_config
from rksmolvlm.runtime.server.config import (API_KEY_MAX_BYTES, ConfigError, ServerConfig, _key_file_exposure,
                                             config_from_dict, load_config, read_api_key, schema_keys, with_overrides)

EXAMPLE = ROOT / "boards" / "config.example.toml"


def _load(tmp_path, text: str) -> ServerConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def _problem(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.exit_code == 78
    return str(info.value)


def test_defaults_are_safe():
    config = ServerConfig()
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert config.server.api_key_file is None
    assert config.images.allow_remote is False and config.images.local_dir is None
    assert config.engine == "auto"


def test_the_example_documents_every_key_and_holds_the_defaults():
    text = EXAMPLE.read_text()
    for key in schema_keys():
        assert f"{key.rsplit('.', 1)[-1]} = " in text, f"{key} is not documented in {EXAMPLE.name}"
    config = load_config(EXAMPLE)
    assert config.bundle == "/var/lib/rksmolvlm/bundle"
    defaults = ServerConfig(bundle=config.bundle)
    assert config == defaults


def test_sizes_take_units(tmp_path):
    config = _load(tmp_path, '[limits]\nmax_body_bytes = "32 MiB"\nmax_image_bytes = 1000000\n')
    assert config.limits.max_body_bytes == 32 * 1024 * 1024
    assert config.limits.max_image_bytes == 1_000_000
    assert "is not a size" in _problem(tmp_path, '[limits]\nmax_body_bytes = "lots"\n')


@pytest.mark.parametrize("text, expected", [
    ("[server]\nprot = 8080\n", "unknown key 'server.prot': did you mean 'server.port'?"),
    ("port = 8080\n", "did you mean 'server.port'? put port under [server]"),
    ("[server]\nbundle = '/x'\n", "put bundle at the top of the file"),
    ("[limitz]\nmax_images = 2\n", "unknown key 'limitz'"),
    ("[server]\nport = \"8080\"\n", "server.port must be an integer, not the string '8080': write port = 8080 "
                                    "without quotes"),
    ("[server]\nport = 70000\n", "server.port = 70000 is out of range: use a value from 0 to 65,535"),
    ("[server]\nqueue_size = -1\n", "server.queue_size = -1 is out of range"),
    ("[server]\nrequest_timeout_s = \"long\"\n", "server.request_timeout_s must be a number"),
    ("[images]\nallow_remote = \"yes\"\n", "images.allow_remote must be true or false"),
    ("engine = \"gpu\"\n", "engine = 'gpu' is not one of 'auto', 'host', 'npu'"),
    ("npu_cores = [0, 0]\n", "npu_cores must list distinct indices"),
    ("npu_cores = 1\n", "npu_cores must be an array of integers, e.g. npu_cores = [0, 1, 2]"),
    ("server = 3\n", "server must be a table: write [server] on its own line"),
    ("[server]\nmax_connections = true\n", "server.max_connections must be an integer, not a boolean"),
    ("[limits]\nmax_tokens = 100\ndefault_max_tokens = 200\n", "limits.default_max_tokens = 200 is above "
                                                               "limits.max_tokens = 100"),
    ("[limits]\nmax_body_bytes = 100000\n", "limits.max_body_bytes = 100,000 cannot carry one image"),
    ("[decode]\nmax_memory = \"256 MiB\"\n", "limits.max_decode_bytes = 536,870,912 is above decode.max_memory = "
                                             "268,435,456: an image within the decode budget could not be decoded"),
    ("[decode]\nworkers = 1\n", "decode.workers = 1 is out of range: use a value from 2"),
    ("[images]\nlocal_dir = \"images\"\n", "images.local_dir = 'images' must be an absolute path"),
    ("[images]\nlocal_dir = \"/no/such/dir\"\n", "is not a directory: create it or remove the key"),
    ("[server\nport = 1\n", "is not valid TOML"),
])
def test_problems_name_the_key_and_the_fix(tmp_path, text, expected):
    message = _problem(tmp_path, text)
    assert expected in message
    assert str(tmp_path / "config.toml") in message


def test_every_problem_is_reported_at_once(tmp_path):
    message = _problem(tmp_path, "[server]\nport = -1\nqueue_size = \"4\"\nhots = \"0.0.0.0\"\n")
    assert "3 problems" in message
    assert "server.port" in message and "server.queue_size" in message and "server.hots" in message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: create it from boards/config.example.toml"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


PATH_KEYS = [key for key, f in schema_keys().items() if f.metadata.get("kind") == "path"]
FLOAT_KEYS = [key for key, f in schema_keys().items() if f.type in ("float", float)]


def _toml(key: str, value: str) -> str:
    section, _, name = key.rpartition(".")
    return f"[{section}]\n{name} = {value}\n" if section else f"{name} = {value}\n"


def test_the_schema_has_path_and_float_keys():
    assert {"server.api_key_file", "images.local_dir", "bundle", "rkllm_library"} <= set(PATH_KEYS)
    assert {"server.request_timeout_s", "server.stall_timeout_s", "images.remote_timeout_s"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "+nan", "-nan", "inf", "+inf", "-inf"])
def test_no_float_key_takes_nan_or_infinity(tmp_path, key, value):
    message = _problem(tmp_path, _toml(key, value))
    expected = "nan" if "nan" in value else value.lstrip("+")  # nan has no sign once read
    assert f"{key} must be a finite number" in message and message.endswith(f"not {expected}")


def test_numbers_too_big_for_a_float_or_for_python_are_config_errors(tmp_path):
    assert "server.request_timeout_s must be a finite number" in _problem(
        tmp_path, "[server]\nrequest_timeout_s = 1" + "0" * 400 + "\n")
    message = _problem(tmp_path, "[server]\nport = 1" + "0" * 400 + "\n")
    assert "server.port = 10000000000000000000…(401 characters) is out of range" in message
    assert "holds a number TOML cannot read" in _problem(tmp_path, "[server]\nport = 1" + "0" * 5000 + "\n")


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_flags_cannot_pass_nan_either(key):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        with_overrides(ServerConfig(), {key: float("nan")})


@pytest.mark.parametrize("key", PATH_KEYS)
@pytest.mark.parametrize("value", ['""', '"   "'])
def test_an_empty_path_is_an_error_not_unset(tmp_path, key, value):
    # "" used to mean unset: api_key_file = "" switched the key check off without a word.
    message = _problem(tmp_path, _toml(key, value))
    assert f"{key} is an empty path" in message and "comment it out" in message


def test_an_empty_key_file_flag_is_refused_too():
    with pytest.raises(ConfigError, match="server.api_key_file is an empty path"):
        resolve_config(_serve_args("/srv/b", "--no-config", "--api-key-file", ""))


@pytest.mark.parametrize("key", PATH_KEYS)
def test_a_path_with_nul_or_a_line_break_is_refused(tmp_path, key):
    for value in ['"/srv/a\\u0000b"', '"/srv/a\\nb"']:
        message = _problem(tmp_path, _toml(key, value))
        assert f"{key} = " in message and "holds a NUL or line break" in message


def test_unset_paths_are_written_by_leaving_them_out(tmp_path):
    config = _load(tmp_path, '[server]\n# api_key_file = "/etc/rksmolvlm/api_key"\n[images]\n')
    assert config.server.api_key_file is None and config.images.local_dir is None


def _serve_args(*argv) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('bundle = "/srv/a"\nengine = "host"\n[server]\nport = 9000\nqueue_size = 7\n'
                    '[limits]\nmax_images = 2\n')
    config, source = resolve_config(_serve_args("/srv/b", "--config", str(path), "--port", "9100",
                                                "--host", "0.0.0.0", "--no-verify"))
    assert source == str(path)
    assert config.bundle == "/srv/b" and config.server.port == 9100 and config.server.host == "0.0.0.0"
    assert config.server.queue_size == 7 and config.limits.max_images == 2 and config.engine == "host"
    assert config.verify_bundle is False
    with pytest.raises(ConfigError, match="server.port = 70000 is out of range"):
        resolve_config(_serve_args("--config", str(path), "--port", "70000"))


def test_config_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text("[server]\nport = 9200\n")
    monkeypatch.setenv("RKSMOLVLM_CONFIG", str(path))
    config, source = resolve_config(_serve_args("/srv/b"))
    assert config.server.port == 9200 and source == str(path)


def test_with_overrides_validates_like_the_file():
    config = with_overrides(ServerConfig(), {"server.queue_size": 0, "npu_cores": (0, 2)})
    assert config.server.queue_size == 0 and config.npu_cores == (0, 2)
    with pytest.raises(ConfigError, match="engine = 'tpu'"):
        with_overrides(ServerConfig(), {"engine": "tpu"})


def test_cli_exits_78_on_a_config_error(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text("[server]\nport = \"x\"\n")
    assert main(["serve", "/srv/b", "--config", str(path)]) == 78
    err = capsys.readouterr().err
    assert "rksmolvlm serve: error:" in err and "server.port must be an integer" in err and "Traceback" not in err


def test_cli_without_a_bundle_says_where_to_set_it(capsys):
    assert main(["serve", "--no-config"]) == 78
    assert "no bundle to serve: pass BUNDLE, or set bundle" in capsys.readouterr().err


def test_api_key_files(tmp_path):
    good = tmp_path / "key"
    good.write_text("  0123456789abcdef0123  \n")
    assert read_api_key(good) == "0123456789abcdef0123"
    for content, message in [("", "empty"), ("short", "use at least 16"), ("two words here!!", "several words")]:
        good.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_api_key(good)
    with pytest.raises(ConfigError, match="does not exist: create it"):
        read_api_key(tmp_path / "missing")


KEY = "0123456789abcdef0123456789abcdef"


def _key_file(tmp_path, content: str | bytes = KEY, mode: int = 0o600):
    path = tmp_path / "api_key"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


@pytest.mark.timeout(10)  # a FIFO that were opened for reading would wait for a writer forever
def test_api_key_file_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for path, kind in [("/dev/zero", "a character device"), (fifo, "a FIFO"), (tmp_path / "dir", "a directory")]:
        with pytest.raises(ConfigError, match=f"{path} is {kind}, not a regular file"):
            read_api_key(path)
    (tmp_path / "link").symlink_to("/dev/zero")  # a symbolic link is judged by what it points at
    with pytest.raises(ConfigError, match="is a character device"):
        read_api_key(tmp_path / "link")


def test_api_key_file_size_is_capped_before_reading(tmp_path):
    assert API_KEY_MAX_BYTES == 4096
    path = _key_file(tmp_path, KEY + " " * (API_KEY_MAX_BYTES - len(KEY)))
    assert read_api_key(path) == KEY  # exactly at the cap, whitespace stripped
    _key_file(tmp_path, KEY + " " * (API_KEY_MAX_BYTES - len(KEY) + 1))
    with pytest.raises(ConfigError, match="is larger than 4,096 bytes"):
        read_api_key(path)
    with open(path, "wb") as big:
        big.truncate(8 * 1024**3)  # a sparse 8 GiB file: refused by its size, never read
    with pytest.raises(ConfigError, match="is larger than 4,096 bytes"):
        read_api_key(path)


def test_api_key_from_a_file_whose_size_lies_is_still_bounded():
    # /proc files report size 0; the read stops at the cap whatever the file holds.
    with pytest.raises(ConfigError, match="/proc/self/environ"):
        read_api_key("/proc/self/environ")


@pytest.mark.parametrize("content, message", [
    (b"\n\t \n", "it is empty"),
    (b"\xff\xfe" + KEY.encode(), "is not text"),
    ("0123456789abcdef\u00e90123", "printable ASCII"),
    (KEY + "\x00", "printable ASCII"),
    (KEY + "\n" + KEY, "several words"),
])
def test_api_key_content(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        read_api_key(_key_file(tmp_path, content))


def test_api_key_whitespace_is_stripped(tmp_path):
    assert read_api_key(_key_file(tmp_path, f"\r\n {KEY}\t\r\n")) == KEY


@pytest.mark.parametrize("mode, exposure", [(0o644, "readable by every user"), (0o604, "readable by every user"),
                                            (0o602, "writable by every user"), (0o620, "writable by its group"),
                                            (0o600, None), (0o400, None)])
def test_api_key_file_others_can_read_is_a_warning(tmp_path, caplog, mode, exposure):
    with caplog.at_level(logging.WARNING, logger="rksmolvlm.runtime.server.config"):
        assert read_api_key(_key_file(tmp_path, mode=mode)) == KEY
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if exposure is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and exposure in warnings[0] and f"mode {mode:04o}" in warnings[0]
        assert "chmod 600" in warnings[0] and KEY not in warnings[0]


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, gid, 33, 0, 0, 0))


def test_group_read_is_expected_only_in_the_install_sh_layout():
    own = os.getegid()
    assert _key_file_exposure(_stat(0o640, 0, own)) is None  # root:rksmolvlm 640, the service's group
    assert _key_file_exposure(_stat(0o640, 0, own + 1)) == "readable by its group"  # some other group
    assert _key_file_exposure(_stat(0o640, 1000, own)) == "readable by its group"  # owned by a user: use 600
    assert _key_file_exposure(_stat(0o600, 1000, own + 1)) is None


def test_serve_check_prints_the_key_file_warning(preview_bundles, tmp_path):
    key = _key_file(tmp_path, mode=0o644)
    config = tmp_path / "config.toml"
    config.write_text(f'bundle = "{preview_bundles["idefics3-256m"]}"\nengine = "host"\n'
                      f'[server]\napi_key_file = "{key}"\n')
    result = subprocess.run([sys.executable, "-m", "rksmolvlm", "serve", "--config", str(config), "--check"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert f"WARNING rksmolvlm.runtime.server.config: server.api_key_file {key} is readable by every user" \
        in result.stdout
    assert "api key: required" in result.stdout and result.stdout.rstrip().endswith("ok")
    assert KEY not in result.stdout + result.stderr
    key.write_text("")  # an empty key stops --check with exit 78
    result = subprocess.run([sys.executable, "-m", "rksmolvlm", "serve", "--config", str(config), "--check"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 78 and "it is empty" in result.stderr and "Traceback" not in result.stderr


def test_dict_form_is_checked_too():
    with pytest.raises(ConfigError, match="the config: unknown key 'color'"):
        config_from_dict({"color": "blue"}, "the config")


def test_threads_reach_the_engine_options(tmp_path, monkeypatch):
    """threads (file) and --threads (flag, over the file) become EngineOptions.threads; ask/chat/bench take
    --threads too."""
    from types import SimpleNamespace

    import rksmolvlm.runners as engines
    from rksmolvlm.runtime.server.service import open_runner

    path = tmp_path / "config.toml"
    path.write_text("threads = 3\n")
    assert resolve_config(_serve_args("/srv/b", "--config", str(path)))[0].threads == 3
    config, _ = resolve_config(_serve_args("/srv/b", "--config", str(path), "--threads", "2"))
    assert config.threads == 2 and ServerConfig().threads is None
    assert "threads = 0 is out of range" in _problem(tmp_path, "threads = 0\n")
    seen = []

    def fake_open_engines(bundle, engine, options, simulation=None):
        seen.append(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(engines, "open_engines", fake_open_engines)
    with pytest.raises(RuntimeError, match="stop here"):
        open_runner(SimpleNamespace(settings=SimpleNamespace(tile_size=512), video_settings=None), config, "host",
                    engines.RUNNERS)
    assert seen[0].threads == 2
    for verb in (["ask", "b", "--prompt", "hi"], ["chat", "b"], ["bench", "b"]):
        assert build_parser().parse_args([*verb, "--threads", "4"]).threads == 4
