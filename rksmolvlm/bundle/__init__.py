"""The bundle: the only contract between the x86 host and the board.

``manifest`` holds the typed records that write and read ``manifest.json``; ``staging`` writes a
bundle directory atomically and reads it back.
"""

from rksmolvlm.bundle.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from rksmolvlm.bundle.staging import file_record, read_manifest, staged_bundle, staging_dirs

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Manifest", "file_record", "read_manifest", "staged_bundle", "staging_dirs"]
