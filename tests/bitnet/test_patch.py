"""Dual-mode patching: teacher mode is the original model bit for bit; student mode trains only dW."""

import pytest
import torch
import transformers as tf

from bitnet import DualModeLinear, TernaryLinear, kl_to_teacher, patch_model

from .reference import reference_bitlinear
from .tiny_models import CONFIGS, VOCAB, tiny_causal_lm, token_batch

FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_mode_is_bit_exact(family, dtype, tmp_path):
    model = tiny_causal_lm(family, tmp_path, dtype)
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    dual = patch_model(model)
    assert dual.num_patched == 2 * (7 if family in ("llama", "qwen2", "mistral") else 4)
    with torch.no_grad(), dual.teacher():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert torch.equal(ours, theirs)
    with torch.no_grad(), dual.student():
        assert not torch.equal(model(ids, attention_mask=mask).logits, ref.logits)


def test_patching_shares_weights_without_copying(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    dual = patch_model(model)
    for name, layer in dual.layers.items():
        assert layer.weight.data_ptr() == before[f"{name}.weight"]
        assert not layer.weight.requires_grad
    assert isinstance(model.model.layers[0].self_attn.q_proj, DualModeLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, DualModeLinear)


class ByTheBook(torch.nn.Module):
    """A linear layer computed as ``reference_bitlinear`` (float64, integer matmul), sharing no code with bitnet/."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        y = reference_bitlinear(x, self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("reference_layer", [ByTheBook, lambda linear: TernaryLinear.from_latent(linear.weight,
                                                                                                linear.bias)],
                         ids=["by-the-book", "exported-layer"])
def test_student_at_step_zero_is_post_training_ternary_quantization(tmp_path, reference_layer):
    model = tiny_causal_lm("qwen2", tmp_path)
    ids = token_batch()
    reference = tiny_causal_lm("qwen2", tmp_path)  # same seed, same weights: quantize it by hand
    for name in patch_model(tiny_causal_lm("qwen2", tmp_path)).patched_names:
        linear = reference.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, reference_layer(linear))
    dual = patch_model(model)
    with torch.no_grad(), dual.student():
        ours = model(ids).logits
    with torch.no_grad():
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_ptq_context_ignores_the_trained_delta(tmp_path):
    trained = patch_model(tiny_causal_lm("llama", tmp_path))
    for p in trained.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh = patch_model(tiny_causal_lm("llama", tmp_path))
    ids = token_batch()
    with torch.no_grad():
        with fresh.student():
            baseline = fresh(ids).logits
        with trained.ptq():
            assert trained.mode == "student"
            assert torch.equal(trained(ids).logits, baseline)
        with trained.student():
            assert not torch.equal(trained(ids).logits, baseline)
    assert trained.mode == "teacher"


def test_gradients_reach_only_delta(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    dual = patch_model(model)
    with dual.student():
        model(token_batch(), labels=token_batch()).loss.backward()
    trainable = {id(p) for p in dual.trainable_parameters()}
    assert len(trainable) == dual.num_patched
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_lora_delta_is_small_and_starts_at_zero(tmp_path):
    full = patch_model(tiny_causal_lm("llama", tmp_path))
    lora = patch_model(tiny_causal_lm("llama", tmp_path), delta="lora:4")
    n_lora = sum(p.numel() for p in lora.trainable_parameters())
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in lora.layers.values())
    assert n_lora == expected < sum(p.numel() for p in full.trainable_parameters())
    ids = token_batch()
    with torch.no_grad(), full.student(), lora.student():
        torch.testing.assert_close(lora(ids).logits, full(ids).logits, rtol=0, atol=0)


def test_delta_state_dict_round_trip(tmp_path):
    source = patch_model(tiny_causal_lm("llama", tmp_path), delta="lora:2")
    for p in source.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    target = patch_model(tiny_causal_lm("llama", tmp_path), delta="lora:2")
    target.load_delta_state_dict(source.delta_state_dict())
    ids = token_batch()
    with torch.no_grad(), source.student(), target.student():
        assert torch.equal(source(ids).logits, target(ids).logits)
    with pytest.raises(ValueError, match="delta state does not match"):
        patch_model(tiny_causal_lm("llama", tmp_path)).load_delta_state_dict(source.delta_state_dict())


def test_mode_context_managers_restore_previous_mode(tmp_path):
    dual = patch_model(tiny_causal_lm("llama", tmp_path))
    assert dual.mode == "teacher"
    with dual.student():
        assert dual.mode == "student"
        with dual.teacher():
            assert dual.mode == "teacher"
        assert dual.mode == "student"
    assert dual.mode == "teacher"


def test_clear_errors(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    with pytest.raises(ValueError, match="'full' or 'lora:R'"):
        patch_model(model, delta="lora:0")
    patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="no nn.Linear layers inside its transformer blocks.*Conv1D"):
        patch_model(gpt2)


@pytest.mark.parametrize("delta", ["full", "lora:8"])
def test_a_few_distillation_steps_lower_the_kl(tmp_path, delta):
    torch.manual_seed(0)
    dual = patch_model(tiny_causal_lm("llama", tmp_path), delta=delta)
    ids = token_batch(batch=4, seq=16, seed=5)
    with torch.no_grad(), dual.teacher():
        teacher_logits = dual(ids).logits

    def kl():
        with dual.student():
            return kl_to_teacher(dual(ids).logits, teacher_logits)

    opt = torch.optim.AdamW(dual.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    with torch.no_grad():
        start = kl().item()
    for _ in range(15):
        loss = kl()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = kl().item()
    assert end < 0.8 * start, (start, end)


MOE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_subclasses_with_a_forward_of_their_own_are_left_alone(dtype):
    """PhiMoE's router is an nn.Linear whose forward returns (logits, weights, experts): replaced by a plain linear
    layer, teacher mode failed deep in the model's code."""
    torch.manual_seed(0)
    model = tf.PhimoeForCausalLM(tf.PhimoeConfig(**MOE)).to(dtype).eval()
    ids = token_batch()
    with torch.no_grad():
        ref = model(ids).logits
    dual = patch_model(model)
    assert not any("router" in name for name in dual.patched_names) and dual.num_patched == 2 * 4  # q, k, v, o
    with torch.no_grad(), dual.teacher():
        assert torch.equal(model(ids).logits, ref)


def test_the_share_of_block_parameters_left_in_full_precision_is_reported():
    torch.manual_seed(0)
    llama = patch_model(tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in MOE.items() if "expert" not in k})))
    share, kept = llama.full_precision_share()
    assert share < 0.01 and set(kept) == {"LlamaRMSNorm"}  # its norms only
    mixtral = patch_model(tf.MixtralForCausalLM(tf.MixtralConfig(**MOE)))  # experts are 3-D tensors, not nn.Linear
    share, kept = mixtral.full_precision_share()
    assert share > 0.85 and kept["MixtralExperts"] == 2 * 4 * 3 * 32 * 64


def test_an_lm_head_held_in_a_module_list_is_not_a_block():
    """MusicGen (an AutoModelForCausalLM) keeps one LM head per codebook in an nn.ModuleList of its own."""
    config = tf.MusicgenDecoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      ffn_dim=64, num_codebooks=2, pad_token_id=0, bos_token_id=1)
    dual = patch_model(tf.MusicgenForCausalLM(config).eval())
    assert dual.num_patched == 10 and not any("lm_heads" in name for name in dual.patched_names)  # self + cross attn
