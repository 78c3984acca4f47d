"""How closely the stock transformers load of an exported student computes what the pipeline's student computed.

The quickstart teacher, patched with dW = 0 (the naive ternary student: the same numerics as a trained one), is
exported by ``bitnet.save_ternary_pretrained`` and loaded back with ``AutoModelForCausalLM.from_pretrained``; both
run the same held-out rows, in float32 and in bfloat16. Our student multiplies the integer codes and applies
``absmax / 127 * mean|W|`` afterwards, quantizing the activations in float32; transformers' ``BitLinear`` divides by
``127 / absmax * (1 / mean|W|)`` in the model's dtype. An activation near a rounding tie can take the neighbouring
int8 code in one of the two, and later layers carry the difference on. This measures how much that moves the logits
and what it does to the metrics the evaluate stage reports.

    .venv/bin/python -m bench.export_fidelity
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers compiles its unpacking on CPU: slow, same numbers
if __package__ in (None, ""):  # run as a script: python bench/export_fidelity.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import parser, report, setup, table, teacher, token_rows  # noqa: E402
from bitnet import patch_model, save_ternary_pretrained  # noqa: E402


def kl(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean KL(p || q) per real token (logits in, last dimension the vocabulary)."""
    log_p, log_q = F.log_softmax(p, -1), F.log_softmax(q, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return float((per_token * mask).sum() / mask.sum())


def compare(dtype: torch.dtype, ids: torch.Tensor, mask: torch.Tensor, root: Path) -> dict:
    import transformers as tf

    model, _ = teacher("quickstart", torch.device("cpu"), dtype)
    dual = patch_model(model)
    with torch.no_grad():
        with dual.teacher():
            teacher_logits = dual(ids, attention_mask=mask).logits.float()
        with dual.student():
            ours = dual(ids, attention_mask=mask).logits.float()
    directory = root / str(dtype).removeprefix("torch.")
    save_ternary_pretrained(dual, directory)
    stock = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = stock(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    return {"max_abs_logit_difference": float((ours - theirs).abs()[real].max()),
            "kl_ours_to_stock": kl(ours, theirs, mask),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1))[real].float().mean()),
            "kl_teacher_to_ours": kl(teacher_logits, ours, mask),
            "kl_teacher_to_stock": kl(teacher_logits, theirs, mask)}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16, help="held-out rows of 128 tokens")
    args = p.parse_args(argv)
    device = setup(args)
    ids, mask = token_rows(args.rows, split="eval")
    with tempfile.TemporaryDirectory() as tmp:
        results = {str(dtype).removeprefix("torch."): compare(dtype, ids, mask, Path(tmp))
                   for dtype in (torch.float32, torch.bfloat16)}
    rows = [[name, r["max_abs_logit_difference"], f"{r['kl_ours_to_stock']:.2e}", f"{r['top1_agreement']:.4f}",
             f"{r['kl_teacher_to_ours']:.4f}", f"{r['kl_teacher_to_stock']:.4f}"] for name, r in results.items()]
    tables = {"The pipeline's student against the stock load of its export (quickstart teacher, dW = 0)": table(
        ["dtype", "max abs logit difference", "KL(ours ‖ stock)", "top-1 agreement", "KL(teacher ‖ ours)",
         "KL(teacher ‖ stock)"], rows)}
    report("export_fidelity", args, device, tables, results)


if __name__ == "__main__":
    main()
