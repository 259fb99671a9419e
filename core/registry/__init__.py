"""Keel's model registry (SPEC 2.9): versions, lineage, aliases with history, verified artifacts."""

from core.registry.fingerprint import fingerprint_arrays, fingerprint_file
from core.registry.importers import CONVERTERS, WeightFileError, build_imported, import_weights
from core.registry.store import AliasEvent, ModelNotFoundError, ModelRegistry, ModelVersion, TamperedArtifactError

__all__ = [
    "CONVERTERS",
    "AliasEvent",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelVersion",
    "TamperedArtifactError",
    "WeightFileError",
    "build_imported",
    "fingerprint_arrays",
    "fingerprint_file",
    "import_weights",
]
