"""The cache-teacher stage: one batched no-grad forward pass of the teacher over the tokenized rows, writing the
chosen hidden states (and optional top-k logits) into the Zarr teacher cache, chunk by chunk.

A chunk is one forward batch. The writer compresses and writes in a background thread, so the teacher never waits
on I/O; a rerun after a crash computes only the chunks that are not recorded complete. Both splits are cached:
train for the student, eval (``cache.eval_samples`` rows) for the held-out loss logged while training from the
cache.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from storage.cache import TeacherCacheSpec, TeacherCacheWriter

from .artifacts import stage_finished
from .data import load_split
from .teacher import TeacherForward, load_teacher, resolve_device, resolve_dtype, resolve_layers


def run_cache_teacher(cfg, store, stage: dict, reporter, tokens: dict) -> dict:
    path = stage["path"]
    if stage_finished(store, path):
        return store.read_manifest(path)
    store.unmark_complete(path)  # if a split was reopened (a repair): its writer rewrites just its missing chunks
    device = resolve_device(cfg.teacher.device)
    model = load_teacher(cfg.teacher, device, resolve_dtype(cfg.teacher.dtype, device))
    layers = resolve_layers(cfg.cache.layers, model.config.num_hidden_layers)
    vocab_size = model.get_output_embeddings().weight.shape[0]  # what the student's vocabulary must cover
    forward = TeacherForward(model, layers, cfg.cache.topk, log=reporter.log)
    splits = {}
    for split, limit in (("train", cfg.cache.max_samples), ("eval", cfg.cache.eval_samples)):
        rows = load_split(store, tokens, split)
        count = min(rows.count, limit or rows.count)
        spec = TeacherCacheSpec(num_samples=count, seq_len=cfg.data.seq_len, layers=layers,
                                hidden_size=model.config.hidden_size, dtype=cfg.cache.dtype, codec=cfg.cache.codec,
                                topk_codec=cfg.cache.topk_codec, chunk_size=cfg.cache.batch_size, topk=cfg.cache.topk,
                                fingerprint=stage["fingerprint"])
        with TeacherCacheWriter(store, f"{path}/{split}", spec, on_wait=reporter.log) as writer:
            missing = writer.missing_chunks()
            reporter.start(spec.num_chunks, f"cache teacher ({split})", initial=spec.num_chunks - len(missing))
            for chunk in missing:
                batch = rows.fetch(np.arange(chunk * spec.chunk_size, min((chunk + 1) * spec.chunk_size, count)))
                ids, mask = batch["input_ids"], batch["attention_mask"]
                outputs = forward(ids.to(device), mask.to(device))
                # the writer converts to the stored dtypes on the device and copies to the host asynchronously
                writer.write_chunk(chunk, {"input_ids": ids, "attention_mask": mask, **outputs})
                reporter.advance(1)
            reporter.close()
        splits[split] = {"path": f"{path}/{split}", "rows": count, "chunks": spec.num_chunks}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    manifest = {"stage": "cache_teacher", "fingerprint": stage["fingerprint"], "path": path, "layers": layers,
                "hidden_size": spec.hidden_size, "vocab_size": vocab_size, "topk": cfg.cache.topk, "dtype": cfg.cache.dtype, "splits": splits}
    store.mark_complete(path, manifest)
    return manifest


def cached_rows(store, cache: dict, split: str, fingerprint: str, arrays: list[str] | None = None):
    """The teacher cache of one split as ``Rows`` (read lazily, chunk by chunk): the token ids, the mask and
    ``arrays`` (default: every cached array; the others are never read or decoded)."""
    from storage.cache import TeacherCacheReader

    from .rows import Rows

    wanted = None if arrays is None else ["input_ids", "attention_mask", *arrays]
    reader = TeacherCacheReader(store, cache["splits"][split]["path"], fingerprint=fingerprint, arrays=wanted)

    def fetch(index: np.ndarray) -> dict[str, torch.Tensor]:
        batch = reader.get_batch(index)
        batch["attention_mask"] = batch["attention_mask"].long()
        batch["input_ids"] = batch["input_ids"].long()
        return batch

    return Rows(len(reader), fetch, chunk_size=reader.spec.chunk_size)
