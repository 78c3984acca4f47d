"""The training loop every trainer shares.

AdamW (or torchao's 8-bit AdamW) with linear warm-up then cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA, dynamic loss scaling for models that compute in float16, periodic evaluation, and checkpoints
(every N steps and on SIGTERM / SIGINT) that make a killed run resume where it stopped: trainable tensors, optimiser,
scheduler and loss-scaler state, RNG states, the step and the loss history. Batches are a pure function of the
micro-step (``BatchSchedule``), so the data position is just the step, and a resumed run on CPU reproduces an
uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from storage import checkpoints, layout
from storage.tensors import write_tensors

from .config import OptimConfig
from .device import native_bf16
from .optim import make_optimizer
from .progress import Reporter, Silent
from .rows import Rows
from .stage import Context, Manifest


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchSchedule:
    """Which rows make up micro-batch ``i``: a pure function of ``(seed, i)``.

    Every epoch visits the chunks (runs of ``chunk_size`` rows, as stored) in a random order and the rows
    within each chunk in a random order, which keeps reads local while shuffling well enough for training.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, chunk_size: int | None = None):
        if num_rows <= 0:
            raise ValueError("there are no rows to train on: the tokenized split is empty (more data, or shorter "
                             "data.seq_len)")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.chunk_size = chunk_size or num_rows
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            starts = np.arange(0, self.num_rows, self.chunk_size)
            parts = [s + rng.permutation(min(self.chunk_size, self.num_rows - s)) for s in rng.permutation(starts)]
            self._epoch, self._order = epoch, np.concatenate(parts)
        return self._order

    def indices(self, micro_step: int) -> np.ndarray:
        start = micro_step * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.num_rows):
            here = positions // self.num_rows == epoch
            out[here] = self._epoch_order(int(epoch))[positions[here] % self.num_rows]
        return out


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of this process in torch.distributed's default group (Ray Train and torchrun set one
    up); ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ScheduledBatches:
    """The training batches of ``rows`` by micro-step (a ``BatchSchedule``), read ``ahead`` steps in advance.

    Batches are a pure function of the step, so reading ahead changes only *when* a batch is read: decoding the
    teacher cache overlaps the training step instead of preceding it (on a GPU a step can be shorter than the
    decode). Indices are computed on the caller's thread (the schedule is not thread-safe); only ``rows.fetch``
    runs on the background threads. A step that was not read ahead (the first, a resumed run) is read at once.

    Under torch.distributed each rank reads its own contiguous slice of every global batch, so that the global batch,
    and with it the run, is that of one process: only where each rank's rows come from changes.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, ahead: int = 2):
        self.rows, self.ahead = rows, ahead
        self.schedule = BatchSchedule(rows.count, batch_size, seed, rows.chunk_size)
        rank, world = process_group()
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} rows does not split evenly over {world} workers")
        per_rank = batch_size // world
        self._slice = slice(rank * per_rank, (rank + 1) * per_rank)
        self._pool = ThreadPoolExecutor(max_workers=max(1, ahead), thread_name_prefix="batch-read-ahead")
        self._pending: dict[int, Future] = {}

    def _read(self, micro_step: int) -> Future:
        return self._pool.submit(self.rows.fetch, self.schedule.indices(micro_step)[self._slice])

    def __call__(self, micro_step: int) -> dict[str, torch.Tensor]:
        current = self._pending.pop(micro_step, None) or self._read(micro_step)
        self._pending = {s: f for s, f in self._pending.items() if s > micro_step}  # a jump back drops the rest
        for later in range(micro_step + 1, micro_step + 1 + self.ahead):
            if later not in self._pending:
                self._pending[later] = self._read(later)
        return current.result()


@dataclass
class Trainable:
    """What a trainer hands to ``train``."""

    parameters: list[nn.Parameter]
    loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]  # micro-step -> (loss, metrics to log)
    state: Callable[[], dict[str, torch.Tensor]]  # tensors that define the trained model
    load_state: Callable[[dict[str, torch.Tensor]], None]
    evaluate: Callable[[], dict[str, float]] | None = None
    # float16 turns on dynamic loss scaling: without it the gradients flowing back through fp16 activations sink
    # below fp16's normal range, losing precision, the more so as the student nears the teacher (docs/RESULTS.md,
    # "float16 gradients")
    compute_dtype: torch.dtype = torch.float32
    # FSDP2 (fully_shard) holds its parameters: each rank keeps a shard of them, their gradients and optimiser
    # state, and the whole of a tensor exists only when gathered (forward, backward, checkpoints)
    sharded: bool = False


class TrainingInterrupted(RuntimeError):
    """Raised after a checkpoint was written in response to SIGTERM / SIGINT."""


class TrainingFailed(RuntimeError):
    """A training worker failed; the message names it and the checkpoint a rerun resumes from."""


class TrainingDiverged(RuntimeError):
    """Raised before the weights take a non-finite loss (or float16 gradients that overflow at any scale), so that
    a diverged run fails with the reason instead of finishing, exporting and reporting NaN weights."""


def _diverged(description: str, what: str, step: int, saved: int | None, lr: float, float16: bool) -> TrainingDiverged:
    kept = f"the last checkpoint, step {saved}, is intact" if saved else "no checkpoint was written"
    fix = "set teacher.dtype: bfloat16 or float32 (the model computes in float16), or lower" if float16 else "lower"
    return TrainingDiverged(f"{description}: {what} at step {step}; training stopped before the weights took it "
                            f"({kept}): {fix} the learning rate (now {lr:g})")


@contextmanager
def _checkpoint_on_signal():
    """Turn SIGTERM / SIGINT into a flag the loop checks after each step (main thread only)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng/cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


def training_autocast(device: torch.device, optim: OptimConfig, reporter: Reporter, description: str):
    """bf16 autocast on a CUDA GPU with ``train.autocast_bf16``, where the GPU computes bf16 natively; on an older
    GPU (a V100, a T4) emulated bf16 would run far slower than fp32, so training runs without it and says so."""
    if device.type != "cuda" or not optim.autocast_bf16:
        return nullcontext()
    if not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        reporter.log(f"{description}: this GPU (compute capability {major}.{minor}) has no native bf16: training "
                     "without bf16 autocast (teacher.dtype: float16 computes in fp16, with loss scaling)",
                     logging.WARNING)
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


class _NonFiniteGradients(Exception):
    def __init__(self, norm: float):
        self.norm = norm


def _update(optimizer, scaler: torch.amp.GradScaler, parameters: list[nn.Parameter], grad_clip: float) -> dict:
    """Apply the accumulated gradients: unscaled, clipped, then stepped, unless they overflowed (with scaling on, the
    scaler then skips the step and halves its scale; without it, ``_NonFiniteGradients`` is raised before the step:
    a finite loss can still have an infinite gradient, which would turn the weights into NaN). Returns what the
    step's record keeps of it."""
    record = {}
    scaler.unscale_(optimizer)  # clipping sees the true gradients (a no-op without scaling)
    if grad_clip or not scaler.is_enabled():
        norm = (nn.utils.clip_grad_norm_(parameters, grad_clip) if grad_clip
                else nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]))
        record["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: a DTensor
        if not scaler.is_enabled() and not math.isfinite(record["grad_norm"]):
            raise _NonFiniteGradients(record["grad_norm"])
    scaler.step(optimizer)
    if scaler.is_enabled():
        record["loss_scale"] = scaler.get_scale()
        scaler.update()
        record["skipped"] = float(scaler.get_scale() < record["loss_scale"])
        if record["skipped"]:
            record.pop("grad_norm", None)  # inf: the overflow that skipped the step, not a gradient's norm
    return record


def train(trainable: Trainable, optim: OptimConfig, store, checkpoint_dir: str, reporter: Reporter,
          device: torch.device, description: str = "train", lock=None) -> list[dict]:
    """Run ``optim.steps`` optimiser steps, resuming from the latest checkpoint under ``checkpoint_dir`` if there is
    one; returns the loss history (one record per step). ``lock``, the stage's, must still be held before each
    checkpoint is written (on an object store a lease can be lost to another run).

    Under torch.distributed (``process_group``), every rank trains on its slice of each global batch, the gradients
    and the logged losses are averaged over the ranks before the step (so every rank takes the same step, as DDP
    would), and rank 0 alone evaluates, reports and writes checkpoints; every rank resumes from the same one."""
    rank, world = process_group()
    if rank:
        reporter = Silent()
    optimizer = make_optimizer(trainable.parameters, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.warmup_steps, optim.steps, optim.min_lr_ratio))
    if optim.warmup_steps > optim.steps:
        reporter.log(f"{description}: warmup_steps {optim.warmup_steps} > steps {optim.steps}: the learning rate "
                     f"rises for the whole run and never reaches its peak {optim.lr:g}; lower train.warmup_steps",
                     logging.WARNING)
    # GradScaler: the loss is multiplied by a scale that halves whenever a step's gradients overflow (that step is
    # skipped) and doubles after 2000 clean steps; gradients are divided by it before clipping and the update
    scaler = torch.amp.GradScaler(device.type, enabled=trainable.compute_dtype == torch.float16)
    step, history = 0, []
    latest = checkpoints.latest_checkpoint(store, checkpoint_dir)
    if latest is not None:
        tensors, meta = checkpoints.load_checkpoint(store, latest)
        state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        trainable.load_state(_sharded_like(state, trainable.state()) if trainable.sharded else state)
        optimizer.load_state_dict(meta["optimizer"])
        if trainable.sharded:
            _shard_optimizer_state(optimizer)
        scheduler.load_state_dict(meta["scheduler"])
        if scaler.is_enabled() and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        _restore_rng(tensors)
        step, history = meta["step"], meta["history"]
        reporter.log(f"{description}: resuming from step {step} ({latest})")
    saved = step or None

    def save() -> None:
        """Rank 0 writes the checkpoint; a sharded run's ranks all gather its tensors first. A checkpoint holds
        whole tensors, so any number of workers resumes it."""
        nonlocal saved
        model, optimizer_state = trained_state(trainable), _gathered(optimizer.state_dict())
        if rank:
            return
        if lock is not None:
            lock.ensure_held()  # on an object store: never write after losing the lease to another run
        tensors = {f"model/{k}": v for k, v in model.items()} | _rng_state()
        meta = {"step": step, "history": history, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
        if scaler.is_enabled():
            meta["scaler"] = scaler.state_dict()
        checkpoints.save_checkpoint(store, checkpoint_dir, step, tensors, meta, keep_last=optim.keep_checkpoints)
        saved = step

    autocast = training_autocast(device, optim, reporter, description)
    if scaler.is_enabled():
        reporter.log(f"{description}: the model computes in float16: dynamic loss scaling on (from "
                     f"{scaler.get_scale():g}; a step whose gradients overflow is skipped and the scale halved)")
    reporter.start(optim.steps, description, initial=step)
    with _checkpoint_on_signal() as interrupted:
        while step < optim.steps:
            started = time.perf_counter()
            totals: dict[str, float] = {}
            for micro in range(optim.grad_accum):
                with autocast:
                    loss, metrics = trainable.loss(step * optim.grad_accum + micro)
                if not math.isfinite(value := loss.item()):  # the forward pass: no loss scale makes it finite
                    reporter.close()
                    raise _diverged(description, f"the loss is {value}", step + 1, saved, optim.lr, scaler.is_enabled())
                scaler.scale(loss / optim.grad_accum).backward()
                for key, value in {"loss": value, **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value / optim.grad_accum
            if world > 1:  # FSDP2 averages a sharded run's gradients itself (reduce-scatter)
                totals = _average_over_ranks([] if trainable.sharded else trainable.parameters, totals, world)
            totals["lr"] = float(scheduler.get_last_lr()[0])  # a tensor for optimisers that keep lr as one
            try:
                totals.update(_update(optimizer, scaler, trainable.parameters, optim.grad_clip))
            except _NonFiniteGradients as exc:
                reporter.close()
                raise _diverged(description, f"the loss is finite but its gradients' norm is {exc.norm}", step + 1,
                                saved, optim.lr, False) from None
            if scaler.is_enabled() and scaler.get_scale() < 1:  # 17 overflows in a row: they overflow unscaled
                reporter.close()
                raise _diverged(description, "the float16 gradients overflowed at every loss scale down to 1",
                                step + 1, saved, optim.lr, True)
            with warnings.catch_warnings():  # after a skipped first step torch warns of a call order it assumes
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                scheduler.step()  # also after a skipped step: the schedule stays a function of the step
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, **totals, "seconds": time.perf_counter() - started}
            # a sharded model's forward is collective: every rank evaluates (the same rows), rank 0 keeps it
            evaluates = rank == 0 or trainable.sharded
            if evaluates and trainable.evaluate is not None and (step % optim.eval_every == 0 or step == optim.steps):
                record.update({f"eval_{k}": v for k, v in trainable.evaluate().items()})
            history.append(record)
            reporter.advance(1, loss=totals["loss"])
            if (step % optim.checkpoint_every == 0 or step == optim.steps or interrupted["signal"]) and evaluates:
                save()
            if interrupted["signal"]:
                reporter.close()
                raise TrainingInterrupted(f"{description}: stopped by signal {interrupted['signal']} at step {step}; "
                                          "a checkpoint was written, rerun to resume")
    reporter.close()
    return history


class TrainedManifest(Manifest):
    """What a training stage hands on: its trained tensors, its loss history and where it checkpointed."""

    weights: str
    history: str
    checkpoints: str
    steps: int
    final_loss: float | None


def save_trained(ctx: Context, cls: type[TrainedManifest], stage: str, history: list[dict],
                 tensors: dict[str, torch.Tensor], **fields) -> TrainedManifest:
    """Write a training stage's tensors and loss history into its directory; its manifest."""
    manifest = ctx.manifest(cls, stage, weights=f"{ctx.path}/weights.safetensors", history=f"{ctx.path}/history.json",
                            checkpoints=layout.checkpoints_dir(ctx.path), steps=len(history),
                            final_loss=history[-1]["loss"] if history else None, **fields)
    write_tensors(ctx.store, manifest.weights, tensors)
    ctx.store.write_json(manifest.history, history)
    return manifest


def _average_over_ranks(parameters: list[nn.Parameter], totals: dict[str, float], world: int) -> dict[str, float]:
    """Every rank's gradients and logged values replaced by their mean over the ranks (one collective per tensor:
    no second copy of a large model's gradients)."""
    for p in parameters:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)
    values = torch.tensor(list(totals.values()), dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(totals, (values / world).tolist()))


def trained_state(trainable: Trainable) -> dict[str, torch.Tensor]:
    """The tensors that define the trained model, whole (a sharded run's ranks all call this: it gathers)."""
    return _gathered(trainable.state()) if trainable.sharded else trainable.state()


def _gathered(value):
    """``value`` with every DTensor (a sharded parameter or its optimiser state) gathered whole, through dicts and
    lists; other values as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: _gathered(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_gathered(v) for v in value]
    return value


def _sharded_like(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from a checkpoint, each sharded as the model's own tensor of that name."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return {k: distribute_tensor(v.to(like[k].device), like[k].device_mesh, like[k].placements)
            if isinstance(like.get(k), DTensor) else v for k, v in tensors.items()}


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a checkpoint's whole tensors: each sharded parameter's state (AdamW's moments)
    sharded as the parameter, which the optimiser's step expects."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {}) if isinstance(p, DTensor) else {}
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def resumable_step(store, stage_dir: str, steps: int) -> str | None:
    """What a training stage at ``stage_dir`` would resume from, if it left a checkpoint (``python -m flows plan``)."""
    latest = checkpoints.latest_checkpoint(store, layout.checkpoints_dir(stage_dir))
    return f"resumes from step {layout.checkpoint_step(latest)} of {steps}" if latest else None
