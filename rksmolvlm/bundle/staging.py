"""The bundle: the only contract between the x86 host and the board.

A bundle is a directory with ``manifest.json`` and the files it lists (each with size and sha256).
It is written atomically: everything goes into a hidden temp directory beside the destination,
the manifest is written last, and the directory is renamed into place. A failed or interrupted
conversion removes the temp directory and leaves the destination as it was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from rksmolvlm import __version__
from rksmolvlm.errors import BundleError
from rksmolvlm.bundle.manifest import MANIFEST, SCHEMA_VERSION

if TYPE_CHECKING:
    from rksmolvlm.bundle.manifest import Manifest

__all__ = ["SCHEMA_VERSION", "MANIFEST", "staged_bundle", "read_manifest", "file_record", "staging_dirs"]

_STAGING_PREFIX = ".rksmolvlm-staging-"


def file_record(path: Path) -> dict:
    from rksmolvlm.hashing import sha256_file

    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def staging_dirs(destination: Path) -> list[Path]:
    """Temp directories a conversion towards ``destination`` would use (for tests and cleanup)."""
    parent = destination.resolve().parent
    return sorted(parent.glob(f"{_STAGING_PREFIX}{destination.name}-*"))


@contextmanager
def staged_bundle(destination: str | os.PathLike, overwrite: bool = False) -> Iterator["StagedBundle"]:
    """Stage a bundle in a temp dir beside ``destination``; commit on success, remove on any error
    (including KeyboardInterrupt)."""
    dest = Path(destination).expanduser().absolute()
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists: choose another output directory or pass --force to replace it")
    if dest.exists() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise BundleError(f"{dest} exists and is not a bundle: refusing to replace it, choose another output")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{dest.name}-", dir=dest.parent))
    stage = StagedBundle(staging)
    try:
        yield stage
        stage._commit(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class StagedBundle:
    """A bundle being written. Add files under ``path``; set ``manifest``; the context commits."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict = {}

    def _commit(self, dest: Path) -> None:
        files = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[p.relative_to(self.path).as_posix()] = file_record(p)
        manifest = {"schema_version": SCHEMA_VERSION, "created_by": f"rksmolvlm {__version__}",
                    "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **self.manifest, "files": files}
        from rksmolvlm.bundle.manifest import Manifest

        try:  # the writer and the only reader must agree
            Manifest.from_dict(manifest, self.path)
        except BundleError as exc:
            raise BundleError(f"internal: the manifest written does not read back: {exc}") from exc
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path / MANIFEST)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp made it private
        _fsync_dir(self.path)
        if dest.exists():
            old = dest.with_name(f"{_STAGING_PREFIX}{dest.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(self.path, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, dest)
        self.path = dest
        self.manifest = manifest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> "Manifest":
    """The bundle's typed manifest (every key checked); with ``verify`` also every file's size and sha256."""
    from rksmolvlm.bundle.manifest import Manifest

    manifest = Manifest.read(bundle)
    if verify:
        manifest.verify_files()
    return manifest
