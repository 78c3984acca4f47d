"""The training schedule: batches are a pure function of (seed, step), cover every row each epoch, stay chunk-local;
a warm-up as long as the run is reported; float16 models train with loss scaling, checkpointed for resume; bf16
only where the GPU computes it natively; a diverged loss stops training with the last checkpoint intact."""

import json
import logging
import math
import os
import signal
import threading
import warnings

import numpy as np
import pytest
import torch

from distill.config import OptimConfig
from distill.loop import (BatchSchedule, ScheduledBatches, Trainable, TrainingDiverged, TrainingInterrupted, lr_factor,
                          train, training_autocast)
from distill.progress import Reporter
from distill.rows import Rows
from distill.device import resolve_dtype
from storage import ArtifactStore
from storage.checkpoints import latest_checkpoint, load_checkpoint


def test_every_epoch_visits_every_row_once():
    schedule = BatchSchedule(num_rows=40, batch_size=8, seed=3, chunk_size=16)
    for epoch in range(3):
        rows = np.concatenate([schedule.indices(epoch * 5 + i) for i in range(5)])
        assert sorted(rows.tolist()) == list(range(40))


def test_batches_depend_only_on_seed_and_step():
    forward = BatchSchedule(num_rows=50, batch_size=7, seed=1, chunk_size=10)
    seen = [forward.indices(i).tolist() for i in range(30)]
    resumed = BatchSchedule(num_rows=50, batch_size=7, seed=1, chunk_size=10)  # a resumed run jumps straight to 17
    assert [resumed.indices(i).tolist() for i in (17, 3, 29)] == [seen[17], seen[3], seen[29]]
    other_seed = BatchSchedule(num_rows=50, batch_size=7, seed=2, chunk_size=10)
    assert [other_seed.indices(i).tolist() for i in range(30)] != seen


def test_a_batch_crossing_an_epoch_boundary_takes_the_end_of_one_and_the_start_of_the_next():
    schedule = BatchSchedule(num_rows=10, batch_size=4, seed=0)
    first, second = schedule._epoch_order(0).copy(), schedule._epoch_order(1).copy()
    assert schedule.indices(2).tolist() == [*first[8:], *second[:2]]
    assert not np.array_equal(first, second)  # reshuffled each epoch


def test_rows_are_read_chunk_by_chunk():
    schedule = BatchSchedule(num_rows=64, batch_size=16, seed=5, chunk_size=16)
    for step in range(4):  # batch == chunk: each batch is one whole chunk, shuffled within
        rows = schedule.indices(step)
        assert len(set(rows // 16)) == 1 and sorted(rows % 16) == list(range(16))


def test_no_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="no rows to train on.*data.seq_len"):
        BatchSchedule(num_rows=0, batch_size=4, seed=0)


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(step, warmup=10, total=100, min_ratio=0.1) for step in range(101)]
    assert factors[0] == 0.1 and factors[4] == 0.5 and factors[9] == factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # cosine: never goes back up
    assert factors[55] == pytest.approx(0.55) and factors[100] == pytest.approx(0.1)


def test_scheduled_batches_read_ahead_on_another_thread_and_equal_the_schedule():
    calls = []

    def fetch(index):
        calls.append((tuple(index.tolist()), threading.current_thread().name))
        return {"input_ids": torch.from_numpy(index.copy())}

    rows = Rows(count=50, fetch=fetch, chunk_size=10)
    batches = ScheduledBatches(rows, batch_size=7, seed=1, ahead=2)
    schedule = BatchSchedule(num_rows=50, batch_size=7, seed=1, chunk_size=10)
    for step in [0, 1, 2, 3, 17, 18, 4]:  # in order, then a jump forward (a resume) and one back
        assert batches(step)["input_ids"].tolist() == schedule.indices(step).tolist()
    batches._pool.shutdown(wait=True)
    read = [index for index, _ in calls]
    assert tuple(schedule.indices(19).tolist()) in read  # read ahead of the last step in order
    assert all(name.startswith("batch-read-ahead") for _, name in calls)
    for step in (1, 2, 3, 18):  # read ahead once, then served from that read: never fetched twice
        assert read.count(tuple(schedule.indices(step).tolist())) == 1, step


@pytest.mark.parametrize("warmup,warned", [(5, True), (3, False), (2, False)])
def test_a_warmup_longer_than_the_run_is_reported(tmp_path, caplog, warmup, warned):
    weight = torch.nn.Parameter(torch.ones(2))
    trainable = Trainable([weight], lambda step: ((weight ** 2).sum(), {}), lambda: {"w": weight.detach()},
                          lambda state: weight.data.copy_(state["w"]))
    with caplog.at_level(logging.WARNING, logger="bitnet_distill"):
        history = train(trainable, OptimConfig(steps=3, warmup_steps=warmup, lr=0.1, min_lr_ratio=0.0),
                        ArtifactStore(str(tmp_path)), "run", Reporter(), torch.device("cpu"))
    peak = max(record["lr"] for record in history)
    assert (peak < 0.1) == warned  # what the warning says: the run never reaches train.lr
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = (f"train: warmup_steps {warmup} > steps 3: the learning rate rises for the whole run and never "
                "reaches its peak 0.1; lower train.warmup_steps")
    assert warnings == ([expected] if warned else [])


def fp16_trainable(multiplier) -> tuple[Trainable, torch.nn.Parameter]:
    """A weight whose forward runs in float16 and whose loss gradient is ``multiplier(step)`` per element: 1e-8 is
    below float16's smallest subnormal (6e-8), 1.0 overflows it (65504) once scaled by 2**16."""
    weight = torch.nn.Parameter(torch.ones(4))

    def loss(step):
        return (weight.half() * torch.ones(4, dtype=torch.float16)).float().sum() * multiplier(step), {}

    return Trainable([weight], loss, lambda: {"w": weight.detach().clone()},
                     lambda state: weight.data.copy_(state["w"]), compute_dtype=torch.float16), weight


CONSTANT_LR = dict(lr=0.1, warmup_steps=0, min_lr_ratio=1.0)


def test_float16_gradients_below_its_range_train_with_loss_scaling_and_an_overflow_skips_its_step(tmp_path, caplog):
    trainable, weight = fp16_trainable(lambda step: 1.0 if step == 1 else 1e-8)
    with caplog.at_level(logging.INFO, logger="bitnet_distill"):
        history = train(trainable, OptimConfig(steps=4, **CONSTANT_LR), ArtifactStore(str(tmp_path)), "run",
                        Reporter(), torch.device("cpu"))
    assert "dynamic loss scaling on (from 65536" in caplog.text
    assert [h["loss_scale"] for h in history] == [2.0 ** 16, 2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    assert [h["skipped"] for h in history] == [0.0, 1.0, 0.0, 0.0]
    assert "grad_norm" not in history[1] and all(math.isfinite(history[i]["grad_norm"]) for i in (0, 2, 3))
    json.dumps(history, allow_nan=False)  # the history file stays plain JSON
    # three Adam steps of a 1e-8 gradient, each moving by lr * 1e-8 / (1e-8 + eps 1e-8) = 0.05; the overflow step none
    assert torch.allclose(weight.detach(), torch.full((4,), 1.0 - 3 * 0.05), atol=2e-3)

    # the same gradients unscaled (as a float32 model's are) round to zero in float16 and never move the weight
    unscaled, weight = fp16_trainable(lambda step: 1e-8)
    unscaled.compute_dtype = torch.float32
    history = train(unscaled, OptimConfig(steps=3, **CONSTANT_LR), ArtifactStore(str(tmp_path / "unscaled")), "run",
                    Reporter(), torch.device("cpu"))
    assert torch.equal(weight.detach(), torch.ones(4)) and "loss_scale" not in history[0]


def test_the_loss_scale_is_checkpointed_and_a_resumed_float16_run_equals_an_uninterrupted_one(tmp_path):
    def run(root, interrupt_at: int | None):
        def multiplier(step):
            if step == interrupt_at:  # as a scheduler's SIGTERM would: the loop checkpoints after this step
                os.kill(os.getpid(), signal.SIGTERM)
            return 1.0 if step == 1 else 1e-8  # the overflow at step 1 halves the scale: the resume must keep it

        trainable, weight = fp16_trainable(multiplier)
        optim = OptimConfig(steps=5, checkpoint_every=100, **CONSTANT_LR)
        return lambda: (train(trainable, optim, ArtifactStore(str(root)), "run", Reporter(), torch.device("cpu")),
                        weight.detach().clone())

    straight, straight_weight = run(tmp_path / "straight", None)()
    interrupted = run(tmp_path / "interrupted", 2)
    with pytest.raises(TrainingInterrupted, match="stopped by signal 15 at step 3"):
        interrupted()
    resumed, resumed_weight = run(tmp_path / "interrupted", None)()  # a new process: a fresh weight and scaler
    assert [h["loss_scale"] for h in resumed] == [2.0 ** 16, 2.0 ** 16] + [2.0 ** 15] * 3
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in straight]
    assert torch.equal(resumed_weight, straight_weight)


@pytest.mark.parametrize("gpu,native", [("A100", True), ("T4", False)])
def test_bf16_is_chosen_only_where_the_gpu_computes_it_natively(monkeypatch, caplog, gpu, native):
    """torch's is_bf16_supported() says yes for a T4 or V100, which only emulate bf16 (far slower than fp32): the
    hardware's answer is faked here, the decisions are the pipeline's."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if native else (7, 5))
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with caplog.at_level(logging.WARNING, logger="bitnet_distill"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": this machine has none
        autocast = training_autocast(cuda, OptimConfig(), Reporter(), "self-distill")
    assert isinstance(autocast, torch.autocast) == native  # else no autocast at all
    expected = [] if native else ["self-distill: this GPU (compute capability 7.5) has no native bf16: training "
                                  "without bf16 autocast (teacher.dtype: float16 computes in fp16, with loss scaling)"]
    assert [r.getMessage() for r in caplog.records] == expected
    assert not isinstance(training_autocast(cuda, OptimConfig(autocast_bf16=False), Reporter(), "x"), torch.autocast)


def test_a_loss_that_is_not_finite_stops_training_before_the_weights_take_it(tmp_path):
    weight = torch.nn.Parameter(torch.ones(2))
    trainable = Trainable([weight], lambda step: ((weight ** 2).sum() * (math.nan if step == 2 else 1.0), {}),
                          lambda: {"w": weight.detach().clone()}, lambda state: weight.data.copy_(state["w"]))
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"train: the loss is nan at step 3; training stopped before the weights "
                                               r"took it \(the last checkpoint, step 2, is intact\): lower the "
                                               r"learning rate \(now 0.1\)"):
        train(trainable, OptimConfig(steps=5, checkpoint_every=2, **CONSTANT_LR), store, "run", Reporter(),
              torch.device("cpu"))
    assert torch.isfinite(weight).all()
    tensors, meta = load_checkpoint(store, latest_checkpoint(store, "run"))
    assert meta["step"] == 2 and torch.isfinite(tensors["model/w"]).all()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_finite_loss_with_infinite_gradients_stops_training_before_the_weights_take_them(tmp_path, grad_clip):
    weight = torch.nn.Parameter(torch.ones(2))

    def loss(step):  # at step 3 the loss is sqrt(0) = 0, its gradient infinite
        return (torch.sqrt(weight - weight.detach()).sum() if step == 2 else (weight ** 2).sum()), {}

    trainable = Trainable([weight], loss, lambda: {"w": weight.detach().clone()},
                          lambda state: weight.data.copy_(state["w"]))
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"train: the loss is finite but its gradients' norm is (inf|nan) at "
                                               r"step 3; training stopped before the weights took it \(the last "
                                               r"checkpoint, step 2, is intact\)"):
        train(trainable, OptimConfig(steps=5, checkpoint_every=1, grad_clip=grad_clip, **CONSTANT_LR), store, "run",
              Reporter(), torch.device("cpu"))
    assert torch.isfinite(weight).all()
    tensors, meta = load_checkpoint(store, latest_checkpoint(store, "run"))
    assert meta["step"] == 2 and torch.isfinite(tensors["model/w"]).all()  # step 3 was never taken nor saved


def test_float16_gradients_that_overflow_at_every_loss_scale_stop_training(tmp_path):
    trainable, weight = fp16_trainable(lambda step: 1e6)  # 1e6 > 65504: inf in float16 even unscaled
    with pytest.raises(TrainingDiverged, match=r"the float16 gradients overflowed at every loss scale down to 1 at "
                                               r"step 17; .*no checkpoint was written\): set teacher.dtype: bfloat16"):
        train(trainable, OptimConfig(steps=40, checkpoint_every=100, **CONSTANT_LR), ArtifactStore(str(tmp_path)),
              "run", Reporter(), torch.device("cpu"))
    assert torch.equal(weight.detach(), torch.ones(4))  # every step was skipped
