#!/usr/bin/env python
"""Train the embedded quickstart teacher: a small Llama on the Python standard library source.

The quickstart must run offline, so the project ships its own teacher under
``assets/quickstart-teacher``. This script makes it, deterministically, on CPU:

1. Corpus: the running interpreter's standard library ``*.py`` files
   (``distill.data``'s standard library corpus: test suites and generated tables left out; ~5% of
   modules held out for evaluation by a hash of their path).
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the train split, with
   special tokens ``<|bos|> <|eos|> <|pad|> <|unk|>``; saved as ``tokenizer.json``
   and loadable with ``AutoTokenizer.from_pretrained``.
3. Model: ``transformers.LlamaForCausalLM`` with tied embeddings, every linear
   dimension divisible by 4 (the packed ternary export stores 4 rows per byte).
   Trained on the train split packed end to end into ``--seq-len`` rows separated
   by EOS (the same packing the pipeline uses; documents are reshuffled and
   repacked every epoch), AdamW, linear warm-up then cosine decay, bf16 autocast
   (fp32 master weights) to double CPU throughput.
4. Held-out evaluation every ``--eval-every`` steps on the whole eval split;
   training stops when the held-out loss has flattened (best loss of the last
   ``--patience`` evals improves on the one before them by less than
   ``--flat-threshold``, relatively), at ``--max-steps``, or at ``--max-minutes``.
   The checkpoint with the best held-out loss is kept.
5. Output in ``--out``: HF model (config.json, model.safetensors,
   generation_config.json), tokenizer files, ``loss_curve.json``,
   ``loss_curve.png`` and a model card ``README.md``. The reported perplexity is
   recomputed in float32 from the saved files, as the pipeline loads them.

Same seed, machine, thread count and Python version (the corpus is the
interpreter's own stdlib) give the same model; a run cut by ``--max-minutes``
depends on machine speed, and the card says so.

Usage (the defaults take ~30 minutes on an idle 2-core CPU)::

    .venv/bin/python scripts/train_teacher.py --out assets/quickstart-teacher
    .venv/bin/python scripts/train_teacher.py --out /tmp/t --max-steps 20 --eval-every 10   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.data import STDLIB_EVAL_FRACTION, stdlib_documents, stdlib_root  # noqa: E402

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="assets/quickstart-teacher", help="output directory (overwritten)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=688)
    g.add_argument("--max-position-embeddings", type=int, default=1024)
    g.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (the pipeline loads them as float32)")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--max-steps", type=int, default=2000, help="length of the cosine schedule and step cap")
    g.add_argument("--max-minutes", type=float, default=240.0,
                   help="wall-clock safety cap (an idle 2-core CPU needs ~30 min for the defaults; a shared one more)")
    g.add_argument("--no-amp", action="store_true", help="train in float32 instead of bf16 autocast")
    g.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    g = p.add_argument_group("evaluation and stopping")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--patience", type=int, default=3, help="evals in the flatness window")
    g.add_argument("--flat-threshold", type=float, default=0.002,
                   help="stop when the window improves the held-out loss by less than this fraction")
    args = p.parse_args(argv)
    for name in ("hidden_size", "intermediate_size"):
        if getattr(args, name) % 4:
            p.error(f"--{name.replace('_', '-')} must be divisible by 4 (packed ternary export)")
    if args.hidden_size % args.heads or (args.hidden_size // args.heads) % 4:
        p.error("--hidden-size must be divisible by --heads, with a head size divisible by 4")
    return args


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: every byte is in the alphabet, so any text round-trips and <|unk|> never occurs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path, max_length: int):
    """Save for ``AutoTokenizer``; no BOS is added (the pipeline packs with EOS separators only)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                 clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    hf.save_pretrained(out)
    # transformers 5 writes its new class name; the old one loads on 4.x and 5.x alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return hf


# ---------------------------------------------------------------- data

def pack(docs: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Documents end to end, each followed by EOS, cut into full rows [n, seq_len]; the partial tail is dropped."""
    stream = torch.tensor([t for ids in docs for t in (*ids, eos_id)], dtype=torch.long)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def epoch_rows(docs: list[list[int]], eos_id: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch: documents shuffled and repacked (fresh row boundaries), then rows shuffled."""
    order = torch.randperm(len(docs), generator=gen).tolist()
    rows = pack([docs[i] for i in order], eos_id, seq_len)
    return rows[torch.randperm(len(rows), generator=gen)]


def batches(docs, eos_id, seq_len, batch_size, seed):
    """Endless stream of (epoch, batch) over reshuffled epochs."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        rows = epoch_rows(docs, eos_id, seq_len, gen)
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield epoch, rows[i: i + batch_size]
        epoch += 1


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch_size: int = 32, amp: bool = False) -> float:
    """Mean next-token cross-entropy over every predicted token of ``rows`` (all rows are full)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i: i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- schedule and stopping

def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def flattened(losses: list[float], patience: int, threshold: float) -> bool:
    """True when the best of the last ``patience`` held-out losses beats the one before them by < threshold."""
    if len(losses) <= patience:
        return False
    before = losses[-patience - 1]
    return (before - min(losses[-patience:])) / before < threshold


# ---------------------------------------------------------------- reporting

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in curve["train"]], [r["loss"] for r in curve["train"]],
            label="train (mean over interval, bf16 autocast)", alpha=0.7)
    ax.plot([r["tokens"] / 1e6 for r in curve["eval"]], [r["loss"] for r in curve["eval"]],
            "o-", label="held-out (eval split)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("quickstart teacher")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(out: Path, r: dict) -> None:
    evals = r["curve"]["eval"]
    tail = "\n".join(f"| {e['step']} | {e['tokens']:,} | {e['loss']:.4f} | {math.exp(e['loss']):.2f} |"
                     for e in evals[-6:])
    text = f"""# quickstart-teacher

A small Llama-architecture causal LM trained on the Python standard library source, shipped so that the
quickstart distils a real (if small) teacher without network access. Made by `scripts/train_teacher.py`;
everything below was recorded by that script.

**Held-out loss {r['final_loss']:.4f} nats/token, perplexity {r['final_ppl']:.2f}** (float32, as saved; eval split
below, {r['eval_tokens']:,} tokens).

## How it was made

```
{r['command']}
```

- seed {r['args']['seed']}; {r['args']['threads']} torch threads; stopped by: **{r['stop_reason']}**
  at step {r['steps']} of at most {r['args']['max_steps']}; kept the best held-out checkpoint (step {r['best_step']})
- training tokens seen: {r['tokens_seen']:,} ({r['epochs']:.2f} epochs of the train split)
- wall time: {r['wall_minutes']:.1f} minutes (tokenizer {r['tokenizer_seconds']:.0f} s)
- machine: {r['machine']}
- software: Python {platform.python_version()}, torch {torch.__version__}, transformers {r['transformers']},
  tokenizers {r['tokenizers']}

## Data

The interpreter's standard library (`{r['stdlib_root']}`, Python {platform.python_version()}), read through
`distill/data.py`: `*.py` files outside `site-packages` and test suites, without generated tables
(`pydoc_data`, charmap codecs, `_sysconfigdata`). A module is held out when the first 8 bytes of the sha256 of its
path relative to the stdlib root fall below {STDLIB_EVAL_FRACTION:.0%} of 2^64.

| split | files | characters | tokens |
|---|---|---|---|
| train | {r['train_files']} | {r['train_chars']:,} | {r['train_tokens']:,} |
| eval | {r['eval_files']} | {r['eval_chars']:,} | {r['eval_tokens_raw']:,} |

Held-out loss: mean next-token cross-entropy over the eval modules in sorted path order, each followed by EOS,
packed into {r['args']['seq_len']}-token rows (trailing partial row dropped), as the pipeline packs them.
A different Python version has a different standard library, hence different numbers.

## Tokenizer

Byte-level BPE (`tokenizers`), {r['vocab_size']} tokens including `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2),
`<|unk|>` (3); trained on the train split; {r['chars_per_token']:.2f} characters per token. No token is added
automatically (documents are separated by EOS, as in training).

## Model

`LlamaForCausalLM`, {r['params']:,} parameters (tied input/output embeddings): hidden size
{r['args']['hidden_size']}, {r['args']['layers']} layers, {r['args']['heads']} heads of
{r['args']['hidden_size'] // r['args']['heads']}, MLP {r['args']['intermediate_size']},
vocabulary {r['vocab_size']}, max positions {r['args']['max_position_embeddings']}; all linear dimensions divisible
by 4. Weights saved in {r['args']['save_dtype']}; {r['size_mb']:.1f} MB in this directory.

Training: sequences of {r['args']['seq_len']} tokens, batch {r['args']['batch_size']}, AdamW (betas 0.9/0.95,
weight decay {r['args']['weight_decay']}), peak lr {r['args']['lr']}, {r['args']['warmup_steps']} warm-up steps then
cosine to {r['args']['min_lr_ratio']} x peak at step {r['args']['max_steps']}, gradient clipping 1.0,
{'float32' if r['args']['no_amp'] else 'bf16 autocast with float32 master weights'}. Held-out evaluation every
{r['args']['eval_every']} steps; stop when the best of the last {r['args']['patience']} evals improves on the one
before them by less than {r['args']['flat_threshold']:.1%}.

Last held-out evaluations (during training, {'float32' if r['args']['no_amp'] else 'bf16 autocast'}):

| step | tokens | loss | perplexity |
|---|---|---|---|
{tail}

![loss curve](loss_curve.png)

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("assets/quickstart-teacher")
model = AutoModelForCausalLM.from_pretrained("assets/quickstart-teacher", dtype="float32")
```

Sample (greedy, 40 tokens) from `def fibonacci(n):`

```python
{r['sample']}
```
"""
    (out / "README.md").write_text(text)


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    args = parse_args(argv)
    import tokenizers
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # stale files would otherwise ship with the new model
        if old.is_file():
            old.unlink()

    train_docs = [doc.text for doc in stdlib_documents("train")]
    eval_docs = [doc.text for doc in stdlib_documents("eval")]
    print(f"corpus: {stdlib_root()}: {len(train_docs)} train / {len(eval_docs)} eval files", flush=True)

    tok = train_tokenizer(train_docs, args.vocab_size)
    hf_tok = save_tokenizer(tok, out, args.max_position_embeddings)
    eos_id = hf_tok.eos_token_id
    train_ids = [e.ids for e in tok.encode_batch(train_docs)]
    eval_ids = [e.ids for e in tok.encode_batch(eval_docs)]
    t_tok = time.time() - t_start
    train_tokens = sum(map(len, train_ids)) + len(train_ids)  # + one EOS per document
    eval_rows = pack(eval_ids, eos_id, args.seq_len)
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {t_tok:.0f} s; train {train_tokens:,} tokens, "
          f"eval {eval_rows.numel():,} tokens in {len(eval_rows)} rows", flush=True)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=eos_id, pad_token_id=hf_tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.min_lr_ratio))

    amp = not args.no_amp
    curve = {"train": [], "eval": []}
    best = (float("inf"), 0, None)  # (loss, step, state)
    stop_reason, run_loss, run_n, epoch = f"max steps ({args.max_steps})", 0.0, 0, 0
    tokens_per_step = args.batch_size * args.seq_len
    t_train = time.time()
    model.train()
    bar = tqdm(total=args.max_steps, desc="train", unit="step", mininterval=5, dynamic_ncols=True)
    stream = batches(train_ids, eos_id, args.seq_len, args.batch_size, args.seed)
    for step in range(1, args.max_steps + 1):
        epoch, x = next(stream)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        run_loss, run_n = run_loss + loss.item(), run_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", epoch=epoch, refresh=False)

        last = step == args.max_steps
        out_of_time = (time.time() - t_start) / 60 > args.max_minutes
        if step % args.eval_every == 0 or last or out_of_time:
            tokens = step * tokens_per_step
            curve["train"].append({"step": step, "tokens": tokens, "loss": run_loss / run_n})
            run_loss, run_n = 0.0, 0
            ev = evaluate(model, eval_rows, amp=amp)
            curve["eval"].append({"step": step, "tokens": tokens, "loss": ev, "ppl": math.exp(ev),
                                  "minutes": (time.time() - t_train) / 60})
            if ev < best[0]:
                best = (ev, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            tqdm.write(f"step {step}: train {curve['train'][-1]['loss']:.4f}  held-out {ev:.4f} "
                       f"(ppl {math.exp(ev):.2f})  epoch {epoch}  {curve['eval'][-1]['minutes']:.1f} min")
            sys.stdout.flush()
            if out_of_time:
                stop_reason = f"wall-clock cap ({args.max_minutes:g} min)"
                break
            if flattened([e["loss"] for e in curve["eval"]], args.patience, args.flat_threshold):
                stop_reason = (f"held-out loss flattened (< {args.flat_threshold:.1%} better over the last "
                               f"{args.patience} evals)")
                break
    bar.close()
    steps = step
    wall_train = time.time() - t_train

    # Save the best checkpoint, then measure what was saved, in float32, as the pipeline will load it.
    model.load_state_dict(best[2])
    model.generation_config = GenerationConfig(bos_token_id=hf_tok.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=hf_tok.pad_token_id)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(out)
    saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    final = evaluate(saved, eval_rows, amp=False)
    prompt = hf_tok("def fibonacci(n):", return_tensors="pt")
    gen = saved.generate(**prompt, max_new_tokens=40, do_sample=False)
    sample = hf_tok.decode(gen[0])
    print(f"final held-out loss {final:.4f}, perplexity {math.exp(final):.2f}", flush=True)

    (out / "loss_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    plot(curve, out / "loss_curve.png")
    report = dict(
        args=vars(args), command=shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv),
        curve=curve, stop_reason=stop_reason, steps=steps, best_step=best[1],
        tokens_seen=steps * tokens_per_step, epochs=steps * tokens_per_step / train_tokens,
        wall_minutes=(time.time() - t_start) / 60, train_minutes=wall_train / 60, tokenizer_seconds=t_tok,
        machine=machine(), transformers=transformers.__version__, tokenizers=tokenizers.__version__,
        stdlib_root=str(stdlib_root()), params=params, vocab_size=tok.get_vocab_size(),
        train_files=len(train_docs), eval_files=len(eval_docs),
        train_chars=sum(map(len, train_docs)), eval_chars=sum(map(len, eval_docs)),
        train_tokens=train_tokens, eval_tokens_raw=sum(map(len, eval_ids)) + len(eval_ids),
        eval_tokens=eval_rows[:, 1:].numel(), chars_per_token=sum(map(len, train_docs)) / train_tokens,
        final_loss=final, final_ppl=math.exp(final), sample=sample.replace("```", "'''"), size_mb=0.0,
    )
    write_card(out, report)
    # The card states the directory size, which includes the card itself: write it again once known.
    report["size_mb"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    write_card(out, report)
    print(f"wrote {out} ({report['size_mb']:.1f} MB) in {report['wall_minutes']:.1f} min; stop: {stop_reason}")


if __name__ == "__main__":
    main()
