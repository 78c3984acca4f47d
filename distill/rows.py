"""Random access to training rows, whatever holds them: the token shards (read whole into memory: token ids are
small) or the teacher cache (read lazily, chunk by chunk).

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
    """Rows from token ids held in memory (int32 ids; the mask is derived from the lengths)."""
    positions = np.arange(input_ids.shape[1])

    def fetch(index: np.ndarray) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(input_ids[index].astype(np.int64)),
                "attention_mask": torch.from_numpy((positions[None, :] < lengths[index, None]).astype(np.int64))}

    return Rows(len(input_ids), fetch)


def token_rows(store, tokens, split: str) -> Rows:
    """Every row of one split of the tokenize stage's output (``tokens``, its manifest)."""
    from storage import shards

    table = shards.read_token_shards(store, tokens.splits[split].path)
    return rows_from_arrays(table["input_ids"], table["length"])


def cached_rows(store, cache, split: str, arrays: list[str] | None = None) -> Rows:
    """One split of the teacher cache (``cache``, the teacher_cache stage's manifest): the token ids, the mask and
    ``arrays`` (default: every cached array; the others are never read or decoded)."""
    from storage.cache import TeacherCacheReader

    wanted = None if arrays is None else ["input_ids", "attention_mask", *arrays]
    reader = TeacherCacheReader(store, cache.splits[split].path, fingerprint=cache.fingerprint, arrays=wanted)

    def fetch(index: np.ndarray) -> dict[str, torch.Tensor]:
        batch = reader.get_batch(index)
        batch["attention_mask"] = batch["attention_mask"].long()
        batch["input_ids"] = batch["input_ids"].long()
        return batch

    return Rows(len(reader), fetch, chunk_size=reader.spec.chunk_size)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
