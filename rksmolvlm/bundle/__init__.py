"""The bundle: the only contract between the x86 host and the board.

``manifest`` holds the typed records that write and read ``manifest.json`` (each part's to_dict and
from_dict, its checks with it); ``goldens`` the format of the golden answers a bundle carries;
``staging`` writes a bundle directory atomically through ``Manifest.to_dict()`` and reads it back.
"""

from rksmolvlm.bundle.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from rksmolvlm.bundle.staging import file_record, file_table, read_manifest, staged_bundle, staging_dirs

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Manifest", "file_record", "file_table", "read_manifest", "staged_bundle",
           "staging_dirs"]
