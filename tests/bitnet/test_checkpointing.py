"""Activation checkpointing of the dual model: the same gradients bit for bit, replayed in the mode each block ran
in, fewer activations kept, and a clear error where a KV cache would be replayed."""

import pytest
import torch

from bitnet import kl_to_teacher, patch_model

from .tiny_models import CONFIGS, tiny_causal_lm, token_batch


def distillation_grads(dual, ids, mask, lam: float = 1.0) -> list[torch.Tensor]:
    """dW gradients of KL(teacher || student), backpropagated after the student context has closed (as the
    training loop does), with the model back in teacher mode."""
    with torch.no_grad(), dual.teacher():
        target = dual(input_ids=ids, attention_mask=mask, use_cache=False).logits
    dual.set_quant_lambda(lam)
    with dual.student():
        loss = kl_to_teacher(dual(input_ids=ids, attention_mask=mask, use_cache=False).logits, target, mask)
    dual.set_quant_lambda(1.0)
    assert dual.mode == "teacher"
    loss.backward()
    grads = [p.grad.clone() for p in dual.trainable_parameters()]
    for p in dual.trainable_parameters():
        p.grad = None
    return grads


def perturbed_dual(family: str, tmp_path, delta: str = "full"):
    dual = patch_model(tiny_causal_lm(family, tmp_path), delta=delta)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dual.trainable_parameters():  # dW != 0, so that student and teacher differ in every layer
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return dual


@pytest.mark.parametrize("family", list(CONFIGS))
def test_checkpointed_gradients_equal_the_plain_ones(family, tmp_path):
    dual = perturbed_dual(family, tmp_path)
    ids = token_batch(batch=2, seq=12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    blends = (1.0, 0.5)  # fully quantized, and the warm-up blend, which the replay must restore too
    plain = [distillation_grads(dual, ids, mask, lam) for lam in blends]
    assert dual.enable_activation_checkpointing() == dual.model.config.num_hidden_layers
    for lam, expected in zip(blends, plain):
        assert all(torch.equal(a, b) for a, b in zip(expected, distillation_grads(dual, ids, mask, lam)))


def test_checkpointed_gradients_equal_for_lora(tmp_path):
    dual = perturbed_dual("llama", tmp_path, delta="lora:4")
    ids = token_batch(batch=2, seq=12)
    mask = torch.ones_like(ids)
    plain = distillation_grads(dual, ids, mask)
    dual.enable_activation_checkpointing()
    assert all(torch.equal(a, b) for a, b in zip(plain, distillation_grads(dual, ids, mask)))


def saved_bytes(dual, ids) -> int:
    """Bytes autograd keeps for backward during one student forward pass."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), dual.student():
        dual(input_ids=ids, use_cache=False).logits.sum()
    return sum(kept.values())


def test_checkpointing_keeps_fewer_activations(tmp_path):
    dual = perturbed_dual("llama", tmp_path)
    ids = token_batch(batch=4, seq=32)
    plain = saved_bytes(dual, ids)
    dual.enable_activation_checkpointing()
    assert saved_bytes(dual, ids) < 0.5 * plain


def test_teacher_mode_and_inference_are_untouched(tmp_path):
    dual = perturbed_dual("llama", tmp_path)
    ids = token_batch()
    with torch.no_grad(), dual.teacher():
        before = dual(input_ids=ids).logits
    dual.enable_activation_checkpointing()
    dual.enable_activation_checkpointing()  # a second call changes nothing
    with torch.no_grad(), dual.teacher():
        assert torch.equal(dual(input_ids=ids).logits, before)  # the KV cache is fine without gradients
        dual.model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)


def test_a_kv_cache_under_checkpointing_is_a_clear_error(tmp_path):
    dual = perturbed_dual("llama", tmp_path)
    dual.enable_activation_checkpointing()
    with dual.student(), pytest.raises(ValueError, match="use_cache=False"):
        dual(input_ids=token_batch(), use_cache=True)
