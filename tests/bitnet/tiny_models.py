"""Tiny causal LMs of several families, saved and reloaded so the real from_pretrained path is exercised."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **_COMMON),  # q/k/v projections carry biases
    "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, **_COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON),
    "phi3": lambda: tf.Phi3Config(**_COMMON),  # fused qkv and gate_up projections
}


def tiny_causal_lm(family: str, tmp_path, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build a randomly initialised tiny model, save it, and load it back with from_pretrained."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]())
    path = tmp_path / f"{family}-{str(dtype).split('.')[-1]}"
    model.to(dtype).save_pretrained(path)
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def token_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
