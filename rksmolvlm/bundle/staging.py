"""The bundle: the only contract between the x86 host and the board.

A bundle is a directory with ``manifest.json`` and the files it lists (each with size and sha256).
It is written atomically: everything goes into a hidden temp directory beside the destination,
the manifest is written last, and the directory is renamed into place. A failed or interrupted
conversion removes the temp directory and leaves the destination as it was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rksmolvlm import __version__
from rksmolvlm.errors import BundleError
from rksmolvlm.bundle.manifest import MANIFEST, SCHEMA_VERSION, FileRecord, Manifest

__all__ = ["SCHEMA_VERSION", "MANIFEST", "staged_bundle", "read_manifest", "file_record", "file_table",
           "staging_dirs", "stamped", "check_reads_back"]

_STAGING_PREFIX = ".rksmolvlm-staging-"


def file_record(path: Path) -> dict:
    """``manifest.json``'s record of one file (size and sha256), as written."""
    return FileRecord.of(path.parent, path.name).to_dict()


def file_table(root: Path) -> dict[str, FileRecord]:
    """Every file under ``root`` but the manifest, by relative POSIX path, sorted."""
    return {p.relative_to(root).as_posix(): FileRecord.of(root, p.relative_to(root).as_posix())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")}


def stamped(manifest: Manifest, root: Path) -> Manifest:
    """``manifest`` as the bundle at ``root`` holds it now: this rksmolvlm's schema and name, and every file."""
    return dataclasses.replace(manifest, root=root, schema_version=SCHEMA_VERSION,
                               created_by=f"rksmolvlm {__version__}", files=file_table(root))


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
    """A bundle being written. Add files under ``path``; set ``manifest`` (its ``files`` are listed
    and its schema, name and time stamped at commit); the context commits."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: Manifest | None = None

    def _commit(self, dest: Path) -> None:
        if self.manifest is None:
            raise BundleError("internal: a bundle was staged without a manifest")
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest = dataclasses.replace(stamped(self.manifest, self.path), created_at=now)
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
        check_reads_back(manifest, text)
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(text, encoding="utf-8")
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
        self.manifest = dataclasses.replace(manifest, root=dest)


def check_reads_back(manifest: Manifest, text: str) -> None:
    """The writer and the only reader must agree: ``text`` (``manifest`` as JSON) reads back equal."""
    try:
        back = Manifest.from_dict(json.loads(text), manifest.root)
    except BundleError as exc:
        raise BundleError(f"internal: the manifest written does not read back: {exc}") from exc
    if back != manifest:
        differ = [f.name for f in dataclasses.fields(Manifest) if getattr(back, f.name) != getattr(manifest, f.name)]
        raise BundleError(f"internal: the manifest reads back different in {', '.join(differ)}: the record and its "
                          "to_dict/from_dict disagree")


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
    manifest = Manifest.read(bundle)
    if verify:
        manifest.verify_files()
    return manifest
