"""Build configs/lm_eval/stdlib_next_line.jsonl, the data of the local lm-evaluation-harness task
``stdlib_next_line`` (configs/lm_eval/stdlib_next_line.yaml): choose the true next line of code among four.

    .venv/bin/python scripts/build_stdlib_next_line.py [--out PATH] [--seed 0] [--per-module 8]

Every example comes from a held-out module of the standard library corpus (``distill.data.stdlib_documents("eval")``:
modules the quickstart teacher never saw, and that no run trains on). In each module, target lines are drawn at
random among its candidate lines: 8 to 80 characters once stripped, not a comment, not the first four lines, and
outside triple-quoted strings (prose is not code). An example's context is the lines just before the target, at
most 8 of them and 320 characters (whole lines), so that nearly every example fits the quickstart's 128-token
window (the harness truncates a longer one from the left). Its three distractors are other candidate lines of the
same file, different from the target and from each other once stripped, re-indented to the target's indentation, so
that indentation alone never gives the answer. The answer's position is drawn too. Examples are shuffled, so that
``limit`` (the first N) samples every module.

The output depends on the standard library's source, which changes between Python versions: the committed JSONL
was built from CPython 3.11.7 and is the task's data whatever Python runs the pipeline. Rebuild it only on purpose.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from distill.data import stdlib_documents  # noqa: E402

OUT = REPO_ROOT / "configs" / "lm_eval" / "stdlib_next_line.jsonl"
CONTEXT_LINES, CONTEXT_CHARS = 8, 320
MIN_CHARS, MAX_CHARS = 8, 80
N_CHOICES = 4


def candidate_lines(lines: list[str]) -> list[int]:
    """Indices of lines that may be a target or a distractor: code, not prose inside a triple-quoted string."""
    out, in_string = [], False
    for i, line in enumerate(lines):
        stripped = line.strip()
        quotes = stripped.count('"""') + stripped.count("'''")
        starts_or_inside = in_string or quotes > 0
        if quotes % 2 == 1:
            in_string = not in_string
        if starts_or_inside or not MIN_CHARS <= len(stripped) <= MAX_CHARS or stripped.startswith("#"):
            continue
        out.append(i)
    return out


def context_before(lines: list[str], i: int) -> str:
    """Up to CONTEXT_LINES whole lines before line ``i``, at most CONTEXT_CHARS characters, ending with a newline."""
    kept: list[str] = []
    for line in reversed(lines[max(0, i - CONTEXT_LINES):i]):
        if sum(len(k) + 1 for k in kept) + len(line) + 1 > CONTEXT_CHARS:
            break
        kept.insert(0, line)
    return "".join(k + "\n" for k in kept)


def module_examples(module: str, text: str, rng: random.Random, per_module: int) -> list[dict]:
    lines = text.splitlines()
    candidates = candidate_lines(lines)
    targets = [i for i in candidates if i >= 4 and context_before(lines, i).strip()]
    examples = []
    for i in sorted(rng.sample(targets, min(per_module, len(targets)))):
        target = lines[i]
        indent = target[:len(target) - len(target.lstrip())]
        pool = [j for j in candidates if lines[j].strip() != target.strip()]
        rng.shuffle(pool)
        distractors: list[str] = []
        for j in pool:
            if lines[j].strip() not in {d.strip() for d in distractors}:
                distractors.append(indent + lines[j].strip())
            if len(distractors) == N_CHOICES - 1:
                break
        if len(distractors) < N_CHOICES - 1:
            continue  # a file too small to offer three different lines
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [target] + distractors[label:]
        examples.append({"module": module, "line": i + 1, "context": context_before(lines, i), "choices": choices,
                         "label": label})
    return examples


def build(seed: int = 0, per_module: int = 8) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for doc in stdlib_documents("eval"):
        examples += module_examples(doc.key, doc.text, rng, per_module)
    rng.shuffle(examples)
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-module", type=int, default=8)
    args = parser.parse_args()
    examples = build(args.seed, args.per_module)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    modules = len({e["module"] for e in examples})
    print(f"{args.out}: {len(examples)} examples from {modules} held-out modules (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
