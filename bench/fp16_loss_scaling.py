"""How far from the fp32 gradient is a float16 self-distillation step, with and without loss scaling?

A teacher loaded in float16 (``teacher.dtype: float16``) computes its activations, and so their gradients, in
float16, whose smallest normal number is 6e-5 and smallest subnormal 6e-8. The KL gradient per logit is
(p_student - p_teacher) / tokens: as the student nears the teacher it sinks into that range, loses precision, and at
last rounds to zero. ``distill.loop.train`` therefore scales the loss
(torch's GradScaler, from 2**16) whenever the model computes in float16.

This script measures the gradient of dW (``delta: full``, fp32) for one batch of real held-out tokens on the
quickstart teacher: in fp32 (the reference), in fp16 as the loss comes, and in fp16 with the loss times 2**16
(divided back afterwards). How close the student is to the teacher is set with the quantizers' blend ``lambda``
(``DualModel.set_quant_lambda``: 1 is the ternary student, smaller values lie between it and the teacher), a
stand-in for a student part-way through training; the KL column says where each row stands (the quickstart's
trained students end near KL 0.06).

    .venv/bin/python -m bench.fp16_loss_scaling            # CPU: about a minute; on a GPU the same
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/fp16_loss_scaling.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import parser, report, setup, table, teacher, token_rows  # noqa: E402

LAMBDAS = (1.0, 0.3, 0.1, 0.03)
SCALE = 2.0 ** 16  # GradScaler's initial scale


def gradient(dtype: torch.dtype, lam: float, scale: float, ids, mask, device) -> tuple[torch.Tensor, float]:
    """dW's gradient (flattened, fp32, divided by ``scale``) and the KL, for a teacher computing in ``dtype``."""
    from bitnet import kl_to_teacher, patch_model

    model, _ = teacher("quickstart", device, dtype)
    dual = patch_model(model, delta="full", delta_dtype=torch.float32)
    dual.set_quant_lambda(lam)
    with torch.no_grad(), dual.teacher():
        target = dual(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with dual.student():
        logits = dual(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kl = kl_to_teacher(logits, target, mask, 1.0)
    (kl * scale).backward()
    grad = torch.cat([p.grad.flatten().float() for p in dual.trainable_parameters()]) / scale
    return grad, kl.item()


def compare(grad: torch.Tensor, reference: torch.Tensor) -> dict:
    nonzero = reference != 0
    return {"relative_error": float((grad - reference).norm() / reference.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(grad.double(), reference.double(), dim=0)),
            "zero_where_fp32_is_not": float((grad[nonzero] == 0).float().mean()),
            # Adam's first update is -lr * sign(g): the share of dW that moves the way the fp32 step would
            "same_sign": float((torch.sign(grad) == torch.sign(reference)).float().mean())}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16, help="the batch: held-out rows of 128 tokens")
    args = p.parse_args(argv)
    device = setup(args)
    ids, mask = (t.to(device) for t in token_rows(args.rows, split="eval"))
    results, rows = [], []
    for lam in LAMBDAS:
        reference, kl32 = gradient(torch.float32, lam, 1.0, ids, mask, device)
        for scale in (1.0, SCALE):
            grad, kl16 = gradient(torch.float16, lam, scale, ids, mask, device)
            result = {"lambda": lam, "loss_scale": scale, "kl_fp32": kl32, "kl_fp16": kl16,
                      **compare(grad, reference)}
            results.append(result)
            rows.append([lam, kl32, "none" if scale == 1 else "2^16", result["relative_error"],
                         result["zero_where_fp32_is_not"], result["same_sign"]])
    headers = ["lambda", "KL (fp32)", "loss scale", "‖g16 - g32‖ / ‖g32‖", "zero where fp32 is not",
               "same sign as fp32"]
    title = f"dW gradient of one fp16 self-distillation step against fp32, quickstart teacher, {args.rows} x 128 tokens"
    report("fp16_loss_scaling", args, device, {title: table(headers, rows)}, {"rows": results})


if __name__ == "__main__":
    main()
