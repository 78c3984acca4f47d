"""The evaluate stage: held-out perplexity of the teacher, of naive post-training ternary quantization (dW = 0,
the baseline every student must beat) and of the trained student; KL(teacher || student), top-1 agreement,
per-layer hidden cosine; for the superposition student also its states decoded through the teacher's own head.
Packed size, greedy samples, loss curves. Writes ``metrics.json``, ``report.md`` and ``loss_curves.{png,json}``.
"""

from __future__ import annotations

import torch

from bitnet import BitLinear
from storage import layout

from .config import PipelineConfig
from .data import load_split
from .lm_head import load_final_student
from .metrics import Output, compare_to_teacher
from .report import loss_curves_json, loss_curves_png, markdown_report
from .teacher import hidden_layers, load_tokenizer, resolve_device
from .train_self import dual_forward, load_dual


def packed_sizes(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(packed bytes: 2 bits per weight + one fp32 scale per layer, fp16 bytes) for ternary layers' shapes."""
    packed = sum(-(-out // 4) * inp + 4 for out, inp in shapes)
    return packed, sum(2 * out * inp for out, inp in shapes)


@torch.no_grad()
def greedy_samples(generate, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[dict]:
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        out = generate(ids, max_new_tokens)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    return samples


def run_evaluate(cfg: PipelineConfig, store, stage: dict, reporter, flow: str, student: dict, tokens: dict,
                 fingerprints: dict) -> dict:
    path = stage["path"]
    if store.is_complete(path):
        return store.read_manifest(path)
    device = resolve_device(cfg.teacher.device)
    dual = load_dual(cfg, device)
    model, tokenizer = dual.model, load_tokenizer(cfg.teacher)
    rows = load_split(store, tokens, "eval")
    n_batches = -(-min(rows.count, cfg.eval.max_rows or rows.count) // cfg.eval.batch_size)
    batches = ((b["input_ids"].to(device), b["attention_mask"].to(device))
               for b in rows.batches(cfg.eval.batch_size, limit=cfg.eval.max_rows))

    def hf_generate(mode):
        def generate(ids, n):
            with mode():
                return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
                                      if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        return generate

    generators = {"teacher": hf_generate(dual.teacher), "naive ternary (PTQ)": hf_generate(dual.ptq)}
    candidates = {"ptq_ternary": dual_forward(dual, dual.ptq, [])}
    if flow == "self-distill":
        from .artifacts import read_tensors

        dual.load_delta_state_dict(read_tensors(store, student["weights"]))
        layers = hidden_layers(cfg.self_distill.hidden_layers, model.config.num_hidden_layers)
        teacher = dual_forward(dual, dual.teacher, layers)
        candidates["student"] = dual_forward(dual, dual.student, layers)
        generators["student"] = hf_generate(dual.student)
        shapes = [(layer.out_features, layer.in_features) for layer in dual.layers.values()]
        curves = {"self-distill": student_history(store, student)}
    else:
        # the hidden cosine of the layer the student was trained to reconstruct, through its decompressor
        teacher = dual_forward(dual, dual.teacher, [int(student["target"].removeprefix("hidden/layer_"))])
        small, projector = load_final_student(cfg, store, student)
        small.to(device)
        projector.to(device)
        head = model.get_output_embeddings()

        def superposition_student(ids, mask) -> Output:
            out = small(ids, mask)
            return Output(out.logits, [projector(out.last_hidden)])

        candidates["student"] = superposition_student
        candidates["student_via_teacher_head"] = lambda ids, mask: Output(
            head(projector(small(ids, mask, compute_logits=False).last_hidden).to(head.weight.dtype)))
        generators["student"] = lambda ids, n: small.generate(ids, n, temperature=0)
        shapes = [tuple(m.weight.shape) for m in small.modules() if isinstance(m, BitLinear)]
        curves = {"superposition": store.read_json(student["train_history"]), "lm head": student_history(store, student)}

    reporter.start(n_batches, "evaluate")
    results = compare_to_teacher(teacher, candidates, batches, progress=reporter.advance)
    reporter.close()
    packed, fp16 = packed_sizes(shapes)
    samples = {name: greedy_samples(gen, tokenizer, cfg.eval.prompts, cfg.eval.max_new_tokens, device)
               for name, gen in generators.items()} if cfg.eval.max_new_tokens else {}
    metrics = {"flow": flow, "config": cfg.model_dump(mode="json"), "fingerprints": fingerprints, **results,
               "packed_bytes": packed, "fp16_bytes": fp16, "compression": fp16 / packed, "samples": samples}
    locations = {"metrics": f"{path}/metrics.json", "report": f"{path}/report.md",
                 "loss curves": f"{path}/loss_curves.png", "student weights": student["weights"]}
    store.write_bytes(f"{path}/loss_curves.png", loss_curves_png(curves))
    store.write_bytes(f"{path}/loss_curves.json", loss_curves_json(curves))
    store.write_bytes(f"{path}/report.md", markdown_report(metrics, samples, {k: store.url(v) for k, v in locations.items()}).encode())
    store.write_json(f"{path}/metrics.json", metrics)
    # run names; the links in the UI need their directories (superposition: the LM head's, then the student's)
    checkpoint_run, train_run = student.get("checkpoint_run"), student.get("train_checkpoint_run")
    manifest = {**{k: v for k, v in metrics.items() if k not in ("config", "samples")},
                "stage": "evaluate", "path": path, "metrics_path": f"{path}/metrics.json",
                "report_path": f"{path}/report.md", "curves_png": f"{path}/loss_curves.png",
                "checkpoints": checkpoint_run and layout.checkpoints_dir(checkpoint_run),
                "training_checkpoints": train_run and layout.checkpoints_dir(train_run)}
    store.mark_complete(path, manifest)
    return manifest


def student_history(store, student: dict) -> list[dict]:
    return store.read_json(student["history"])
