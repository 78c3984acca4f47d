"""Shared test set-up. Everything runs on CPU with tiny models built from configs: no downloads."""

import logging
import os
import tempfile

# transformers' bitnet unpacking is wrapped in torch.compile: ~50 s to compile on 2 cores, instant when eager.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect: a throw-away home (no user profile or server leaks in), no telemetry.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)

from tests.fake_hub import fake_hub  # noqa: E402,F401  (a fixture: the Hub's API on 127.0.0.1)


def pytest_unconfigure(config):
    # Prefect stops a temporary server that a test started in this process (python -m flows run, in-process) from an
    # exit handler, after pytest has closed the capture stream its console handler writes to: that one log line has
    # nowhere to go, and its "--- Logging error ---" would only be noise after the summary
    logging.raiseExceptions = False
