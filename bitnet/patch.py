"""Dual-mode patching of a Hugging Face causal LM for self-distillation.

``patch_model`` swaps every ``nn.Linear`` inside the transformer blocks for a ``DualModeLinear`` that shares
the original weight. Embeddings, norms and the LM head stay as they are. One model object then plays both
roles: ``with dual.teacher():`` runs the original model bit for bit, ``with dual.student():`` runs the BitNet
student on ``W + dW``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .checkpointing import checkpoint_blocks
from .layers import STUDENT, TEACHER, DualModeLinear, parse_delta


def _output_modules(model: nn.Module) -> set[int]:
    """Ids of the LM head's modules: never part of the blocks, even where it is a list of heads (MusicGen's
    ``lm_heads``, one per codebook)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()


def find_block_lists(model: nn.Module) -> list[str]:
    """Names of the model's lists of transformer blocks: the outermost ``nn.ModuleList``s that contain linear
    layers (``model.layers`` in Llama, Qwen2, Mistral, Phi3; ``gpt_neox.layers``; ...), the LM head excluded."""
    block_lists: list[str] = []
    head = _output_modules(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or id(module) in head:
            continue
        if any(name.startswith(prefix + ".") for prefix in block_lists):
            continue  # a list nested inside a block (e.g. MoE experts): part of that block
        if any(isinstance(m, nn.Linear) for m in module.modules()):
            block_lists.append(name)
    return block_lists


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` that computes what ``nn.Linear`` computes. A subclass with its own ``forward`` (a MoE router
    returning a tuple, Falcon's linear adding its bias in a second rounding) does something else: replacing it with
    ``F.linear`` would break teacher mode's exactness or the model's code."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def find_block_linears(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` modules (``is_plain_linear``) inside the model's transformer blocks
    (``find_block_lists``), except those the model keeps in full precision (``kept_in_full_precision``).

    This is architecture-agnostic and leaves the LM head and any projection outside the blocks alone.
    """
    return [full for name in find_block_lists(model) for sub, m in model.get_submodule(name).named_modules()
            if is_plain_linear(m) and not kept_in_full_precision(model, full := f"{name}.{sub}")]


def full_precision_block_parameters(model: nn.Module, block_lists: list[str]) -> dict[str, int]:
    """Parameters of the blocks that no patched layer holds, by the kind of module that owns them (norms, biases
    elsewhere, MoE experts stored as 3-D tensors, linear subclasses, layers kept in full precision): what stays in
    full precision in the student."""
    counts: dict[str, int] = {}
    patched = {id(m) for layer in model.modules() if isinstance(layer, DualModeLinear) for m in layer.modules()}
    for name in block_lists:
        for module in model.get_submodule(name).modules():
            if id(module) in patched:  # its W is ternary; its dW is the student's, not the teacher's
                continue
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if own:
                counts[type(module).__name__] = counts.get(type(module).__name__, 0) + own
    return counts


def kept_in_full_precision(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` matches the model's ``_keep_in_fp32_modules`` (e.g. DeepSeek-V3.2's
    ``indexer.weights_proj``): transformers' bitnet loader never converts those, so a ternary one could not be
    loaded. Matched as transformers does (a prefix up to a module boundary, a regex, a suffix), and as a substring,
    as its older releases did: a layer wrongly left in full precision costs a little size, one wrongly packed a
    failed load."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(pattern in name or re.match(rf"(?:{pattern}){boundary}", name)
               for pattern in getattr(model, "_keep_in_fp32_modules", None) or ())


class DualModel:
    """A patched model plus the handles to switch it between teacher and student.

    Call it like the model (``dual(input_ids=...)``); ``dual.model`` is the patched transformers model.
    """

    def __init__(self, model: nn.Module, layers: dict[str, DualModeLinear], block_lists: list[str]):
        self.model = model
        self.layers = layers
        self.block_lists = block_lists  # the nn.ModuleLists of transformer blocks the layers were found in

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def num_patched(self) -> int:
        return len(self.layers)

    def full_precision_share(self) -> tuple[float, dict[str, int]]:
        """The share of the blocks' parameters that stay in full precision in the student, and those parameters by
        the kind of module owning them (``full_precision_block_parameters``)."""
        kept = full_precision_block_parameters(self.model, self.block_lists)
        ternary = sum(layer.weight.numel() for layer in self.layers.values())
        return sum(kept.values()) / max(sum(kept.values()) + ternary, 1), kept

    @property
    def patched_names(self) -> list[str]:
        return list(self.layers)

    @property
    def mode(self) -> str:
        return next(iter(self.layers.values())).mode

    def set_mode(self, mode: str) -> None:
        if mode not in (TEACHER, STUDENT):
            raise ValueError(f"mode must be {TEACHER!r} or {STUDENT!r}, got {mode!r}")
        for layer in self.layers.values():
            layer.mode = mode

    @contextmanager
    def _mode(self, mode: str) -> Iterator[DualModel]:
        previous = self.mode
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.set_mode(previous)

    def teacher(self):
        """Context manager: the original model, exactly."""
        return self._mode(TEACHER)

    def student(self):
        """Context manager: the BitNet student on W + dW."""
        return self._mode(STUDENT)

    @contextmanager
    def ptq(self) -> Iterator[DualModel]:
        """Context manager: the student with dW ignored, i.e. naive post-training ternary quantization."""
        with self.student():
            for layer in self.layers.values():
                layer.use_delta = False
            try:
                yield self
            finally:
                for layer in self.layers.values():
                    layer.use_delta = True

    def enable_activation_checkpointing(self) -> int:
        """Recompute each transformer block's activations during backward instead of keeping them
        (``bitnet.checkpointing``); returns how many blocks. Gradients are unchanged. A block is replayed with the
        settings it ran with (mode, quantizer blend, dW on or off), whatever they are when backward runs: the
        student's loss is usually backpropagated after its ``with dual.student():`` block has closed."""
        return checkpoint_blocks(self.model, self.block_lists, context_fn=self._replay_as_now)

    def _settings(self) -> list[tuple[str, float, bool]]:
        return [(layer.mode, layer.quant_lambda, layer.use_delta) for layer in self.layers.values()]

    def _apply(self, settings: list[tuple[str, float, bool]]) -> None:
        for layer, (mode, lam, use_delta) in zip(self.layers.values(), settings):
            layer.mode, layer.quant_lambda, layer.use_delta = mode, lam, use_delta

    @contextmanager
    def _replaying(self, settings: list[tuple[str, float, bool]]) -> Iterator[None]:
        previous = self._settings()
        self._apply(settings)
        try:
            yield
        finally:
            self._apply(previous)

    def _replay_as_now(self):
        """``context_fn`` of a checkpointed block: nothing for its forward; its recomputation under the settings
        of this moment."""
        return nullcontext(), self._replaying(self._settings())

    def set_quant_lambda(self, lam: float) -> None:
        """Quantizer warm-up blend for the student, in [0, 1] (1 = fully ternary / int8)."""
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"quant lambda must lie in [0, 1], got {lam}")
        for layer in self.layers.values():
            layer.quant_lambda = float(lam)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The dW parameters: the only ones that train."""
        return [p for layer in self.layers.values() for p in layer.delta.parameters()]

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """dW tensors keyed by ``<layer name>.delta.<param>``: a small checkpoint (no frozen weights)."""
        return {
            f"{name}.delta.{key}": tensor.detach()
            for name, layer in self.layers.items()
            for key, tensor in layer.delta.state_dict().items()
        }

    def load_delta_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load dW tensors saved by ``delta_state_dict``; keys and shapes must match exactly."""
        expected = self.delta_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"delta state does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                "(was it saved with another architecture or another delta setting, e.g. 'full' vs 'lora:R'?)"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"delta {key}: saved shape {tuple(tensor.shape)} != model {tuple(expected[key].shape)}")
        for name, layer in self.layers.items():
            prefix = f"{name}.delta."
            layer.delta.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def to(self, *args, **kwargs) -> DualModel:
        self.model.to(*args, **kwargs)
        return self


def patch_model(model: nn.Module, delta: str = "full", delta_dtype: torch.dtype = torch.float32) -> DualModel:
    """Patch ``model`` in place for self-distillation and return its ``DualModel`` handle.

    Every ``nn.Linear`` in the transformer blocks becomes a ``DualModeLinear`` around the same weight tensor.
    All original parameters are frozen; only dW trains. ``delta`` is ``"full"`` (dW shaped like W) or
    ``"lora:R"`` (dW = B @ A of rank R). The model starts in teacher mode.
    """
    parse_delta(delta)  # fail on a bad spec before touching the model
    if any(isinstance(m, DualModeLinear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already patched for self-distillation: keep the DualModel returned by "
            "the first patch_model call, or reload the original model to patch it afresh"
        )
    block_lists, names = find_block_lists(model), find_block_linears(model)
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if "linear" in type(m).__name__.lower()
                        or type(m).__name__ == "Conv1D"})
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers inside its transformer blocks to patch "
            f"(projection modules found: {kinds or 'none'}). patch_model supports causal LMs whose blocks use "
            "torch.nn.Linear (Llama, Qwen2, Mistral, Phi3, GPT-NeoX, ...)."
        )
    model.requires_grad_(False)
    layers: dict[str, DualModeLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        dual = DualModeLinear(model.get_submodule(name), delta=delta, delta_dtype=delta_dtype)
        setattr(model.get_submodule(parent_name), child, dual)
        layers[name] = dual
    return DualModel(model, layers, block_lists)
