"""The storage package's exceptions. Every message names the URL involved and what to do about it."""


class StoreError(RuntimeError):
    """The artifact store cannot be used as asked (bad URL, unreachable, no credentials, read-only, disk full...)."""


class IncompleteArtifactError(StoreError, FileNotFoundError):
    """An artifact has no completion marker: it was never finished, or a crash interrupted it."""


class IntegrityError(StoreError):
    """Stored bytes do not match the checksum recorded when they were written."""
