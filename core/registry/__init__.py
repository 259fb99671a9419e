"""Keel's model registry (SPEC 2.9): versions, lineage, aliases with history, verified artifacts."""

from core.registry.fingerprint import fingerprint_arrays, fingerprint_file
from core.registry.store import AliasEvent, ModelNotFoundError, ModelRegistry, ModelVersion, TamperedArtifactError

__all__ = [
    "AliasEvent",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelVersion",
    "TamperedArtifactError",
    "fingerprint_arrays",
    "fingerprint_file",
]
