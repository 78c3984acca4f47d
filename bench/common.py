"""What every benchmark shares: device and dtype, the teachers, token batches, interleaved timing, ratios,
markdown tables and the JSON record.

Every speed figure is a ratio of two variants timed side by side in one process: ``interleave`` runs one repeat of
each variant per round (alternating the order every round), so drift in the machine's load hits both alike, and
``ratio`` takes the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads: teachers are local or built from configs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
QUICKSTART = REPO / "assets" / "quickstart-teacher"

# Llama shapes: "quickstart" is the embedded teacher's architecture (scripts/train_teacher.py defaults), "large" a
# wider one whose linear layers dominate its size. Both use the quickstart tokenizer's 4096-token vocabulary.
SHAPES = {
    "quickstart": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16),
}
VOCAB = 4096

# Teachers of real models' shapes, randomly initialised (speed and memory do not depend on the weights' values): the
# architecture values of each model's published config.json on the Hugging Face Hub (Qwen/Qwen2.5-0.5B,
# Qwen/Qwen2.5-1.5B, meta-llama/Llama-3.2-1B), written out here so that nothing is downloaded. Their vocabularies
# are the models' own; the token ids fed to them come from the quickstart tokenizer (ids < 4096), which any of
# these vocabularies embeds.
MODEL_SHAPES = {
    "qwen2.5-0.5b-shape": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2.5-1.5b-shape": ("qwen2", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.2-1b-shape": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
TEACHERS = [*SHAPES, *MODEL_SHAPES]
# the random weights' standard deviation: transformers' initializer_range, as these models' configs set it
INIT_STD = 0.02


# ---- command line, device, environment -------------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per comparison (medians over these)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 in most scripts: on a shared, oversubscribed "
                        "CPU a second thread waits on the first at every op and makes timings erratic")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/<name>.json)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """The device to run on (``--device``); on CPU, ``--threads`` torch threads."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and not what a CPU user runs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """Training runs under bf16 autocast on CUDA (as distill.loop.train does), plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device | None = None) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torchdynamo_disable": os.environ.get("TORCHDYNAMO_DISABLE")}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- models and data -------------------------------------------------------------------------------------------

def shape_arguments(p: argparse.ArgumentParser) -> None:
    """``--shape-layers``: for the teachers of ``MODEL_SHAPES``."""
    p.add_argument("--shape-layers", type=int, default=None,
                   help=f"keep only this many decoder layers of the model-shaped teachers ({', '.join(MODEL_SHAPES)}); "
                        "default all. One layer checks a script on a CPU in seconds")


def model_config(kind: str, layers: int | None = None):
    """The transformers config of a ``MODEL_SHAPES`` teacher, with only ``layers`` decoder layers if given."""
    import transformers as tf

    if kind not in MODEL_SHAPES:
        raise ValueError(f"no model shape {kind!r}; choose one of {', '.join(MODEL_SHAPES)}")
    family, values = MODEL_SHAPES[kind]
    if layers is not None:
        if not 1 <= layers <= values["num_hidden_layers"]:
            raise ValueError(f"--shape-layers {layers}: {kind} has {values['num_hidden_layers']} decoder layers; "
                             f"keep between 1 and {values['num_hidden_layers']}")
        values = {**values, "num_hidden_layers": layers}  # before construction: qwen2 derives layer_types from it
    config_class = {"qwen2": tf.Qwen2Config, "llama": tf.LlamaConfig}[family]
    return config_class(initializer_range=INIT_STD, **values)


def _fill_random(model: nn.Module, seed: int) -> None:
    """Weights of the right scale, cheaply: every matrix gets a repeating stretch of one seeded normal sample (std
    ``INIT_STD``), norm weights 1, biases 0. Drawing a fresh normal value per element, as transformers' own
    ``_init_weights`` does, costs seconds per 150k-token embedding on a CPU, and speed does not depend on the values;
    the stretch's length is prime, so that rows of a matrix do not repeat each other."""
    source = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed)) * INIT_STD
    for name, param in model.named_parameters():
        with torch.no_grad():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
                continue
            flat, stretch = param.view(-1), source.to(param.device, param.dtype)
            whole = flat.numel() // stretch.numel() * stretch.numel()
            flat[:whole].view(-1, stretch.numel()).copy_(stretch.expand(whole // stretch.numel(), -1))
            flat[whole:].copy_(stretch[:flat.numel() - whole])


def shaped_teacher(kind: str, device: torch.device, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """A randomly initialised ``MODEL_SHAPES`` teacher, built directly on ``device`` in ``dtype``.

    The model is constructed on the meta device (no memory, no initialisation), converted to ``dtype`` there, then
    given uninitialised storage on ``device`` and filled (``_fill_random``): a 1.5B-parameter teacher never exists
    in fp32 in host memory, and transformers' per-element random initialisation is skipped. The rotary embedding's
    buffers (computed in its constructor, so left empty by ``to_empty``) are rebuilt on ``device`` in fp32, as
    transformers computes them."""
    import transformers as tf

    config = model_config(kind, layers)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    model.to(dtype).to_empty(device=device)
    for name, module in list(model.named_modules()):
        if any(True for _ in module.buffers(recurse=False)):
            if not name.endswith("rotary_emb"):
                raise RuntimeError(f"{kind}: module {name} ({type(module).__name__}) has buffers that to_empty left "
                                   "uninitialised and this builder does not rebuild; extend shaped_teacher")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=config).to(device))
    model.tie_weights()  # to_empty gives each module its own storage: tie the head to the embedding again
    _fill_random(model, seed)
    return model


def teacher(kind: str, device: torch.device, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """``(model, info)``. ``quickstart`` is the trained embedded teacher when assets/quickstart-teacher holds one,
    else a random-weight Llama of its shape; ``large`` is always random weights (hidden size 1024); the
    ``MODEL_SHAPES`` teachers are random weights of real models' shapes, with only ``layers`` decoder layers if
    given (``shaped_teacher``)."""
    import transformers as tf

    if kind in MODEL_SHAPES:
        model = shaped_teacher(kind, device, dtype, layers, seed).eval().requires_grad_(False)
        return model, teacher_info(model, kind, f"random weights, {kind.removesuffix('-shape')} config")
    trained = kind == "quickstart" and (QUICKSTART / "model.safetensors").exists() and (QUICKSTART / "config.json").exists()
    if trained:
        model = tf.AutoModelForCausalLM.from_pretrained(QUICKSTART, dtype=dtype)
        source = "trained (assets/quickstart-teacher)"
    else:
        torch.manual_seed(seed)
        config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=True,
                                num_key_value_heads=SHAPES[kind]["num_attention_heads"], **SHAPES[kind])
        model = tf.LlamaForCausalLM(config).to(dtype)
        source = "random weights, tiny config"
    model.to(device).eval().requires_grad_(False)
    return model, teacher_info(model, kind, source)


def teacher_info(model, kind: str, source: str) -> dict:
    linears = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return {"teacher": kind, "source": source, "hidden_size": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "vocab": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "block_linear_parameters": linears}


@functools.lru_cache(maxsize=8)
def token_rows(rows: int, seq_len: int = 128, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` packed rows of real tokens (the stdlib corpus through the quickstart tokenizer, as the tokenize stage
    makes them): ``(input_ids int64 [rows, seq_len], attention_mask int64)``."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from distill.config import DataConfig
    from distill.stages.tokenize import token_rows as packed_rows

    logging.set_verbosity_error()  # "sequence longer than the maximum": documents are tokenized whole, then packed
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART)
    limits = {"max_train_rows": rows, "max_eval_rows": 1} if split == "train" else {"max_train_rows": 1, "max_eval_rows": rows}
    cfg = DataConfig(builtin="stdlib", seq_len=seq_len, **limits)
    parts = [b for s, b in packed_rows(cfg, tokenizer) if s == split]
    ids = torch.from_numpy(np.concatenate([p["input_ids"] for p in parts])).long()
    lengths = torch.from_numpy(np.concatenate([p["length"] for p in parts])).long()
    if len(ids) < rows:
        raise RuntimeError(f"the corpus gave {len(ids)} rows of {seq_len} tokens, fewer than the {rows} asked for")
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return ids, mask


# ---- timing ----------------------------------------------------------------------------------------------------

def interleave(variants: dict[str, Callable[[], float | None]], repeats: int, device: torch.device,
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` rounds of one call each, order alternating every round.

    A variant may return its own elapsed seconds (to leave set-up out of the timing); otherwise the whole call is
    timed. ``warmup`` untimed rounds come first."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            start = time.perf_counter()
            own = variants[name]()
            sync(device)
            times[name].append(own if own is not None else time.perf_counter() - start)
    return times


def optimiser_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, loss_of, device) -> None:
    """One step as distill.loop.train takes it: loss, backward, clip to norm 1, AdamW, zero the gradients."""
    with autocast(device):
        loss = loss_of()
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stepper(params: list[nn.Parameter], loss_of, device, lr: float = 1e-4, optimizer: str = "adamw"):
    from distill.config import OptimConfig
    from distill.optim import make_optimizer

    built = make_optimizer(params, OptimConfig(lr=lr, optimizer=optimizer))  # the pipeline's (weight decay 0)
    return lambda: optimiser_step(params, built, loss_of, device)


def ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median (and range) of the per-round ratios ``numerator[i] / denominator[i]``."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds": per_round}


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- output ----------------------------------------------------------------------------------------------------

def fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """How this run was started, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    module = f"bench.{script.stem}" if script.parent == REPO / "bench" else str(script)
    return " ".join([".venv/bin/python -m", module, *map(shlex.quote, sys.argv[1:])])


def report(name: str, args: argparse.Namespace, device: torch.device, tables: dict[str, str], results: dict) -> Path:
    """Print the tables and write ``{machine, command, args, tables, results}`` as JSON."""
    for title, text in tables.items():
        print(f"\n### {title}\n\n{text}")
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "command": command_line(), "machine": machine(device), "args": vars(args),
              "tables": tables, "results": results}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return out
