"""The benchmarks' model-shaped teachers (bench/common.py ``MODEL_SHAPES``): the shapes are the published models',
the fast random build gives the model transformers would build apart from the weights' values, and the benchmarks
run with them (one layer, a few tokens: what a CPU can check)."""

import json

import pytest
import torch
import transformers as tf

from bench import cache_overhead, cache_read, train_step
from bench.common import MODEL_SHAPES, model_config, shaped_teacher, teacher

# Each model's parameter count as published (its safetensors' total): a check of every dimension at once, by a
# figure that was not derived from the values in bench/common.py.
PUBLISHED_PARAMETERS = {"qwen2.5-0.5b-shape": 494_032_768, "qwen2.5-1.5b-shape": 1_543_714_304,
                        "llama-3.2-1b-shape": 1_235_814_400}


@pytest.mark.parametrize("kind", list(MODEL_SHAPES))
def test_full_depth_shapes_have_the_published_parameter_counts(kind):
    with torch.device("meta"):  # no memory: only the shapes
        model = tf.AutoModelForCausalLM.from_config(model_config(kind))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[kind]
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_published_attention_and_rope_settings():
    qwen = model_config("qwen2.5-1.5b-shape")
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.rope_parameters["rope_theta"]) == (12, 2, 1e6)
    llama = model_config("llama-3.2-1b-shape")
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (32, 8, 64)
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("kind", ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"])
def test_fast_build_matches_transformers_but_for_the_weights(kind):
    """One layer, built directly in bf16: the dtype asked for, the head tied to the embedding, the rotary
    frequencies transformers computes (in fp32), weights of std 0.02 with unit norms and zero biases, finite
    outputs."""
    built = shaped_teacher(kind, torch.device("cpu"), torch.bfloat16, layers=1)
    reference = tf.AutoModelForCausalLM.from_config(model_config(kind, 1))
    assert built.config.num_hidden_layers == 1 and len(built.model.layers) == 1
    assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
    assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    for name, buffer in reference.named_buffers():
        assert torch.equal(built.get_buffer(name), buffer), name
    weights = built.model.embed_tokens.weight.float()
    assert abs(weights.std().item() - 0.02) < 2e-3
    assert torch.equal(built.model.norm.weight, torch.ones_like(built.model.norm.weight))
    if built.model.layers[0].self_attn.q_proj.bias is not None:  # Qwen's QKV biases
        assert not built.model.layers[0].self_attn.q_proj.bias.any()
    with torch.no_grad():
        logits = built(input_ids=torch.arange(8)[None], use_cache=False).logits
    assert logits.shape == (1, 8, model_config(kind).vocab_size) and torch.isfinite(logits).all()


def test_teacher_info_and_bad_layer_counts():
    _, info = teacher("qwen2.5-0.5b-shape", torch.device("cpu"), torch.float32, layers=2)
    assert (info["hidden_size"], info["layers"], info["vocab"]) == (896, 2, 151936)
    with pytest.raises(ValueError, match="has 24 decoder layers; keep between 1 and 24"):
        model_config("qwen2.5-0.5b-shape", 25)
    with pytest.raises(ValueError, match="choose one of qwen2.5-0.5b-shape"):
        model_config("qwen2.5-7b-shape")


SMALL = ["--shape-layers", "1", "--repeats", "1", "--threads", "1"]


def test_cache_overhead_runs_on_a_one_layer_shape(tmp_path):
    """One layer of Qwen2.5-0.5B's shape, a handful of tokens: the options reach the model, the JSON is written."""
    small = SMALL
    cache_overhead.main(["--teachers", "qwen2.5-0.5b-shape", *small, "--large-rows", "4", "--batch", "2",
                         "--seq-len", "16", "--no-sizes", "--writer-threads", "1", "--topk-codecs",
                         "blosc:lz4:bitshuffle", "--root", str(tmp_path / "store"), "--out", str(tmp_path / "co.json")])
    result = json.loads((tmp_path / "co.json").read_text())["results"]["throughput"][0]
    # one decoder layer: hidden states 0 (embeddings) and 1, the last, cached
    assert (result["hidden_size"], result["layers"], result["tokens"]) == (896, [1], 64)


@pytest.mark.slow  # a minute on 2 cores: both students train AdamW over a 151,936-token embedding
def test_train_step_and_cache_read_run_on_a_one_layer_shape(tmp_path):
    small = SMALL
    train_step.main(["--shapes", "qwen2.5-0.5b-shape", *small, "--large-batch", "1", "--seq-len", "16",
                     "--parts", "bitlinear", "--out", str(tmp_path / "ts.json")])
    record = json.loads((tmp_path / "ts.json").read_text())
    step = record["results"]["bitlinear_vs_linear"][0]
    assert (step["dim"], step["layers"], step["vocab"]) == (896, 1, 151936)
    assert list(record["tables"]) == ["BitLinear model step / nn.Linear model step (target <= 1.3x)"]

    cache_read.main(["--teachers", "qwen2.5-0.5b-shape", *small, "--rows", "4", "--batch", "2", "--steps", "1",
                     "--student-dim", "1024", "--student-layers", "1", "--topk-codecs", "blosc:lz4:bitshuffle",
                     "--root", str(tmp_path / "read"), "--out", str(tmp_path / "cr.json")])
    read = json.loads((tmp_path / "cr.json").read_text())["results"]["results"][0]
    assert (read["hidden_size"], read["student_dim"], read["student_layers"]) == (896, 1024, 1)


def test_cache_read_rejects_a_student_width_heads_cannot_split():
    with pytest.raises(SystemExit, match="multiple of 64"):
        cache_read.main(["--teachers", "quickstart", "--student-dim", "1000"])


def test_cache_read_trains_on_what_the_stage_reads_with_inner_layers_and_sampled_logits(tmp_path):
    cache_read.main(["--teachers", "quickstart", "--rows", "4", "--batch", "2", "--steps", "1", "--repeats", "1",
                     "--cache-layers", "2", "-1", "--logits", "sampled", "--topk-codecs", "blosc:lz4:bitshuffle",
                     "--root", str(tmp_path / "read"), "--out", str(tmp_path / "cr.json")])
    read = json.loads((tmp_path / "cr.json").read_text())["results"]["results"][0]
    assert read["arrays_read"] == ["hidden/layer_2", "hidden/layer_4", "sampled_counts", "sampled_indices"]
