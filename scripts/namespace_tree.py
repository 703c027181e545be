#!/usr/bin/env python3
"""The installed ``rksmolvlm`` namespace of a source tree, as a tree of symlinks.

pyproject.toml maps folders into the package with ``[tool.setuptools.package-dir]``
(``runtime/`` → ``rksmolvlm.runtime``, ``convert/`` → ``rksmolvlm.convert``, …). Tools that read
source folders (mypy) and a second checkout imported beside the installed one (the old tree of
``scripts/bench_overhead.py``) need that mapping laid out on disk: DEST/rksmolvlm/runtime → runtime/,
and so on. The mapping is read from the tree's own pyproject.toml, so an older commit gets its own.

    python scripts/namespace_tree.py DEST [--root CHECKOUT]
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

__all__ = ["package_dirs", "build", "main"]


def package_dirs(root: Path) -> dict[str, Path]:
    """Package name → source folder, from ``root``/pyproject.toml (parents before children)."""
    pyproject = root / "pyproject.toml"
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"cannot read {pyproject} ({exc}): pass the root of an rksmolvlm checkout") from exc
    mapping = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    if not mapping:
        raise SystemExit(f"{pyproject} has no [tool.setuptools.package-dir]: pass the root of an rksmolvlm checkout")
    ordered = sorted(mapping.items(), key=lambda item: item[0].count("."))
    return {name: (root / folder).resolve() for name, folder in ordered}


def build(root: Path, dest: Path) -> Path:
    """Lay out ``root``'s packages under ``dest`` as symlinks (replacing what ``dest`` held); returns
    ``dest``, the directory to put on ``sys.path`` or to run mypy from."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in dest.iterdir():
        _remove(child)
    for name, folder in package_dirs(root).items():
        if not folder.is_dir():
            raise SystemExit(f"{folder} (package {name}) is missing: is {root} a complete checkout?")
        link = dest.joinpath(*name.split("."))
        _expand(link.parent, dest)
        _remove(link)
        link.symlink_to(folder, target_is_directory=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="where to lay out the tree (its contents are replaced)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout to mirror (default: this one)")
    args = parser.parse_args(argv)
    print(build(args.root.resolve(), args.dest.absolute()))


def _expand(directory: Path, dest: Path) -> None:
    """Make ``directory`` (inside ``dest``) a real directory whose entries link to what it linked to,
    so a child package can be placed inside a linked parent."""
    if directory == dest:
        return
    _expand(directory.parent, dest)
    if directory.is_symlink():
        target = directory.resolve()
        directory.unlink()
        directory.mkdir()
        for entry in target.iterdir():
            if entry.name != "__pycache__":
                (directory / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    elif not directory.exists():
        raise SystemExit(f"package-dir maps a package inside {directory}, which no mapping provides")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()


if __name__ == "__main__":
    main()
