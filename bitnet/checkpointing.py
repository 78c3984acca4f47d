"""Activation checkpointing of transformer blocks: during the forward pass each block keeps only its inputs, and
backward recomputes the block's activations when it reaches it (``torch.utils.checkpoint``, non-reentrant). Memory
for activations drops from every block's intermediates to one block's, for one more forward pass of the blocks.

Why not transformers' own switch (``gradient_checkpointing_enable``): it checkpoints only modules in training mode,
and training mode turns dropout on, in the dual model's teacher mode too, which would then no longer compute the
original model. Here checkpointing depends on autograd alone: a block runs checkpointed exactly when gradients are
being recorded, in eval mode as well.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

# Keyword arguments under which Hugging Face blocks receive a KV cache. A checkpointed block runs twice, and a
# cache would be appended to twice.
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


def checkpoint_blocks(model: nn.Module, block_lists: list[str], context_fn=noop_context_fn) -> int:
    """Checkpoint every block of the ``nn.ModuleList``s named ``block_lists``; returns how many blocks.

    ``context_fn`` is ``torch.utils.checkpoint``'s: called at each block's forward, it returns the context managers
    of that forward and of its recomputation (``DualModel`` uses it to replay a block in the mode it ran in).
    Module names, parameters and state dicts are unchanged (the blocks' ``forward`` is wrapped in place); deep-copy
    a model before checkpointing it, not after. Calling it again is harmless."""
    blocks = [block for name in block_lists for block in model.get_submodule(name)]
    for block in blocks:
        if not getattr(block.forward, "checkpointed", False):
            block.forward = _checkpointed(block.forward, context_fn)
    return len(blocks)


def _checkpointed(forward, context_fn):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # no backward to replay for: run as is
            return forward(*args, **kwargs)
        if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
            raise ValueError("activation checkpointing replays each block during backward, which would update the "
                             "KV cache a second time: call the model with use_cache=False while training")
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    run.checkpointed = True
    return run
