"""The export stage: the packed ternary student with its tokenizer and a model card (``README.md``) whose Hub
metadata places it in the teacher's model tree, so ``hf upload <repo> <directory>`` publishes it as it is; beside it
``student.gguf`` for llama.cpp (``export.gguf``: TQ2_0, TQ1_0 or none), whose size and how to run it the card and the
published report show."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from bitnet.gguf import check_exportable

from ..config import ConfigError, PipelineConfig
from ..data import hub_dataset
from ..report import accuracy_table_rows, markdown_table, metrics_rows
from ..stage import Context, Manifest, Preflight, Stage
from ..students import open_student
from ..teacher import TeacherFacts, model_source
from .evaluate import EvaluateManifest
from .lm_head import LmHeadManifest
from .self_distill import SelfDistillManifest

TAGS = ["bitnet", "bitnet-b1.58", "ternary", "distillation", "bitnet-distill"]
GGUF_FILE = "student.gguf"


class GgufExport(BaseModel):
    """The GGUF file of an export: its name in the export directory, size and types."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    bytes: int
    qtype: str  # the ternary layers' type: tq2_0 or tq1_0
    embeddings: str  # the token embeddings' and output head's: f16 or q8_0
    fallback: dict[str, str] = {}  # ternary layers whose rows are not 256-value blocks, by name: the type they are in


class ExportManifest(Manifest):
    flow: str
    packed_bytes: int
    fp16_bytes: int
    compression: float
    gguf: GgufExport | None = None  # None with export.gguf: none


def llama_cpp_section(gguf: GgufExport, location: str, prompt: str) -> str:
    """Markdown: the GGUF file, its size and types, and how to run it (a llama.cpp command line and llama-cpp-python).
    ``location`` is where the file is (a path or a URL); the commands read a local path."""
    local = "://" not in location
    path = location if local else gguf.file
    lines = [f"`{location}`: {gguf.bytes / 2**20:.2f} MiB; ternary layers in {gguf.qtype.upper()}, token embeddings "
             f"and output head in {gguf.embeddings.upper()}."]
    if gguf.fallback:
        by_type: dict[str, list[str]] = {}
        for layer, kind in gguf.fallback.items():
            by_type.setdefault(kind, []).append(f"`{layer}`")
        lines.append("Ternary layers whose rows are not whole 256-value blocks hold the same values in another type "
                     "(a slower kernel): " + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_type.items())
                     + ".")
    if not local:
        lines.append(f"Copy it to a local file first (e.g. `aws s3 cp {location} .` or `fsspec`).")
    lines += [
        "```bash\n# llama.cpp (github.com/ggml-org/llama.cpp); in builds before llama-completion existed: llama-cli\n"
        f"llama-completion -m {shlex.quote(path)} -no-cnv -p {shlex.quote(prompt)} -n 64 --temp 0\n```",
        "```python\nfrom llama_cpp import Llama  # pip install llama-cpp-python\n"
        f"llm = Llama(model_path={path!r}, n_ctx=512, verbose=False)\n"
        f"print(llm({prompt!r}, max_tokens=64, temperature=0)['choices'][0]['text'])\n```",
        "llama.cpp quantizes activations in 256-value blocks rather than per token; what that changes: "
        "docs/gguf.md.",
    ]
    return "\n\n".join(lines)


def example_prompt(cfg: PipelineConfig) -> str:
    return cfg.eval.prompts[0] if cfg.eval.prompts else "Once upon a time"


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


def model_card(cfg: PipelineConfig, student, metrics: dict, sizes: dict, gguf: GgufExport | None = None) -> str:
    run_it = ["## Run it with llama.cpp", llama_cpp_section(gguf, gguf.file, example_prompt(cfg))] if gguf else []
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
        *run_it,
        "## Configuration",
        "```yaml\n" + yaml.safe_dump(metrics["config"], sort_keys=False) + "```",
    ]) + "\n"


class Export(Stage):
    name = "export"
    version = 2  # 2: student.gguf beside the transformers export
    Manifest = ExportManifest

    def check(self, pre: Preflight) -> None:
        """The GGUF writer must know the tokenizer (and, for a self-distilled student, the teacher's architecture)."""
        option = pre.config.export.gguf
        if option == "none":
            return
        try:
            check_exportable(pre.teacher.tokenizer, pre.teacher.config if pre.flow == "self-distill" else None)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"export.gguf {option!r}: {exc}; or set export.gguf: none to export without the GGUF "
                              "file") from None

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {"export": cfg.export.fingerprinted()}

    def run(self, ctx: Context, student: SelfDistillManifest | LmHeadManifest,
            metrics: EvaluateManifest) -> ExportManifest:
        store, path = ctx.store, ctx.path
        trained = open_student(ctx, student)
        ctx.reporter.log(f"exporting the {trained.flow} student to {store.url(path)}")
        cfg, tokenizer = ctx.config, ctx.teacher.tokenizer
        with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes a local directory
            sizes = trained.save(Path(tmp), tokenizer)
            gguf = None
            if cfg.export.gguf != "none":
                written = trained.save_gguf(Path(tmp) / GGUF_FILE, tokenizer, cfg.export.gguf,
                                            cfg.export.gguf_embeddings, name=f"{cfg.name} {trained.flow} student")
                gguf = GgufExport(file=GGUF_FILE, bytes=written["bytes"], qtype=written["qtype"],
                                  embeddings=written["embeddings"], fallback=written["fallback"])
                ctx.reporter.log(f"{GGUF_FILE}: {gguf.bytes / 2**20:.2f} MiB, {gguf.qtype}"
                                 + (f"; {len(gguf.fallback)} layers in another type: {gguf.fallback}"
                                    if gguf.fallback else ""))
            card = model_card(cfg, trained, store.read_json(metrics.metrics), sizes, gguf)
            (Path(tmp) / "README.md").write_text(card)
            store.upload_dir(tmp, path)
        return ctx.manifest(ExportManifest, self.name, flow=trained.flow, packed_bytes=sizes["packed_bytes"],
                            fp16_bytes=sizes["fp16_bytes"], compression=sizes["compression"], gguf=gguf)
