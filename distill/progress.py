"""How long-running stages report progress: a terminal progress bar by default.

Stages take a ``Reporter``; the Prefect tasks pass a subclass that also updates progress artifacts, so this
package never imports Prefect.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("bitnet_distill")


class Reporter:
    def __init__(self):
        self._bar: tqdm | None = None

    def start(self, total: int | None, description: str, initial: int = 0) -> None:
        """Begin a bar of ``total`` units (``None``: unknown, the bar just counts)."""
        self.close()
        self._bar = tqdm(total=total, initial=initial, desc=description, file=sys.stderr, dynamic_ncols=True,
                         disable=None)  # disabled automatically when stderr is not a terminal

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def log(self, message: str, level: int = logging.INFO) -> None:
        logger.log(level, message)
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Silent(Reporter):
    """Reports nothing: the ranks but the first of a distributed training, whose progress rank 0 reports."""

    def start(self, total: int | None, description: str, initial: int = 0) -> None:
        pass

    def log(self, message: str, level: int = logging.INFO) -> None:
        pass
