"""Packed ternary export: transformers' layout exactly, stock from_pretrained loading, student round trip."""

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.bitnet import BitLinear as StockBitLinear
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet import (
    BitLinear,
    Decompressor,
    SuperpositionStudent,
    load_student,
    pack_ternary,
    patch_model,
    save_student,
    save_ternary_pretrained,
    unpack_ternary,
)

from .tiny_models import tiny_causal_lm, token_batch


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 19), cols=st.integers(0, 5), seed=st.integers(0, 2**16), flat=st.booleans())
def test_pack_matches_transformers_and_round_trips(rows, cols, seed, flat):
    shape = (rows,) if flat else (rows, cols)
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed))
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape[0] == -(-rows // 4)
    assert torch.equal(packed, pack_weights(codes.clone()))  # transformers' own packer, byte for byte
    assert torch.equal(unpack_ternary(packed, rows), codes.to(torch.int8))
    assert torch.equal(unpack_weights(packed, torch.float32)[:rows], codes.float())


def test_pack_rejects_non_ternary_values():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.tensor([0, 2, -1]))


def trained_dual(family, tmp_path, dtype, delta="full"):
    dual = patch_model(tiny_causal_lm(family, tmp_path, dtype), delta=delta)
    torch.manual_seed(7)
    for p in dual.trainable_parameters():  # stand-in for training: move W + dW across rounding thresholds
        torch.nn.init.normal_(p, std=0.02)
    return dual


# Stated tolerance for "same logits": fp32 differs from our student only in the order the two scales are
# applied (a few ulps); bf16 additionally rounds the stock layer's activation scale to bf16.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=0.0, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,delta", [("llama", "full"), ("qwen2", "lora:4"), ("phi3", "full")])
def test_export_loads_in_stock_transformers_with_the_same_logits(family, delta, dtype, tmp_path):
    dual = trained_dual(family, tmp_path, dtype, delta)
    ids = token_batch(batch=3, seq=10)
    with torch.no_grad(), dual.student():
        ours = dual(ids).logits
    report = save_ternary_pretrained(dual, tmp_path / "export")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert stock.dtype == dtype
    layer = stock.get_submodule(dual.patched_names[0])
    assert isinstance(layer, StockBitLinear)
    assert type(stock.lm_head) is torch.nn.Linear
    assert stock.config.quantization_config.quant_method == "bitnet"
    with torch.no_grad():
        theirs = stock(ids).logits
    torch.testing.assert_close(theirs.float(), ours.float(), **TOLERANCE[dtype])
    assert report["fp16_bytes"] / report["packed_bytes"] > 7.5  # 2 bits vs 16 bits, plus one scale per layer


def test_export_rejects_output_sizes_that_do_not_pack(tmp_path):
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=62, num_hidden_layers=1,
                            num_attention_heads=4)
    dual = patch_model(tf.LlamaForCausalLM(config))
    with pytest.raises(ValueError, match="divisible by 4.*mlp.gate_proj"):
        save_ternary_pretrained(dual, tmp_path / "export")


def test_export_writes_tokenizer_and_tied_embeddings(tmp_path):
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    dual = patch_model(tf.LlamaForCausalLM(config).eval())
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer(), unk_token="[UNK]")
    save_ternary_pretrained(dual, tmp_path / "export", tokenizer=tokenizer)
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "export")("a b")["input_ids"] == tokenizer("a b")["input_ids"]
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), dual.student():
        torch.testing.assert_close(stock(ids).logits, dual(ids).logits, rtol=1e-4, atol=1e-4)


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("tied", [False, True])
def test_student_save_load_round_trip_is_exact(tied, tmp_path):
    torch.manual_seed(0)
    student = SuperpositionStudent(vocab_size=64, dim=32, n_layers=2, n_heads=4, tie_embeddings=tied).eval()
    projector = Decompressor(32, 48, hidden_dim=40).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = student(ids, attention_mask=mask)
        projected = projector(out.last_hidden)
    report = save_student(student, projector, tmp_path / "student")
    loaded, loaded_projector = load_student(tmp_path / "student")
    with torch.no_grad():
        again = loaded(ids, attention_mask=mask)
        assert torch.equal(again.logits, out.logits)
        assert torch.equal(loaded_projector(again.last_hidden), projected)
        assert torch.equal(loaded.generate(ids[:, :3], 4, temperature=0), student.generate(ids[:, :3], 4, temperature=0))
    assert report["compression"] == pytest.approx(8.0)
    ternary = sum(b.weight.numel() for b in student.modules() if isinstance(b, BitLinear))
    full_precision = sum(p.numel() for p in student.parameters()) - ternary + sum(p.numel() for p in projector.parameters())
    on_disk = (tmp_path / "student" / "student.safetensors").stat().st_size
    assert on_disk < 4 * full_precision + ternary / 4 + 4096  # ternary layers at 2 bits, the rest fp32, + header


def test_load_student_from_wrong_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="student.json missing"):
        load_student(tmp_path)


def test_modules_the_model_keeps_in_full_precision_are_neither_patched_nor_packed(tmp_path, monkeypatch):
    """transformers' bitnet loader never converts a model's ``_keep_in_fp32_modules`` (DeepSeek-V3.2's indexer
    projection, T5's ``wo``): packed, such a layer would fail to load; here a Llama is given one."""
    monkeypatch.setattr(tf.LlamaForCausalLM, "_keep_in_fp32_modules", ["mlp.down_proj"])
    dual = trained_dual("llama", tmp_path, torch.float32)
    assert dual.num_patched and not any(name.endswith("down_proj") for name in dual.patched_names)
    ids = token_batch(batch=2, seq=8)
    with torch.no_grad(), dual.student():
        ours = dual(ids).logits
    save_ternary_pretrained(dual, tmp_path / "export")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(stock.get_submodule("model.layers.0.mlp.down_proj")) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours, **TOLERANCE[torch.float32])
