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
from typing import Iterator

from rksmolvlm import __version__
from rksmolvlm.errors import BundleError

__all__ = ["SCHEMA_VERSION", "MANIFEST", "REQUIRED_KEYS", "staged_bundle", "read_manifest",
           "verify_files", "file_record", "staging_dirs"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_STAGING_PREFIX = ".rksmolvlm-staging-"
REQUIRED_KEYS = ("schema_version", "created_by", "source", "model", "target", "toolkits", "min_runtime",
                 "vision", "processor", "tokens", "chat_template", "files")


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
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise BundleError(f"internal: manifest lacks {', '.join(missing)}")
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


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> dict:
    """Load and check ``manifest.json``; with ``verify`` also check every file's size and sha256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}): convert a checkpoint first with "
                          "'rksmolvlm convert MODEL -o BUNDLE'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): the bundle is damaged, convert it again") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{root} has bundle schema {version!r}, this rksmolvlm reads schema {SCHEMA_VERSION}: "
                          "convert the checkpoint again with this version, or install the matching rksmolvlm")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}: the bundle is damaged, convert it again")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Raise BundleError naming every file that is missing or whose size/sha256 differ."""
    from rksmolvlm.hashing import sha256_file

    problems = []
    for name, record in manifest["files"].items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != record["size"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, manifest says {record['size']}")
        elif sha256_file(p) != record["sha256"]:
            problems.append(f"{name} sha256 differs from the manifest")
    if problems:
        raise BundleError(f"bundle {root} failed verification: {'; '.join(problems)}. "
                          "Copy the bundle again (e.g. rsync -a) or convert it again")
