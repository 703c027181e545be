"""The server's config file: a validated schema with errors naming the key and the fix, the shipped
example, and command-line flags overriding the file."""

import argparse

import pytest

from conftest import ROOT
from rksmolvlm.cli import build_parser, main
from rksmolvlm.runtime.server import resolve_config
from rksmolvlm.runtime.server_config import (ConfigError, ServerConfig, config_from_dict, load_config, read_api_key,
                                             schema_keys, with_overrides)

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


def test_empty_optional_paths_mean_unset(tmp_path):
    config = _load(tmp_path, '[server]\napi_key_file = ""\n[images]\nlocal_dir = ""\n')
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


def test_dict_form_is_checked_too():
    with pytest.raises(ConfigError, match="the config: unknown key 'color'"):
        config_from_dict({"color": "blue"}, "the config")
