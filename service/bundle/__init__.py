"""Model bundles: the manifest schema, sha256-verified loading, and the writer bundle builders call."""

from oodserve.bundle.loader import BundleError, VerifiedBundle, load_bundle
from oodserve.bundle.manifest import MANIFEST_FILE_NAME, SCHEMA_VERSION, Manifest
from oodserve.bundle.writer import sha256_bytes, sha256_file, write_bundle, write_calibration

__all__ = [
    "MANIFEST_FILE_NAME",
    "SCHEMA_VERSION",
    "BundleError",
    "Manifest",
    "VerifiedBundle",
    "load_bundle",
    "sha256_bytes",
    "sha256_file",
    "write_bundle",
    "write_calibration",
]
