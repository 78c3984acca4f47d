"""Prefect flows of bitnet-distill and their command line (``python -m flows --help``)."""

import os

# Without a server configured, Prefect starts an embedded one and gives it 20 s by default; on a busy 2-core
# machine it can need more, and the run would fail before its first stage.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from .self_distill import self_distill
from .superposition import superposition_distill
from .user_errors import show_user_errors_without_traceback

show_user_errors_without_traceback()

FLOWS = {"superposition-distill": superposition_distill, "self-distill": self_distill}
