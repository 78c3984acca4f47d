"""Prefect flows of bitnet-distill and their command line (``python -m flows --help``)."""

from .self_distill import self_distill
from .superposition import superposition_distill

FLOWS = {"superposition-distill": superposition_distill, "self-distill": self_distill}
