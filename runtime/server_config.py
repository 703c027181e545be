"""The server's configuration: ``/etc/rksmolvlm/config.toml`` validated against a schema, with
command-line flags layered on top.

The dataclasses below are the schema: each field's type, default, range and help text live in one
place, and validation, error messages and ``boards/config.example.toml`` all follow from them.
Every problem in a file is reported at once, each naming its key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rksmolvlm.errors import RkSmolVLMError

__all__ = [
    "ServerConfig", "ServerSection", "Limits", "ImageSources", "ConfigError",
    "DEFAULT_CONFIG_PATH", "CONFIG_ENV", "load_config", "config_from_dict", "with_overrides", "schema_keys",
    "read_api_key",
]

DEFAULT_CONFIG_PATH = Path("/etc/rksmolvlm/config.toml")
CONFIG_ENV = "RKSMOLVLM_CONFIG"
MIB = 1024 * 1024


class ConfigError(RkSmolVLMError):
    """A configuration file or flag that is missing, malformed or out of range."""

    exit_code = 78  # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from retrying


def _key(default, help: str, *, min=None, max=None, choices=None, kind: str | None = None):
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices, "kind": kind})


@dataclass(frozen=True)
class ServerSection:
    host: str = _key("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to the network "
                     "(then set api_key_file)")
    port: int = _key(8080, "TCP port (0 picks a free one)", min=0, max=65535)
    api_key_file: str | None = _key(None, "file holding the API key clients send as 'Authorization: Bearer KEY' "
                                    "(unset: no key needed)", kind="path")
    queue_size: int = _key(4, "requests that may wait while one runs; more get 429 with Retry-After", min=0, max=1024)
    request_timeout_s: float = _key(300.0, "seconds a request may take, queue wait included; then it is aborted",
                                    min=0.1, max=86400)
    max_connections: int = _key(32, "open HTTP connections; more get 503", min=1, max=65536)
    model_name: str | None = _key(None, "model id in /v1/models and responses (default: the bundle's source model)")
    log_level: str = _key("info", "log verbosity", choices=("debug", "info", "warning", "error"))
    metrics_require_key: bool = _key(False, "ask for the API key on /metrics too")
    stall_timeout_s: float = _key(120.0, "a generation with no progress for this long counts as stuck: /health "
                                  "turns 503 and the systemd watchdog stops being fed", min=1, max=86400)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = _key(20 * MIB, "request body size (images travel base64-encoded: 4/3 of their size)",
                               min=1024, max=1024 * MIB, kind="size")
    max_image_bytes: int = _key(10 * MIB, "encoded size of one image", min=1, max=512 * MIB, kind="size")
    max_image_pixels: int = _key(50_000_000, "decoded pixels of one image (width × height), checked before decoding",
                                 min=1, max=100_000_000)
    max_images: int = _key(4, "images in one request (0: text only)", min=0, max=64)
    max_tokens: int = _key(1024, "the largest max_tokens a request may ask for", min=1, max=16384)
    default_max_tokens: int = _key(256, "max_tokens when a request does not say", min=1, max=16384)


@dataclass(frozen=True)
class ImageSources:
    local_dir: str | None = _key(None, "directory that image_url may point into (file:///… or an absolute path); "
                                 "unset: local paths are refused", kind="path")
    allow_remote: bool = _key(False, "fetch http(s):// image URLs (the server makes outgoing requests)")
    remote_timeout_s: float = _key(10.0, "seconds to fetch one remote image", min=0.1, max=300)


@dataclass(frozen=True)
class ServerConfig:
    bundle: str | None = _key(None, "bundle directory (BUNDLE on the command line overrides it)", kind="path")
    engine: str = _key("auto", "npu on the board, host = x86 preview; auto picks", choices=("auto", "host", "npu"))
    npu_cores: tuple[int, ...] | None = _key(None, "NPU core indices the vision tower uses, e.g. [0, 1, 2] "
                                             "(default: all of the SoC's)", min=0, max=7)
    rkllm_library: str | None = _key(None, "path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, "
                                     "/usr/local/lib)", kind="path")
    verify_bundle: bool = _key(True, "check the sha256 of every bundle file at start-up")
    image_cache_size: int = _key(32, "images whose vision features are kept for reuse", min=0, max=4096)
    server: ServerSection = field(default_factory=ServerSection)
    limits: Limits = field(default_factory=Limits)
    images: ImageSources = field(default_factory=ImageSources)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {"server": ServerSection, "limits": Limits, "images": ImageSources}


def schema_keys() -> dict[str, dataclasses.Field]:
    """Every configurable key, dotted (``server.port``), with its dataclass field."""
    out = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name in _SECTIONS:
            out.update({f"{f.name}.{g.name}": g for g in dataclasses.fields(_SECTIONS[f.name])})
        else:
            out[f.name] = f
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# -- values ------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": MIB, "gb": 1000**3, "gib": 1024 * MIB}


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _convert(key: str, value, hint, meta: dict):
    """``value`` as the field's type, or raise ValueError with the message's tail (what to write)."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    name = key.rsplit(".", 1)[-1]
    if optional and value == "" and meta.get("kind") == "path":
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, not {_type_name(value)} ({value!r}): write {name} = true")
    if hint is int:
        if meta.get("kind") == "size" and isinstance(value, str):
            match = _SIZE.match(value)
            if not match:
                raise ValueError(f"{value!r} is not a size: write a number of bytes or e.g. \"20 MiB\"")
            return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            raise ValueError(f"must be an integer, not the string {value!r}: write {name} = {value.strip()} "
                             "without quotes")
        raise ValueError(f"must be an integer, not {_type_name(value)} ({value!r})")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"must be a number, not {_type_name(value)} ({value!r})")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, not {_type_name(value)} ({value!r}): write {name} = \"…\" in quotes")
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a TOML array of integers
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"must be an array of integers, e.g. {name} = [0, 1, 2], not {value!r}")
        if len(set(value)) != len(value) or not value:
            raise ValueError(f"must list distinct indices, at least one: e.g. {name} = [0, 1, 2]")
        return tuple(value)
    raise TypeError(f"schema type {hint!r} is not handled")  # pragma: no cover


def _check(key: str, value, meta: dict) -> str | None:
    """The problem with an in-type ``value`` (range, choices), or None."""
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if value is None:
        return None
    if choices and value not in choices:
        return f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}"
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if (lo is not None and item < lo) or (hi is not None and item > hi):
                return f"{key} = {value!r} is out of range: use a value from {lo:,} to {hi:,}"
    return None


# -- loading -----------------------------------------------------------------------------------
def _suggest(key: str) -> str:
    keys = list(schema_keys())
    bare = key.rsplit(".", 1)[-1]
    homes = [k for k in keys if k.rsplit(".", 1)[-1] == bare and k != key]
    if homes:
        section = homes[0].split(".")[0] if "." in homes[0] else None
        where = f"under [{section}]" if section else "at the top of the file, before any [section]"
        return f": did you mean {homes[0]!r}? put {bare} {where}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return f": did you mean {close[0]!r}?"
    return f": remove it (known keys: {', '.join(keys)})"


def _build(cls, values: dict, prefix: str, problems: list[str]):
    hints, kwargs = _hints(cls), {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        f = names.get(name)
        if f is None or name in _SECTIONS:
            if name in _SECTIONS and not prefix:
                continue  # handled by the caller
            problems.append(f"unknown key {key!r}{_suggest(key)}")
            continue
        try:
            converted = _convert(key, value, hints[name], f.metadata)
        except ValueError as exc:
            problems.append(f"{key} {exc}")
            continue
        problem = _check(key, converted, f.metadata)
        if problem:
            problems.append(problem)
            continue
        kwargs[name] = converted
    return kwargs


def config_from_dict(data: dict, source: str = "the configuration") -> ServerConfig:
    """A validated ``ServerConfig`` from parsed TOML; every problem is reported in one ConfigError."""
    problems: list[str] = []
    top = _build(ServerConfig, data, "", problems)
    for name, cls in _SECTIONS.items():
        if name not in data:
            continue
        table = data[name]
        if not isinstance(table, dict):
            problems.append(f"{name} must be a table: write [{name}] on its own line, then its keys")
            continue
        top[name] = cls(**_build(cls, table, f"{name}.", problems))
    config = ServerConfig(**top) if not problems else None
    if config is not None:
        problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(_report(source, problems))
    return config


def _cross_checks(config: ServerConfig) -> list[str]:
    problems = []
    limits = config.limits
    if limits.default_max_tokens > limits.max_tokens:
        problems.append(f"limits.default_max_tokens = {limits.default_max_tokens} is above limits.max_tokens = "
                        f"{limits.max_tokens}: lower it or raise max_tokens")
    one_image = (limits.max_image_bytes + 2) // 3 * 4 + 4096  # base64 of one image plus the JSON around it
    if limits.max_images and limits.max_body_bytes < one_image:
        problems.append(f"limits.max_body_bytes = {limits.max_body_bytes:,} cannot carry one image of "
                        f"limits.max_image_bytes = {limits.max_image_bytes:,} (base64 needs {one_image:,}): raise "
                        "max_body_bytes or lower max_image_bytes")
    local = config.images.local_dir
    if local and not Path(local).is_absolute():
        problems.append(f"images.local_dir = {local!r} must be an absolute path, e.g. \"/srv/images\"")
    elif local and not Path(local).is_dir():
        problems.append(f"images.local_dir = {config.images.local_dir!r} is not a directory: create it or remove "
                        "the key")
    return problems


def _report(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def load_config(path: str | os.PathLike | None) -> ServerConfig:
    """Read and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return ServerConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: create it from boards/config.example.toml, or "
                          "pass another with --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror}): check its permissions (the service "
                          "user must be able to read it)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix the line it names") from None
    return config_from_dict(data, str(path))


def with_overrides(config: ServerConfig, overrides: dict[str, object], source: str = "command line") -> ServerConfig:
    """``config`` with dotted keys replaced (command-line flags), validated like the file."""
    data = config.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if isinstance(value, tuple):
            value = list(value)
        (data[section] if section else data)[name] = value
    if isinstance(data.get("npu_cores"), tuple):
        data["npu_cores"] = list(data["npu_cores"])
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    for section in _SECTIONS:
        data[section] = {k: v for k, v in data[section].items() if v is not None}
    return config_from_dict(data, source)


def read_api_key(path: str | os.PathLike) -> str:
    """The API key in ``path`` (surrounding whitespace dropped)."""
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"server.api_key_file {path} does not exist: create it (e.g. "
                          f"'openssl rand -hex 32 > {path}') or remove the key") from None
    except OSError as exc:
        raise ConfigError(f"cannot read server.api_key_file {path} ({exc.strerror}): make it readable by the service "
                          "user (e.g. chgrp rksmolvlm, chmod 640)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"server.api_key_file {path} is not text: write the key as one line") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"server.api_key_file {path} must hold one key without spaces (it is "
                          f"{'empty' if not key else 'several words'}): e.g. 'openssl rand -hex 32 > {path}'")
    if len(key) < 16:
        raise ConfigError(f"the API key in {path} is {len(key)} characters: use at least 16 "
                          "(e.g. 'openssl rand -hex 32')")
    return key
