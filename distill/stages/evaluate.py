"""The evaluate stage: held-out perplexity of the teacher, of naive post-training ternary quantization (dW = 0,
the baseline every student must beat) and of the trained student; KL(teacher || student), top-1 agreement and
per-layer hidden cosine; packed size, greedy samples and loss curves. Writes ``metrics.json``, ``report.md`` and
``loss_curves.{png,json}``. With ``eval.lm_eval.tasks`` set, also the three models' accuracy on those tasks
through lm-evaluation-harness (``distill.harness``), in ``lm_eval.json`` and a table of the report.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from .. import harness
from ..config import PipelineConfig
from ..metrics import compare_to_teacher
from ..report import loss_curves_json, loss_curves_png, markdown_report
from ..rows import token_rows
from ..stage import Context, Manifest, Preflight, Stage
from ..students import STUDENTS, hf_generate, hf_harness, open_student
from ..teacher import TeacherFacts
from .lm_head import LmHeadManifest
from .self_distill import SelfDistillManifest, dual_forward, load_dual
from .tokenize import TokenizeManifest


class ModelMetrics(BaseModel):
    loss: float
    perplexity: float
    tokens: int
    kl_to_teacher: float | None = None
    top1_agreement: float | None = None
    hidden_cosine: list[float] | None = None


class EvaluateManifest(Manifest):
    flow: str
    results: dict[str, ModelMetrics]  # teacher, ptq_ternary, student (and student_via_teacher_head)
    packed_bytes: int
    fp16_bytes: int
    metrics: str  # metrics.json: the above, the configuration, the fingerprints and the samples
    report: str
    curves_png: str
    checkpoints: dict[str, str]  # the student's checkpoint directories, by what they hold
    lm_eval: str | None = None  # lm_eval.json: the harness's own results per model (eval.lm_eval.tasks set)
    lm_eval_table: list[harness.AccuracyRow] = []  # per task and metric: each model's value, the student's change


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


def benchmark_accuracy(ctx: Context, dual, trained, where: str) -> list[harness.AccuracyRow]:
    """The teacher's, naive ternary's and the student's accuracy on ``eval.lm_eval.tasks`` through
    lm-evaluation-harness; writes the harness's results to ``where`` (lm_eval.json) and returns the table."""
    lm_cfg, tokenizer, bs = ctx.config.eval.lm_eval, ctx.teacher.tokenizer, ctx.config.eval.lm_eval.batch_size
    models = {"teacher": lambda: hf_harness(dual, dual.teacher, tokenizer, bs),
              "ptq_ternary": lambda: hf_harness(dual, dual.ptq, tokenizer, bs),
              "student": lambda: trained.harness_model(tokenizer, bs)}
    results, seconds = harness.evaluate(models, lm_cfg, ctx.reporter.log)
    table = harness.accuracy_rows(results)
    ctx.store.write_json(where, {"harness": f"lm-eval {harness.harness_version()}", **lm_cfg.model_dump(mode="json"),
                                 "table": [row.model_dump() for row in table], "seconds": seconds,
                                 "results": results})
    return table


class Evaluate(Stage):
    name = "evaluate"
    Manifest = EvaluateManifest

    def check(self, pre: Preflight) -> None:
        student = STUDENTS[pre.flow]
        harness.check(pre.config.eval.lm_eval, student.harness_requests, f"{pre.flow} student")

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        own = {"eval": cfg.eval.fingerprinted(exclude=("lm_eval",))}
        if cfg.eval.lm_eval.tasks:  # off, the stage's fingerprint is what it was before the harness came
            own["lm_eval"] = harness.settings(cfg.eval.lm_eval)
        return own

    def run(self, ctx: Context, student: SelfDistillManifest | LmHeadManifest,
            tokens: TokenizeManifest) -> EvaluateManifest:
        cfg, store, path, device = ctx.config, ctx.store, ctx.path, ctx.device
        dual = load_dual(cfg, ctx.teacher, device)  # the teacher, and naive ternary quantization of it
        tokenizer = ctx.teacher.tokenizer
        trained = open_student(ctx, student, dual)
        rows = token_rows(store, tokens, "eval")
        n_batches = -(-min(rows.count, cfg.eval.max_rows or rows.count) // cfg.eval.batch_size)
        batches = ((b["input_ids"].to(device), b["attention_mask"].to(device))
                   for b in rows.batches(cfg.eval.batch_size, limit=cfg.eval.max_rows))
        teacher = dual_forward(dual, dual.teacher, trained.compared_layers)
        candidates = {"ptq_ternary": dual_forward(dual, dual.ptq, []), **trained.candidates()}
        ctx.reporter.start(n_batches, "evaluate")
        results = compare_to_teacher(teacher, candidates, batches, progress=ctx.reporter.advance)
        ctx.reporter.close()

        generators = {"teacher": hf_generate(dual, dual.teacher, tokenizer),
                      "naive ternary (PTQ)": hf_generate(dual, dual.ptq, tokenizer),
                      "student": trained.generator(tokenizer)}
        samples = {name: greedy_samples(generate, tokenizer, cfg.eval.prompts, cfg.eval.max_new_tokens, device)
                   for name, generate in generators.items()} if cfg.eval.max_new_tokens else {}
        packed, fp16 = packed_sizes(trained.ternary_shapes())
        metrics = {"flow": trained.flow, "config": cfg.model_dump(mode="json"), "fingerprints": ctx.fingerprints,
                   **results, "packed_bytes": packed, "fp16_bytes": fp16, "compression": fp16 / packed,
                   "samples": samples}
        files = {name: f"{path}/{name}" for name in ("metrics.json", "report.md", "loss_curves.png",
                                                     "loss_curves.json")}
        table = []
        if cfg.eval.lm_eval.tasks:
            files["lm_eval.json"] = f"{path}/lm_eval.json"
            table = benchmark_accuracy(ctx, dual, trained, files["lm_eval.json"])
            metrics["lm_eval"] = [row.model_dump() for row in table]
        store.write_bytes(files["loss_curves.png"], loss_curves_png(trained.curves))
        store.write_bytes(files["loss_curves.json"], loss_curves_json(trained.curves))
        locations = {"metrics": files["metrics.json"], "student weights": student.weights, **trained.checkpoints}
        if "lm_eval.json" in files:
            locations["lm-evaluation-harness results"] = files["lm_eval.json"]
        store.write_bytes(files["report.md"],
                          markdown_report(metrics, samples, {k: store.url(v) for k, v in locations.items()}).encode())
        store.write_json(files["metrics.json"], metrics)
        return ctx.manifest(EvaluateManifest, self.name, flow=trained.flow, results=results, packed_bytes=packed,
                            fp16_bytes=fp16, metrics=files["metrics.json"], report=files["report.md"],
                            curves_png=files["loss_curves.png"], checkpoints=trained.checkpoints,
                            lm_eval=files.get("lm_eval.json"), lm_eval_table=table)
