"""Prefect flows of bitnet-distill and their command line (``python -m flows --help``)."""

import os

# Without a server configured, Prefect starts an embedded one and gives it 20 s by default; on a busy 2-core
# machine it can need more, and the run would fail before its first stage.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from .self_distill import self_distill
from .superposition import superposition_distill

FLOWS = {"superposition-distill": superposition_distill, "self-distill": self_distill}
