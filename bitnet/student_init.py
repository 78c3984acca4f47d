"""The superposition student initialised from its teacher: a smaller copy of a Llama-family teacher (Llama, Mistral,
Qwen2), cut down in depth, width, heads and MLP channels, in the spirit of Minitron (arXiv 2407.14679): prune
first, then distil.

The rules, each from a small calibration set of the teacher's own activations (``teacher_statistics``):

- **Depth**: the student's blocks are the teacher's, evenly spaced over the blocks below the reconstructed layer
  (first and last included).
- **Width**: the residual stream is rotated onto its principal directions and the leading ``student.dim`` kept:
  ``P`` (teacher width x student width) holds the top eigenvectors of the second moment of the RMS-normalised residual
  stream at every norm's input. Every RMSNorm's weight is folded into the projection that reads it, and the
  student's norm weight becomes the constant that restores the RMS the kept directions carry.
- **Heads**: the student's heads are the teacher's most important ones (importance: mean |output| of each head's
  channels times the norm of the ``o_proj`` column it feeds); grouped key/value heads are repeated.
- **Head size**: queries and keys keep the rotary pairs whose frequencies are exactly the student's
  (every ``teacher head_dim / student head_dim``-th pair), so rotary embeddings stay exact; queries are scaled so
  the kept dimensions' attention logits keep the teacher's temperature. Values and ``o_proj`` keep each head's most
  important channels.
- **MLP**: the most important SwiGLU channels (mean |silu(gate) * up| times the norm of their ``down_proj`` column).
- **Embeddings and LM head**: projected by ``P`` (the head after folding the final norm's weight).
- **Decompressor**: the inverse rotation, through its GELU and LayerNorm exactly (up to a per-token scale, which
  the cosine loss ignores): ``W1 = [I; -I]`` so ``GELU(x) - GELU(-x) = x``, the LayerNorm's mean cancels in the
  difference, and ``W2 = [M, -M]`` with ``M = diag(final norm weight) P`` for the last layer (``P`` for an inner one).

At full width (student as large as the teacher) the student computes the teacher's function exactly before
quantization; the tests check that. Qwen2's query/key/value biases have no place in the student's bias-free
``BitLinear`` and are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .student import Decompressor, StudentConfig, SuperpositionStudent


FAMILIES = {"llama", "mistral", "qwen2"}  # the teachers whose blocks init_from_teacher reads


def _attention_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def _rope(config) -> tuple[str, float | None]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return params.get("rope_type", params.get("type", "default")) or "default", theta


def derivation_problems(config, student: StudentConfig, projector_hidden: int | None = None) -> list[str]:
    """What keeps ``student`` from being cut out of a teacher with Hugging Face ``config`` (empty: nothing); each
    problem names the student field to change. ``projector_hidden``: the decompressor's width as it will be built."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return [f"a {model_type} teacher: the student is cut out of {', '.join(sorted(FAMILIES))} teachers (their "
                "module names and pre-norm SwiGLU blocks)"]
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"the teacher's MLP uses {config.hidden_act}, the student's SwiGLU silu: a Llama-family "
                        "teacher (Llama, Mistral, Qwen2) is needed")
    heads, _, head_dim = _attention_shape(config)
    s_head_dim = student.dim // student.n_heads
    checks = [
        ("dim", student.dim, config.hidden_size, "the teacher's hidden_size"),
        ("n_layers", student.n_layers, config.num_hidden_layers, "the teacher's num_hidden_layers"),
        ("n_heads", student.n_heads, heads, "the teacher's num_attention_heads"),
        ("mlp_hidden", student.mlp_hidden, config.intermediate_size, "the teacher's intermediate_size"),
    ]
    problems += [f"student.{field} {value} exceeds {what} ({limit}): give at most {limit}"
                 for field, value, limit, what in checks if value > limit]
    if head_dim % s_head_dim:
        problems.append(f"the student's head size (student.dim / student.n_heads = {s_head_dim}) must divide the "
                        f"teacher's ({head_dim}) for its rotary frequencies to be a subset of the teacher's: change "
                        "student.dim or student.n_heads")
    rope_type, theta = _rope(config)
    if rope_type != "default":
        problems.append(f"the teacher's rotary embeddings are {rope_type!r}-scaled; the student's are plain: "
                        "use student.init: random for this teacher")
    elif theta is not None and not math.isclose(theta, student.rope_theta):
        problems.append(f"student.rope_theta {student.rope_theta:g} differs from the teacher's {theta:g}: "
                        f"set student.rope_theta: {theta:g}")
    hidden = projector_hidden or config.hidden_size
    if hidden < 2 * student.dim:
        problems.append(f"the decompressor's width ({hidden}) must be at least 2 x student.dim ({2 * student.dim}) to "
                        f"start as the exact inverse projection: set student.projector_hidden >= {2 * student.dim}")
    return problems


def evenly_spaced(n: int, total: int) -> list[int]:
    """``n`` of ``range(total)``, evenly spaced, first and last included."""
    if n == 1:
        return [total - 1]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def matched_layers(inner: list[int], target: int, n_layers: int) -> dict[int, int]:
    """Each inner teacher ``hidden_states`` index -> the student's matched with it: the student state whose teacher
    counterpart (the embeddings, or the output of the block ``init_from_teacher`` takes for that student block) is
    nearest, the shallower on a tie."""
    counterparts = [0] + [t + 1 for t in evenly_spaced(n_layers, target)]
    return {j: min(range(n_layers + 1), key=lambda i: (abs(counterparts[i] - j), i)) for j in inner}


@dataclass
class TeacherStatistics:
    """Second moments of the RMS-normalised residual stream at each norm's input (``[D, D]`` per site, summed over
    tokens) and the mean |activation| of each attention channel (``o_proj``'s input) and MLP channel (``down_proj``'s
    input), per block, from the calibration tokens."""

    residual: dict[str, torch.Tensor]  # "in.<i>", "mid.<i>", "final"
    attention: list[torch.Tensor]  # [heads * head_dim] per block
    mlp: list[torch.Tensor]  # [intermediate_size] per block
    tokens: int


def _blocks(teacher: nn.Module) -> nn.ModuleList:
    return teacher.model.layers


@torch.no_grad()
def teacher_statistics(teacher: nn.Module, batches) -> TeacherStatistics:
    """Run ``teacher`` over ``batches`` (``(input_ids, attention_mask)`` pairs) and gather what the initialisation
    ranks by; padding tokens are left out."""
    residual: dict[str, torch.Tensor] = {}
    attention = [None] * len(_blocks(teacher))
    mlp = [None] * len(_blocks(teacher))
    keep: list[torch.Tensor] = []  # the current batch's token mask, flattened

    def moment(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()[keep[0]]
            x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-12)
            residual[name] = residual.get(name, 0) + x.T @ x
        return hook

    def mean_abs(store, i):
        def hook(module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).float()[keep[0]].abs().sum(0)
            store[i] = a if store[i] is None else store[i] + a
        return hook

    handles = [teacher.model.norm.register_forward_pre_hook(moment("final"))]
    for i, block in enumerate(_blocks(teacher)):
        handles += [block.input_layernorm.register_forward_pre_hook(moment(f"in.{i}")),
                    block.post_attention_layernorm.register_forward_pre_hook(moment(f"mid.{i}")),
                    block.self_attn.o_proj.register_forward_pre_hook(mean_abs(attention, i)),
                    block.mlp.down_proj.register_forward_pre_hook(mean_abs(mlp, i))]
    tokens = 0
    try:
        for ids, mask in batches:
            keep[:] = [mask.reshape(-1).bool()]
            tokens += int(keep[0].sum())
            teacher(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ValueError("teacher_statistics: the calibration batches hold no tokens")
    return TeacherStatistics(residual, [a / tokens for a in attention], [m / tokens for m in mlp], tokens)


def _principal(moment: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` eigenvectors of a symmetric moment matrix, as columns, largest first, with a sign fixed so the
    result does not depend on the eigensolver's."""
    values, vectors = torch.linalg.eigh(moment.double())
    top = vectors[:, values.argsort(descending=True)[:k]]
    signs = torch.sign(top[top.abs().argmax(0), torch.arange(k)])
    return (top * signs).float()


def _kept_energy(moment: torch.Tensor, basis: torch.Tensor) -> float:
    return float((basis.T @ moment.float() @ basis).trace() / moment.float().trace())


def _inverse(projector: Decompressor, M: torch.Tensor) -> None:
    """``projector(x) = M x / s(x)``, ``s`` a per-token scale, through its GELU and LayerNorm (module docstring)."""
    up, norm, down = projector.net[0], projector.net[2], projector.net[3]
    d = M.shape[1]
    eye = torch.eye(d)
    up.weight.zero_(), up.bias.zero_(), down.weight.zero_(), down.bias.zero_()
    up.weight[:2 * d].copy_(torch.cat([eye, -eye]))
    down.weight[:, :2 * d].copy_(torch.cat([M, -M], dim=1))
    norm.reset_parameters()


@torch.no_grad()
def init_from_teacher(student: SuperpositionStudent, projector: Decompressor, teacher: nn.Module,
                      stats: TeacherStatistics, target_layer: int,
                      inner: dict[int, Decompressor] | None = None) -> dict:
    """Overwrite ``student`` and ``projector`` with the cut-down teacher (the rules in this module's docstring);
    ``target_layer`` is the ``hidden_states`` index the student reconstructs (-1: the last, after the final norm),
    and ``inner`` the decompressors of inner teacher layers matched too (by index; each starts as the inverse
    projection onto the residual stream). Returns what was chosen: the teacher blocks, the residual energy the kept
    directions hold, the heads."""
    config, cfg = teacher.config, student.config
    problems = derivation_problems(config, cfg, projector.config["hidden_dim"])
    if problems:
        raise ValueError("the student cannot be cut out of this teacher: " + "; ".join(problems))
    n_blocks = config.num_hidden_layers
    target = target_layer % (n_blocks + 1)
    if target == 0:
        raise ValueError("the student reconstructs the teacher's embeddings (hidden_states[0]): nothing to cut out")
    if cfg.n_layers > target:
        raise ValueError(f"student.n_layers {cfg.n_layers} exceeds the {target} teacher blocks below the reconstructed "
                         f"layer {target_layer}: give at most {target}")
    D, d = config.hidden_size, cfg.dim
    chosen = evenly_spaced(cfg.n_layers, target)
    P = _principal(sum(stats.residual.values()), d)  # [D, d]
    scale = {site: math.sqrt(_kept_energy(m, P) * D / d) for site, m in stats.residual.items()}

    H, K, hd = _attention_shape(config)
    hs = d // cfg.n_heads
    stride = hd // hs
    rope_dims = torch.cat([torch.arange(hs // 2) * stride, hd // 2 + torch.arange(hs // 2) * stride])
    blocks = _blocks(teacher)
    heads_chosen = []

    def read(linear: nn.Linear, norm: nn.Module) -> torch.Tensor:  # [out, D] -> [out, d], the norm folded in
        return linear.weight.float() * norm.weight.float() @ P

    for s_block, t in zip(student.blocks, chosen):
        block = blocks[t]
        attn, mlp = block.self_attn, block.mlp
        # heads by importance: mean |channel output| x the norm of the o_proj column it feeds
        importance = stats.attention[t] * attn.o_proj.weight.float().norm(dim=0)
        per_head = importance.view(H, hd)
        heads = per_head.sum(-1).topk(cfg.n_heads).indices.sort().values
        heads_chosen.append(heads.tolist())
        q = read(attn.q_proj, block.input_layernorm).view(H, hd, d)
        k = read(attn.k_proj, block.input_layernorm).view(K, hd, d)
        v = read(attn.v_proj, block.input_layernorm).view(K, hd, d)
        o = attn.o_proj.weight.float().view(D, H, hd)
        v_dims = per_head[heads].topk(hs, dim=-1).indices.sort(dim=-1).values  # [n_heads, hs]
        group = H // K
        qs = q[heads][:, rope_dims] * math.sqrt(hs / hd)
        ks = k[heads // group][:, rope_dims]
        vs = torch.stack([v[h // group, dims] for h, dims in zip(heads.tolist(), v_dims)])
        os_ = torch.stack([o[:, h, dims] for h, dims in zip(heads.tolist(), v_dims)], dim=1)  # [D, n_heads, hs]
        s_block.attn.qkv.weight.copy_(torch.cat([qs, ks, vs]).reshape(3 * d, d))
        s_block.attn.out.weight.copy_(P.T @ os_.reshape(D, d))
        s_block.attn_norm.weight.fill_(scale[f"in.{t}"])

        channels = (stats.mlp[t] * mlp.down_proj.weight.float().norm(dim=0)).topk(cfg.mlp_hidden).indices.sort().values
        s_block.mlp.gate.weight.copy_(read(mlp.gate_proj, block.post_attention_layernorm)[channels])
        s_block.mlp.up.weight.copy_(read(mlp.up_proj, block.post_attention_layernorm)[channels])
        s_block.mlp.down.weight.copy_(P.T @ mlp.down_proj.weight.float()[:, channels])
        s_block.mlp_norm.weight.fill_(scale[f"mid.{t}"])

    student.embed.weight.copy_(teacher.get_input_embeddings().weight.float() @ P)
    final_norm = teacher.model.norm
    student.norm.weight.fill_(scale["final"])
    if cfg.tie_embeddings:  # one matrix for both ends: the embedding's projection (the head loses the norm fold)
        student.lm_head.weight = student.embed.weight
    else:
        student.lm_head.weight.copy_(read(teacher.get_output_embeddings(), final_norm))

    # student space -> the target's: after the final norm, its weight applies
    _inverse(projector, final_norm.weight.float()[:, None] * P if target == n_blocks else P)
    for inner_projector in (inner or {}).values():
        _inverse(inner_projector, P)
    return {"teacher_blocks": chosen, "heads": heads_chosen, "calibration_tokens": stats.tokens,
            "residual_energy_kept": round(_kept_energy(sum(stats.residual.values()), P), 4)}
