"""GGUF export: every ternary tensor llama.cpp will read is codes x fp16(scale), in the right rows; fallback types;
the tokenizer and architecture metadata. (tests/bitnet/test_gguf_llama_cpp.py runs the files in llama.cpp.)"""

import json

import numpy as np
import pytest
import torch
import transformers as tf

gguf = pytest.importorskip("gguf", reason="the gguf package is a dependency of the project: pip install gguf")

from bitnet import SuperpositionStudent, patch_model, save_gguf, ternary_weight  # noqa: E402
from bitnet.gguf import detect_pre_tokenizer, tokenizer_metadata  # noqa: E402
from tests.pipeline.tiny_teacher import build_tokenizer  # noqa: E402

# Dimensions that are whole 256-value blocks, so that the ternary layers can be TQ types.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_dual(family: str, tokenizer, seed: int = 0, **shape):
    """A random model of ``family`` patched for self-distillation, with a random dW (a stand-in for training, so
    that the student's codes differ from naive quantization of W)."""
    torch.manual_seed(seed)
    config = CONFIGS[family](bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **{"vocab_size": len(tokenizer), **SHAPE, **shape})
    dual = patch_model(tf.AutoModelForCausalLM.from_config(config).eval())
    for p in dual.trainable_parameters():
        torch.nn.init.normal_(p, std=0.02)
    return dual


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def values(tensor) -> np.ndarray:
    """gguf's reference dequantization of a tensor, as [rows, row length]."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return data.reshape(-1, int(tensor.shape[0]))


def interleaved(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's RoPE row order for q/k, written out per row (independently of bitnet.gguf.rope_permute): within
    each head of d rows, row 2j + p comes from row p*d/2 + j."""
    d = rows.shape[0] // n_head
    order = [h * d + p * (d // 2) + j for h in range(n_head) for j in range(d // 2) for p in (0, 1)]
    return rows[order]


def expected(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    return codes.numpy().astype(np.float32) * np.float32(np.float16(float(scale)))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(layer: str) -> str:
    _, _, block, *rest = layer.split(".")  # model.layers.<i>.<module>.<proj>
    return f"blk.{block}.{GGUF_NAMES['.'.join(rest)]}.weight"


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_every_ternary_tensor_dequantizes_to_codes_times_fp16_scale(family, qtype, tokenizer, tmp_path):
    dual = tiny_dual(family, tokenizer)
    info = save_gguf(dual, tmp_path / "s.gguf", tokenizer, qtype)
    reader, tensors = read(tmp_path / "s.gguf")
    assert info["fallback"] == {} and info["ternary_layers"] == len(dual.layers) == 14
    permuted = family in ("llama", "mistral")  # llama.cpp's llama architecture; qwen2 rotates halves as HF does
    for name, layer in dual.layers.items():
        with torch.no_grad():
            codes, scale = ternary_weight(layer.student_weight())
        tensor = tensors[gguf_name(name)]
        assert tensor.tensor_type.name == qtype.upper()
        if permuted and name.endswith(("q_proj", "k_proj")):
            codes = interleaved(codes, 4 if name.endswith("q_proj") else 2)
        np.testing.assert_array_equal(values(tensor), expected(codes, scale), err_msg=name)
        # the scale of every block is the layer's own, even of blocks whose codes are all zero
        raw = np.asarray(tensor.data).reshape(-1, gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])
        assert (raw[:, -2:].copy().view(np.float16) == np.float16(float(scale))).all()
    assert field(reader, "general.architecture") == ("qwen2" if family == "qwen2" else "llama")
    assert field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}")


def test_q_and_k_biases_follow_their_rows_and_stay_f32(tokenizer, tmp_path):
    dual = tiny_dual("qwen2", tokenizer)  # Qwen2's q/k/v carry biases
    save_gguf(dual, tmp_path / "s.gguf", tokenizer)
    _, tensors = read(tmp_path / "s.gguf")
    bias = tensors["blk.1.attn_q.bias"]
    assert bias.tensor_type.name == "F32"
    np.testing.assert_array_equal(np.asarray(bias.data), dual.model.model.layers[1].self_attn.q_proj.bias.numpy())


def test_an_all_zero_block_keeps_the_layer_scale(tokenizer, tmp_path):
    dual = tiny_dual("llama", tokenizer)
    layer = dual.layers["model.layers.0.self_attn.o_proj"]
    with torch.no_grad():
        layer.delta.weight[:3] = -layer.weight[:3]  # W + dW = 0 on three rows: three all-zero blocks
        codes, scale = ternary_weight(layer.student_weight())
    assert not codes[:3].any()
    save_gguf(dual, tmp_path / "s.gguf", tokenizer, "tq1_0")
    _, tensors = read(tmp_path / "s.gguf")
    np.testing.assert_array_equal(values(tensors["blk.0.attn_output.weight"]), expected(codes, scale))


@pytest.mark.parametrize("intermediate,fallback", [(320, "Q8_0"), (344, "F16")])
def test_rows_that_are_not_256_value_blocks_fall_back_exactly(intermediate, fallback, tokenizer, tmp_path):
    # down_proj reads `intermediate` values per row: 320 is ten Q8_0 blocks, 344 not even that
    dual = tiny_dual("llama", tokenizer, intermediate_size=intermediate)
    info = save_gguf(dual, tmp_path / "s.gguf", tokenizer, "tq2_0")
    downs = [name for name in dual.layers if name.endswith("down_proj")]
    assert info["fallback"] == {name: fallback for name in downs}
    _, tensors = read(tmp_path / "s.gguf")
    for name in downs:
        with torch.no_grad():
            codes, scale = ternary_weight(dual.layers[name].student_weight())
        tensor = tensors[gguf_name(name)]
        assert tensor.tensor_type.name == fallback
        np.testing.assert_array_equal(values(tensor), expected(codes, scale))
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "TQ2_0"  # rows of 256: still ternary


def test_superposition_student_is_a_llama_model_with_split_permuted_qkv(tokenizer, tmp_path):
    torch.manual_seed(0)
    student = SuperpositionStudent(len(tokenizer), dim=256, n_layers=2, n_heads=4, mlp_hidden=512, max_seq_len=64)
    info = save_gguf(student, tmp_path / "s.gguf", tokenizer, "tq2_0")
    reader, tensors = read(tmp_path / "s.gguf")
    assert info["architecture"] == "llama" and info["fallback"] == {}
    assert field(reader, "llama.block_count") == 2 and field(reader, "llama.feed_forward_length") == 512
    for i, block in enumerate(student.blocks):
        codes, scale = ternary_weight(block.attn.qkv.weight.detach())
        q, k, v = codes.chunk(3)
        for name, rows in (("attn_q", interleaved(q, 4)), ("attn_k", interleaved(k, 4)), ("attn_v", v)):
            np.testing.assert_array_equal(values(tensors[f"blk.{i}.{name}.weight"]), expected(rows, scale))
        codes, scale = ternary_weight(block.mlp.down.weight.detach())
        np.testing.assert_array_equal(values(tensors[f"blk.{i}.ffn_down.weight"]), expected(codes, scale))
    np.testing.assert_array_equal(values(tensors["output.weight"]),
                                  student.lm_head.weight.detach().numpy().astype(np.float16).astype(np.float32))


def test_tied_head_is_read_from_the_embeddings_and_q8_0_is_an_option(tokenizer, tmp_path):
    dual = tiny_dual("llama", tokenizer, tie_word_embeddings=True)
    info = save_gguf(dual, tmp_path / "s.gguf", tokenizer, embeddings="q8_0")
    _, tensors = read(tmp_path / "s.gguf")
    assert "output.weight" not in tensors and info["embeddings"] == "q8_0"
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    embed = dual.model.model.embed_tokens.weight.detach().numpy()
    assert np.abs(values(tensors["token_embd.weight"]) - embed).max() <= np.abs(embed).max() / 127


def test_tokenizer_metadata(tokenizer, tmp_path):
    dual = tiny_dual("llama", tokenizer, vocab_size=len(tokenizer) + 6)  # embedding rows beyond the tokenizer
    save_gguf(dual, tmp_path / "s.gguf", tokenizer)
    reader, _ = read(tmp_path / "s.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == len(tokenizer) + 6 and tokens[vocab["Ġdef"]] == "Ġdef"
    assert tokens[-1] == f"[PAD{len(tokenizer) + 5}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[vocab["Ġdef"]] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges")[:5] == [m if isinstance(m, str) else " ".join(m) for m in merges[:5]]
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # this tokenizer adds no BOS when encoding


def test_pre_tokenizers_are_recognised_or_refused():
    split = lambda regex: {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    assert detect_pre_tokenizer(split(llama3)) == "llama-bpe"
    assert detect_pre_tokenizer(split(llama3.replace(r"\p{N}{1,3}", r"\p{N}"))) == "qwen2"
    with pytest.raises(ValueError, match="pre_tokenizer="):
        detect_pre_tokenizer(split(r"\w+"))
    with pytest.raises(ValueError, match="pre_tokenizer="):
        detect_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}})


def test_sentencepiece_style_tokenizers_and_other_families_are_refused(tokenizer, tmp_path):
    from tokenizers import Tokenizer, models

    spm = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "<0x00>": 1}, merges=[],
                                                                           byte_fallback=True)))
    with pytest.raises(ValueError, match="byte fallback"):
        tokenizer_metadata(spm, 2)
    config = tf.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                              num_attention_heads=4)
    dual = patch_model(tf.AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="gpt_neox"):
        save_gguf(dual, tmp_path / "s.gguf", tokenizer)
    with pytest.raises(ValueError, match="qtype"):
        save_gguf(tiny_dual("llama", tokenizer), tmp_path / "s.gguf", tokenizer, qtype="q4_0")
