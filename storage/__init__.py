"""The pipeline's I/O layer: an artifact store over local disk or S3, content-addressed layout, token shards,
the Zarr teacher cache and checkpoints. Knows nothing of Prefect or of model internals; moves arrays and files.

Submodules: ``store``, ``layout``, ``fingerprint``, ``shards``, ``cache``, ``checkpoints`` (imported on use: the
cache pulls in zarr and torch, which a caller that only needs paths should not pay for).
"""

from . import layout
from .errors import IncompleteArtifactError, IntegrityError, StoreError
from .fingerprint import fingerprint
from .store import ArtifactStore

__all__ = ["ArtifactStore", "IncompleteArtifactError", "IntegrityError", "StoreError", "fingerprint", "layout"]
