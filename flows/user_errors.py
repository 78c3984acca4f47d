"""Errors that are the user's to fix, and how they are shown: one line, without a traceback.

Their messages already name the problem and the fix (a bad configuration value, an unusable artifact store, a cache
locked by another run, a run stopped by a signal, a training run whose loss diverged, a configured Prefect server
that does not answer). Prefect logs every exception that ends a flow or task run with its traceback, to the console
and to the UI's log; for these errors that traceback only buries the message. The state message of the run, and the
exception a caller of the flow receives, stay as they are.
"""

from __future__ import annotations

import logging

from distill.config import ConfigError
from distill.loop import TrainingDiverged, TrainingFailed, TrainingInterrupted
from storage import StoreError
from storage.lease import LockedError

from .temporary_server import ServerUnreachable

USER_ERRORS = (ConfigError, StoreError, LockedError, TrainingInterrupted, TrainingDiverged, TrainingFailed,
               ServerUnreachable)

# Prefect's loggers for flow and task runs (prefect.logging.loggers.flow_run_logger / task_run_logger)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class WithoutTraceback(logging.Filter):
    """Drops the traceback from a log record whose exception is a user error, and keeps the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def show_user_errors_without_traceback() -> None:
    """Install ``WithoutTraceback`` on Prefect's run loggers (idempotent)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, WithoutTraceback) for f in logger.filters):
            logger.addFilter(WithoutTraceback())
