"""The export stage: the packed ternary student with its tokenizer and a model card (``README.md``) whose Hub
metadata places it in the teacher's model tree, so ``hf upload <repo> <directory>`` publishes it as it is."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from ..config import PipelineConfig
from ..data import hub_dataset
from ..report import accuracy_table_rows, markdown_table, metrics_rows
from ..stage import Context, Manifest, Stage
from ..students import open_student
from ..teacher import TeacherFacts, model_source
from .evaluate import EvaluateManifest
from .lm_head import LmHeadManifest
from .self_distill import SelfDistillManifest

TAGS = ["bitnet", "bitnet-b1.58", "ternary", "distillation", "bitnet-distill"]


class ExportManifest(Manifest):
    flow: str
    packed_bytes: int
    fp16_bytes: int
    compression: float


def card_metadata(cfg: PipelineConfig, library_name: str | None, base_model_relation: str | None) -> str:
    """The card's YAML front matter, which the Hub reads: the teacher as ``base_model`` when it is a Hub model (the
    model tree lists a self-distilled student, same architecture, under its quantizations), a Hub dataset it was
    trained on, the library that loads it and the tags."""
    from huggingface_hub import ModelCardData

    teacher = cfg.teacher.name_or_path
    base_model = None if Path(model_source(teacher)).is_dir() else teacher
    dataset = hub_dataset(cfg.data)
    return ModelCardData(
        base_model=base_model, base_model_relation=base_model_relation if base_model else None,
        datasets=[dataset] if dataset else None, library_name=library_name, pipeline_tag="text-generation",
        tags=TAGS,
    ).to_yaml()


def model_card(cfg: PipelineConfig, student, metrics: dict, sizes: dict) -> str:
    return f"---\n{card_metadata(cfg, student.library_name, student.base_model_relation)}\n---\n\n" + "\n\n".join([
        f"# BitNet b1.58 student of `{cfg.teacher.name_or_path}`",
        f"Made by bitnet-distill's `{student.flow}` flow (run configuration below): ternary weights {{-1, 0, +1}} "
        "with one absmean scale per tensor and 8-bit per-token activations (W1.58A8).",
        "## Held-out metrics",
        markdown_table(metrics_rows(metrics)),
        f"Packed ternary layers: {sizes['packed_bytes']:,} bytes ({sizes['compression']:.1f}x smaller than fp16).",
        *(["## Benchmark accuracy (lm-evaluation-harness)", markdown_table(accuracy_table_rows(metrics["lm_eval"]))]
          if metrics.get("lm_eval") else []),
        "## Loading",
        student.loading,
        "## Configuration",
        "```yaml\n" + yaml.safe_dump(metrics["config"], sort_keys=False) + "```",
    ]) + "\n"


class Export(Stage):
    name = "export"
    Manifest = ExportManifest

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {}

    def run(self, ctx: Context, student: SelfDistillManifest | LmHeadManifest,
            metrics: EvaluateManifest) -> ExportManifest:
        store, path = ctx.store, ctx.path
        trained = open_student(ctx, student)
        ctx.reporter.log(f"exporting the {trained.flow} student to {store.url(path)}")
        with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes a local directory
            sizes = trained.save(Path(tmp), ctx.teacher.tokenizer)
            card = model_card(ctx.config, trained, store.read_json(metrics.metrics), sizes)
            (Path(tmp) / "README.md").write_text(card)
            store.upload_dir(tmp, path)
        return ctx.manifest(ExportManifest, self.name, flow=trained.flow, packed_bytes=sizes["packed_bytes"],
                            fp16_bytes=sizes["fp16_bytes"], compression=sizes["compression"])
