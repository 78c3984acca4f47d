"""Random access to training rows, whatever holds them (token shards in memory, the teacher cache on disk).

A ``Rows`` maps an array of row indices to a batch of CPU tensors; ``input_ids`` and ``attention_mask`` are
always present, teacher outputs (``hidden/layer_<i>``, ``topk_values``, ``topk_indices``) when cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rows:
    count: int
    fetch: Callable[[np.ndarray], dict[str, torch.Tensor]]
    chunk_size: int | None = None  # rows stored together: shuffling stays within chunks for locality

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """In order, for evaluation."""
        end = self.count if limit is None else min(limit, self.count)
        for start in range(0, end, batch_size):
            yield self.fetch(np.arange(start, min(start + batch_size, end)))


def rows_from_arrays(input_ids: np.ndarray, lengths: np.ndarray) -> Rows:
    """Rows from tokenized shards held in memory (int32 ids; the mask is derived from the lengths)."""
    positions = np.arange(input_ids.shape[1])

    def fetch(index: np.ndarray) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(input_ids[index].astype(np.int64)),
                "attention_mask": torch.from_numpy((positions[None, :] < lengths[index, None]).astype(np.int64))}

    return Rows(len(input_ids), fetch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
