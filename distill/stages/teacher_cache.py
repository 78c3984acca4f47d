"""The teacher_cache stage: one batched no-grad forward pass of the teacher over the token rows, writing the chosen
hidden states (and optionally the top-k logits) into the Zarr teacher cache (``storage/cache_*.py``), chunk by chunk.

A chunk is one forward batch. The writer compresses and writes in background threads, so the teacher never waits
on I/O; a rerun after a crash computes only the chunks that are not recorded complete. Both splits are cached:
train for the student, eval (``cache.eval_samples`` rows) for the held-out loss logged while training from the
cache.
"""

from __future__ import annotations

import gc
import zlib
from collections.abc import Callable

import numpy as np
import torch

from bitnet.losses import draw_tokens, sampled_kl, sparse_topk_kl
from storage.cache import TeacherCacheReader, TeacherCacheSpec, TeacherCacheWriter
from storage.cache_spec import LOGIT_ARRAYS, recorded_chunks

from ..config import ConfigError, PipelineConfig
from ..progress import logger
from ..rows import token_rows
from ..stage import Context, Manifest, Preflight, Shard, Split, Stage
from ..teacher import TeacherFacts, resolve_layers
from .tokenize import TokenizeManifest


class _LazyForward:
    """The teacher's forward pass, its weights loaded on the first call (a rerun with nothing missing, or a stage
    whose shards ran elsewhere, loads none)."""

    def __init__(self, ctx: Context):
        self.ctx, self.forward = ctx, None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        if self.forward is None:
            model = self.ctx.teacher.load(self.ctx.device)
            layers = resolve_layers(self.ctx.config.cache.layers, model.config.num_hidden_layers)
            cache = self.ctx.config.cache
            self.forward = TeacherForward(model, layers, cache.topk, log=self.ctx.reporter.log, logits=cache.logits)
        return self.forward(ids.to(self.ctx.device), mask.to(self.ctx.device), seed)

    def release(self) -> None:
        """Free the teacher's memory, on the device too."""
        if self.forward is not None:
            self.forward = None
            gc.collect()
            if self.ctx.device.type == "cuda":
                torch.cuda.empty_cache()


class TeacherCacheManifest(Manifest):
    layers: list[int]
    hidden_size: int
    vocab_size: int  # what the student's vocabulary must cover: the teacher's output embedding's rows
    topk: int
    dtype: str
    splits: dict[str, Split]
    logits: str = "topk"  # how the topk logits per position were chosen (cache.logits)

    def logit_arrays(self) -> list[str]:
        """The arrays of the cached teacher logits (``cached_logits_kl`` reads them)."""
        return list(LOGIT_ARRAYS[self.logits]) if self.topk else []

    def parts(self) -> list[str]:
        return [split.path for split in self.splits.values()]


class TeacherCache(Stage):
    name = "teacher_cache"
    Manifest = TeacherCacheManifest
    shared = True
    checksummed = False  # every chunk has a record with its checksums (storage/cache_writer.py)

    def check(self, pre: Preflight) -> None:
        cfg = pre.config
        pre.teacher.check_4bit_loading()
        resolve_layers(cfg.cache.layers, pre.facts.num_hidden_layers)
        if cfg.cache.topk > pre.facts.vocab_size:
            raise ConfigError(f"cache.topk {cfg.cache.topk} exceeds the teacher's {pre.facts.vocab_size} logits per "
                              f"token; use cache.topk <= {pre.facts.vocab_size} (the quickstart caches 32), or 0")

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {"teacher": teacher.identity, "compute_dtype": teacher.compute_dtype,
                "load_in_4bit": cfg.teacher.load_in_4bit, "cache": cfg.cache.fingerprinted()}

    def resumes(self, cfg: PipelineConfig, store, path: str) -> str | None:
        cached = {split: len(recorded_chunks(store, f"{path}/{split}")) for split in ("train", "eval")}
        return ", ".join(f"{n} {split} chunks cached" for split, n in cached.items()) if any(cached.values()) else None

    def specs(self, ctx: Context, tokens: TokenizeManifest) -> dict[str, TeacherCacheSpec]:
        """What each split's cache holds, from the configuration and the teacher's config (no weights)."""
        cfg, text = ctx.config, ctx.teacher.text_config
        layers = resolve_layers(cfg.cache.layers, text.num_hidden_layers)
        limits = {"train": cfg.cache.max_samples, "eval": cfg.cache.eval_samples}
        return {split: TeacherCacheSpec(
            num_samples=min(tokens.splits[split].rows, limit or tokens.splits[split].rows), seq_len=cfg.data.seq_len,
            layers=layers, hidden_size=text.hidden_size, dtype=cfg.cache.dtype, codec=cfg.cache.codec,
            topk_codec=cfg.cache.topk_codec, chunk_size=cfg.cache.batch_size, topk=cfg.cache.topk,
            logits=cfg.cache.logits,
            fingerprint=ctx.fingerprint) for split, limit in limits.items()}

    def shards(self, ctx: Context, workers: int, tokens: TokenizeManifest) -> list[Shard]:
        """Each split's chunks cut into ``workers`` ranges of whole chunks (fewer where a split has fewer chunks),
        each for a process of its own, writing only its own chunks; the ranges that still miss a chunk (a rerun
        hands out only the work that is left)."""
        shards = []
        for split, spec in self.specs(ctx, tokens).items():
            recorded = recorded_chunks(ctx.store, f"{ctx.path}/{split}")
            bounds = np.linspace(0, spec.num_chunks, min(workers, spec.num_chunks) + 1).round().astype(int).tolist()
            shards += [Shard(split=split, start=start, stop=stop) for start, stop in zip(bounds, bounds[1:])
                       if not set(range(start, stop)) <= recorded]
        return shards

    def run_shard(self, ctx: Context, shard: Shard, tokens: TokenizeManifest) -> int:
        """Cache the missing chunks of one shard; how many it wrote. The teacher is loaded only if one is missing,
        and freed when the shard is done (a worker process may take another shard next)."""
        forward = _LazyForward(ctx)
        try:
            return self._fill(ctx, tokens, shard.split, self.specs(ctx, tokens)[shard.split], forward,
                              range(shard.start, shard.stop))
        finally:
            forward.release()

    def run(self, ctx: Context, tokens: TokenizeManifest) -> TeacherCacheManifest:
        specs, forward = self.specs(ctx, tokens), _LazyForward(ctx)
        try:  # whatever shard workers left missing (everything, when none ran), then each split is finished
            for split, spec in specs.items():
                self._fill(ctx, tokens, split, spec, forward)
        finally:
            forward.release()
        text = ctx.teacher.text_config
        return ctx.manifest(TeacherCacheManifest, self.name, layers=specs["train"].layers,
                            hidden_size=text.hidden_size, vocab_size=text.vocab_size, topk=ctx.config.cache.topk,
                            logits=ctx.config.cache.logits,
                            dtype=ctx.config.cache.dtype,
                            splits={split: Split(path=f"{ctx.path}/{split}", rows=spec.num_samples,
                                                 chunks=spec.num_chunks) for split, spec in specs.items()})

    def _fill(self, ctx: Context, tokens: TokenizeManifest, split: str, spec: TeacherCacheSpec, forward,
              chunks: range | None = None) -> int:
        """Write the missing chunks of ``split`` (of ``chunks`` only, as one shard writer); how many."""
        rows = token_rows(ctx.store, tokens, split)
        with TeacherCacheWriter(ctx.store, f"{ctx.path}/{split}", spec, chunks=chunks,
                                on_wait=ctx.reporter.log) as writer:
            missing = writer.missing_chunks()
            total = len(chunks) if chunks is not None else spec.num_chunks
            label = f" {chunks.start}-{chunks.stop - 1}" if chunks is not None else ""
            ctx.reporter.start(total, f"cache teacher ({split}{label})", initial=total - len(missing))
            for chunk in missing:
                batch = rows.fetch(np.arange(*spec.chunk_rows(chunk)))
                ids, mask = batch["input_ids"], batch["attention_mask"]
                # sampled logits are drawn with a seed of the chunk's own, so that a resumed or sharded cache
                # draws what one run would have (on the same kind of device)
                outputs = forward(ids, mask, seed=zlib.crc32(f"{split}/{chunk}".encode()))
                # the writer converts to the stored dtypes on the device and copies to the host asynchronously
                writer.write_chunk(chunk, {"input_ids": ids, "attention_mask": mask, **outputs})
                ctx.reporter.advance(1)
            ctx.reporter.close()
        return len(missing)

    def verify(self, ctx: Context, manifest: TeacherCacheManifest, repair: bool) -> list[str]:
        """Every chunk of both splits against its record; ``repair`` forgets the damaged chunks, so that the next
        run rewrites exactly those."""
        problems = []
        for split in manifest.splits.values():
            report = TeacherCacheReader(ctx.store, split.path, fingerprint=manifest.fingerprint).verify(repair=repair)
            if not report.ok:
                problems.append(str(report))
        if problems and repair:
            ctx.store.unmark_complete(manifest.path)
        return problems


def cached_logits_kl(student_logits: torch.Tensor, batch: dict, mask: torch.Tensor, temperature: float = 1.0
                     ) -> torch.Tensor:
    """KL of the student's logits to the teacher's cached ones in ``batch``, whichever way they were cached
    (``cache.logits``: the top-k's renormalised KL, or the sampled tokens' at temperature 1)."""
    if "sampled_counts" in batch:
        return sampled_kl(student_logits, batch["sampled_counts"], batch["sampled_indices"], mask)
    return sparse_topk_kl(student_logits, batch["topk_values"], batch["topk_indices"], mask, temperature)


# Logits per block of the top-k. On a CPU, 2^21 (8 MB of float32: 512 rows at a 4096-token vocabulary) stay in its
# caches until topk reads them; a GPU wants fewer, larger kernels. But every block streams the whole output
# embedding again, so one too large for the caches gets at least 1024 rows per block, which keeps it near the speed
# of the whole logits' top-k (docs/RESULTS.md, "Teacher cache"; bench/topk_blocks.py).
TOPK_BLOCK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}
LARGE_HEAD_BYTES, LARGE_HEAD_MIN_ROWS = 32 << 20, 1024


def topk_block_rows(head: torch.Tensor) -> int:
    """Rows of logits per block of the top-k, for the output embedding's weight ``head`` [vocab, hidden]."""
    budget = TOPK_BLOCK_ELEMENTS.get(head.device.type, TOPK_BLOCK_ELEMENTS["cuda"])
    least = LARGE_HEAD_MIN_ROWS if head.numel() * head.element_size() > LARGE_HEAD_BYTES else 1
    return max(least, budget // head.shape[0])


class TeacherForward:
    """The cache stage's forward pass of the teacher: the chosen hidden states (``hidden/layer_<i>``) and, with
    ``topk``, that many logits of every position: the largest (``topk_values`` float16, ``topk_indices`` int32) or,
    with ``logits="sampled"``, draws from the teacher's distribution (``sampled_counts`` uint8, ``sampled_indices``
    int32: ``bitnet.losses.draw_tokens``), from a generator seeded with the call's ``seed``.

    The output embedding and the top-k (or the draws) run fused, block by block of rows of the last hidden state, so
    the [batch, seq, vocab] logits never exist: the same values for less time (docs/RESULTS.md, "Teacher cache") and
    gigabytes less memory with a 150k vocabulary. Without ``topk`` the output
    embedding is skipped altogether. That is only right where the model's logits are its output embedding of its
    last hidden state, so the first row of the first batch runs both ways and compares (``fused`` says how it went):
    a model that post-processes its logits (Gemma's soft-capping, Cohere's logit scale) keeps computing its full
    logits.
    """

    def __init__(self, model, layers: list[int], topk: int = 0, log: Callable[[str], None] = logger.info,
                 logits: str = "topk"):
        self.model, self.layers, self.topk, self.log, self.logits = model, layers, topk, log, logits
        self.fused: bool | None = None  # decided by the first call
        self.block_rows = topk_block_rows(model.get_output_embeddings().weight)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      use_cache=False)  # no KV cache to build and fill: nothing here generates
        if self.fused is None:  # probed on the first row: the whole logits of one row cost little memory
            self.fused = self._fused_matches(dict(kwargs, input_ids=input_ids[:1], attention_mask=attention_mask[:1]))
        reduce = self._largest
        if self.logits == "sampled":
            generator = torch.Generator(input_ids.device).manual_seed(seed)
            reduce = lambda block: draw_tokens(block, self.topk, generator)  # noqa: E731
        hidden, kept = self._fused(kwargs, reduce) if self.fused else self._full_logits(kwargs, reduce)
        if kept is None:
            return hidden
        weights, indices = LOGIT_ARRAYS[self.logits]
        return {**hidden, weights: kept[0].half() if self.logits == "topk" else kept[0], indices: kept[1].int()}

    def _largest(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(block.topk(self.topk, dim=-1))

    def _hidden(self, out) -> dict[str, torch.Tensor]:
        return {f"hidden/layer_{i}": out.hidden_states[i] for i in self.layers}

    def _full_logits(self, kwargs: dict, reduce: Callable):
        """The model's own forward: what the fused path must reproduce."""
        out = self.model(**kwargs)
        hidden = self._hidden(out)
        if not self.topk:
            return hidden, None
        shape = (*out.logits.shape[:2], self.topk)
        return hidden, tuple(t.view(shape) for t in reduce(out.logits.flatten(0, 1)))

    def _fused(self, kwargs: dict, reduce: Callable):
        out = self.model.base_model(**kwargs)
        hidden = self._hidden(out)
        if not self.topk:
            return hidden, None
        last = out.last_hidden_state
        head = self.model.get_output_embeddings()
        blocks = [reduce(head(rows)) for rows in last.flatten(0, 1).split(self.block_rows)]
        shape = (*last.shape[:2], self.topk)
        return hidden, (torch.cat([v for v, _ in blocks]).view(shape), torch.cat([i for _, i in blocks]).view(shape))

    def _fused_matches(self, kwargs: dict) -> bool:
        """Whether the fused path computes the model's own logits, on the top-k of either (sampled or not)."""
        own = self._full_logits(kwargs, self._largest)
        try:
            fused = self._fused(kwargs, self._largest)
        except Exception as exc:  # e.g. a base model without last_hidden_state: the model's own forward stays
            self.log(f"teacher cache: the cached logits come from the full logits (the block-wise path failed: "
                     f"{type(exc).__name__}: {exc})")
            return False
        # Compared in the computing dtype, before rounding to float16; the top-k values (sorted) do not depend on
        # how ties are ordered, the indices would.
        pairs = {**{name: (fused[0][name], value) for name, value in own[0].items()},
                 **({"top-k logits": (fused[1][0], own[1][0])} if self.topk else {})}
        mismatched = [name for name, (a, b) in pairs.items() if not _close(a, b)]
        if mismatched:
            self.log("teacher cache: the teacher's logits are not its output embedding of its last hidden state "
                     f"({', '.join(mismatched)} differ: logit soft-capping or scaling?), so the cached logits come "
                     "from its full logits")
        return not mismatched


def _close(fused: torch.Tensor, own: torch.Tensor) -> bool:
    """Equal up to a few roundings of the computing dtype (kernels may block a matmul differently by shape)."""
    if fused.shape != own.shape:
        return False
    fused, own, eps = fused.float(), own.float(), torch.finfo(own.dtype).eps
    return bool(((fused - own).abs() <= 4 * eps * own.abs().amax()).all())
