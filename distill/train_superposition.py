"""Superposition distillation: a small BitNet student plus a decompressor learn to reconstruct the teacher's
cached hidden states (cosine loss, padding-masked), reading batches from the teacher cache."""

from __future__ import annotations

import torch

from bitnet import Decompressor, SuperpositionStudent, hidden_cosine_loss

from .config import PipelineConfig
from .loop import ScheduledBatches, Trainable
from .rows import Rows, to_device


def build_student(cfg: PipelineConfig, vocab_size: int, teacher_dim: int) -> tuple[SuperpositionStudent, Decompressor]:
    s = cfg.student
    torch.manual_seed(cfg.seed)
    student = SuperpositionStudent(vocab_size, s.dim, s.n_layers, s.n_heads, mlp_hidden=s.mlp_hidden,
                                   max_seq_len=cfg.data.seq_len, tie_embeddings=s.tie_embeddings)
    return student, Decompressor(s.dim, teacher_dim, s.projector_hidden)


def prefixed_state(**modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy (tied weights must not share memory in safetensors) of the modules' states, names prefixed."""
    return {f"{name}.{k}": v.detach().clone() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_prefixed_state(state: dict[str, torch.Tensor], **modules: torch.nn.Module) -> None:
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def reconstruction_loss(student, projector, batch: dict, target_key: str) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    predicted = projector(student(ids, mask, compute_logits=False).last_hidden)
    return hidden_cosine_loss([predicted], [batch[target_key].to(predicted.dtype)], mask)


def superposition_trainable(student: SuperpositionStudent, projector: Decompressor, cfg: PipelineConfig,
                            rows: Rows, target_key: str, device: torch.device, eval_rows: Rows | None = None) -> Trainable:
    batches = ScheduledBatches(rows, cfg.train.batch_size, cfg.seed)
    student.to(device).train()
    projector.to(device).train()

    def loss(micro_step: int):
        batch = to_device(batches(micro_step), device)
        return reconstruction_loss(student, projector, batch, target_key), {}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        student.eval(), projector.eval()
        losses = [reconstruction_loss(student, projector, to_device(b, device), target_key).item()
                  for b in eval_rows.batches(cfg.train.batch_size, limit=4 * cfg.train.batch_size)]
        student.train(), projector.train()
        return {"cosine_loss": sum(losses) / len(losses)}

    return Trainable(
        parameters=[*student.parameters(), *projector.parameters()],
        loss=loss,
        state=lambda: prefixed_state(student=student, projector=projector),
        load_state=lambda state: load_prefixed_state(state, student=student, projector=projector),
        evaluate=evaluate if eval_rows is not None and eval_rows.count else None,
    )


def run_superposition(cfg: PipelineConfig, store, stage: dict, reporter, cache: dict) -> dict:
    """Train the student and decompressor on the cached hidden states of the last cached layer."""
    from .artifacts import finish_training
    from .loop import train
    from .teacher import resolve_device
    from .teacher_cache import cached_rows

    if store.is_complete(stage["path"]):
        return store.read_manifest(stage["path"])
    device = resolve_device(cfg.teacher.device)
    target = f"hidden/layer_{cache['layers'][-1]}"
    rows, eval_rows = (cached_rows(store, cache, split, cache["fingerprint"], [target]) for split in ("train", "eval"))
    vocab_size = int(cache["vocab_size"])
    student, projector = build_student(cfg, vocab_size, cache["hidden_size"])
    trainable = superposition_trainable(student, projector, cfg, rows, target, device, eval_rows)
    history = train(trainable, cfg.train, store, stage["checkpoint_run"], reporter, device, "superposition")
    return finish_training(store, stage, history, trainable.state(), target=target, vocab_size=vocab_size,
                           teacher_dim=cache["hidden_size"],
                           student_parameters=sum(p.numel() for p in student.parameters()))


def load_trained_student(cfg: PipelineConfig, store, trained: dict):
    """The student and decompressor as the superposition stage left them (full-precision latent weights)."""
    from .artifacts import read_tensors

    student, projector = build_student(cfg, trained["vocab_size"], trained["teacher_dim"])
    load_prefixed_state(read_tensors(store, trained["weights"]), student=student, projector=projector)
    return student, projector
