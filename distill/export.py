"""The export stage: the packed ternary student with its tokenizer and a model card.

self-distill: transformers' bitnet format, loadable by stock ``AutoModelForCausalLM.from_pretrained``;
superposition: our own format (``bitnet.load_student``), packed codes in safetensors plus a JSON config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bitnet import save_student, save_ternary_pretrained

from .artifacts import read_tensors, save_directory
from .config import ConfigError, PipelineConfig
from .data import hub_dataset
from .lm_head import load_final_student
from .report import markdown_table, metrics_rows
from .teacher import load_tokenizer, model_source, resolve_device
from .train_self import load_dual

LOADING = {
    "self-distill": ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                     "model = AutoModelForCausalLM.from_pretrained(path)  # needs accelerate\n"
                     "tokenizer = AutoTokenizer.from_pretrained(path)\n```"),
    "superposition-distill": ("```python\nfrom bitnet import load_student\nfrom transformers import AutoTokenizer\n"
                              "student, projector = load_student(path)\ntokenizer = AutoTokenizer.from_pretrained(path)\n"
                              "```"),
}


def check_exportable(teacher_cfg, config) -> None:
    """Before any work: a self-distilled student of this architecture can be exported (transformers' packed layout
    needs every patched layer's output size divisible by 4). Checked on the model built on the meta device from
    ``config``: no weights are loaded or allocated. A model whose class cannot be built so is left to the export."""
    import torch
    from transformers import AutoModelForCausalLM

    from bitnet import unpackable_layers

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=teacher_cfg.trust_remote_code)
    except Exception:  # remote code or an architecture that needs real tensors to build
        return
    uneven = unpackable_layers(model)
    if uneven:
        raise ConfigError(
            f"teacher.name_or_path {teacher_cfg.name_or_path!r}: its self-distilled student could not be exported, "
            f"since transformers' packed ternary layout stores out_features // 4 rows and these layers' output sizes "
            f"are not divisible by 4: {', '.join(uneven[:5])}{' ...' if len(uneven) > 5 else ''}; distil it with "
            "the superposition flow (its student has sizes of its own), or pick a teacher without such layers")


TAGS = ["bitnet", "bitnet-b1.58", "ternary", "distillation", "bitnet-distill"]


def card_metadata(cfg: PipelineConfig, flow: str) -> str:
    """The card's YAML front matter, which the Hub reads: the teacher as ``base_model`` when it is a Hub model (the
    model tree lists a self-distilled student, same architecture, under its quantizations), a Hub dataset it was
    trained on, the library that loads it and the tags."""
    from huggingface_hub import ModelCardData

    teacher = cfg.teacher.name_or_path
    base_model = None if Path(model_source(teacher)).is_dir() else teacher
    stock = flow == "self-distill"  # the superposition student loads with bitnet.load_student, not transformers
    dataset = hub_dataset(cfg.data)
    return ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model and stock else None,
        datasets=[dataset] if dataset else None, library_name="transformers" if stock else None,
        pipeline_tag="text-generation", tags=TAGS,
    ).to_yaml()


def model_card(cfg: PipelineConfig, flow: str, metrics: dict, sizes: dict) -> str:
    config = metrics["config"]
    return f"---\n{card_metadata(cfg, flow)}\n---\n\n" + "\n\n".join([
        f"# BitNet b1.58 student of `{config['teacher']['name_or_path']}`",
        f"Made by bitnet-distill's `{flow}` flow (run configuration below): ternary weights {{-1, 0, +1}} with one "
        "absmean scale per tensor and 8-bit per-token activations (W1.58A8).",
        "## Held-out metrics",
        markdown_table(metrics_rows(metrics)),
        f"Packed ternary layers: {sizes['packed_bytes']:,} bytes ({sizes['compression']:.1f}x smaller than fp16).",
        "## Loading",
        LOADING[flow],
        "## Configuration",
        "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```",
    ]) + "\n"


def run_export(cfg: PipelineConfig, store, stage: dict, reporter, flow: str, student: dict, metrics: dict) -> dict:
    path = stage["path"]
    if store.is_complete(path):
        return store.read_manifest(path)
    tokenizer = load_tokenizer(cfg.teacher)
    full_metrics = store.read_json(metrics["metrics_path"])
    sizes: dict = {}

    def write(directory):
        if flow == "self-distill":
            dual = load_dual(cfg, resolve_device(cfg.teacher.device))
            dual.load_delta_state_dict(read_tensors(store, student["weights"]))
            sizes.update(save_ternary_pretrained(dual, directory, tokenizer))
        else:
            small, projector = load_final_student(cfg, store, student)
            sizes.update(save_student(small, projector, directory))
            tokenizer.save_pretrained(directory)
        (directory / "README.md").write_text(model_card(cfg, flow, full_metrics, sizes))

    reporter.log(f"exporting the {flow} student to {store.url(path)}")
    return save_directory(store, path, write, lambda: {
        "stage": "export", "fingerprint": stage["fingerprint"], "path": path, "format": flow,
        **{k: v for k, v in sizes.items() if k != "path"}})
