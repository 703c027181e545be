"""Print the local paths the host's pip configuration refers to, one per line, so the board check can
bind-mount them read-only at the same place in the rootfs: the config files themselves, certificates,
constraint and requirement files, find-links folders and file:// indexes. Read from pip's config
files and PIP_* variables as pip reads them; nothing is hard-coded. Run with any host Python 3."""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# pip's config files, lowest priority first (global, user, legacy user); PIP_CONFIG_FILE adds one
CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.config/pip/pip.conf", "~/.pip/pip.conf")
# options whose values may name local files or folders (several values separated by whitespace)
PATH_OPTIONS = ("cert", "client-cert", "constraint", "requirement", "find-links", "index-url", "extra-index-url")


def main() -> None:
    paths: dict[str, None] = {}
    files = [Path(f).expanduser() for f in CONFIG_FILES]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    values: list[str] = []
    for file in files:
        if not file.is_file():
            continue
        paths[str(file)] = None
        parser = configparser.RawConfigParser()
        parser.read(file)
        for section in parser.sections():
            for option in PATH_OPTIONS:
                if parser.has_option(section, option):
                    values.extend(parser.get(section, option).split())
    for option in PATH_OPTIONS:
        values.extend(os.environ.get("PIP_" + option.upper().replace("-", "_"), "").split())
    for value in values:
        path = _local_path(value)
        if path is not None and path.exists():
            paths[str(path.resolve())] = None
    print("\n".join(paths))


# ======================================================================================================
# Private helpers
# ======================================================================================================


def _local_path(value: str) -> Path | None:
    """The local path a plain path or file:// URL needs mounted; None for a remote URL."""
    url = urlparse(value)
    if url.scheme == "file":
        index = Path(unquote(url.path))
        # a PEP 503 file index links its files relative to its root (simple/NAME/ -> ../../files/)
        return index.parent if index.name == "simple" else index
    return Path(value).expanduser() if url.scheme == "" else None


if __name__ == "__main__":
    sys.exit(main())
