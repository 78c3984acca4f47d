"""The exported GGUF in llama.cpp itself (llama-cpp-python, part of the dev extra): it loads, computes the
student's logits, and tokenizes held-out text as transformers does.

Tolerances come from measurements (docs/gguf.md): llama.cpp quantizes activations per 256-value block where the
student quantizes them per token, keeps the KV cache in fp16, rounds each layer's scale to fp16 and runs the layers
that fall back to F16 without quantizing their activations. On the quickstart teacher's held-out rows that leaves
KL(ours || llama.cpp) near 7e-4 and top-1 agreement near 97%; the bounds below are a few times looser. A wrong layout
(q/k rows not permuted for llama.cpp's RoPE) gives KL of 0.2 to 6 on the peaked random models below, far outside
their bounds (measured: 0.01 and 1.4e-4 with the right one).
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is part of the dev extra (pip install -e '.[dev]'); these tests check the "
                        "GGUF export in llama.cpp itself")

from bitnet import SuperpositionStudent, patch_model, save_gguf  # noqa: E402
from bitnet.gguf import save_teacher_gguf  # noqa: E402
from distill.data import stdlib_documents  # noqa: E402
from tests.pipeline.tiny_teacher import build_tokenizer  # noqa: E402

QUICKSTART = "assets/quickstart-teacher"


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p || q) per position, from logits."""
    log_p, log_q = F.log_softmax(p.float(), -1), F.log_softmax(q.float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def top1(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.argmax(-1) == q.argmax(-1)).float().mean())


def llama_cpp_logits(path, rows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits at every position of each row (one sequence at a time, from an empty cache)."""
    llm = llama_cpp.Llama(str(path), n_ctx=rows.shape[1], n_batch=rows.shape[1], n_ubatch=rows.shape[1],
                          logits_all=True, n_threads=1, verbose=False)
    try:
        out = []
        for row in rows:
            llm.reset()
            llm.eval(row.tolist())
            out.append(torch.from_numpy(np.array(llm.scores[: len(row)])))
        return torch.stack(out)
    finally:
        llm.close()


def held_out_rows(tokenizer, n: int, length: int) -> torch.Tensor:
    """``n`` rows of ``length`` tokens of held-out standard-library source."""
    ids = list(itertools.chain.from_iterable(tokenizer(doc.text)["input_ids"]
                                             for doc in itertools.islice(stdlib_documents("eval"), 40)))
    return torch.tensor(ids[: n * length]).view(n, length)


@pytest.fixture(scope="module")
def quickstart():
    """The quickstart teacher's student with a small random dW (a stand-in for training: codes that naive
    quantization would not give), held-out rows and its logits on them."""
    tokenizer = tf.AutoTokenizer.from_pretrained(QUICKSTART)
    dual = patch_model(tf.AutoModelForCausalLM.from_pretrained(QUICKSTART))
    torch.manual_seed(0)
    for p in dual.trainable_parameters():
        torch.nn.init.normal_(p, std=2e-3)
    rows = held_out_rows(tokenizer, 4, 128)
    with torch.no_grad(), dual.student():
        ours = dual(rows).logits
    return tokenizer, dual, rows, ours


def perplexity(logits: torch.Tensor, rows: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).exp())


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_computes_the_quickstart_students_logits(qtype, quickstart, tmp_path):
    tokenizer, dual, rows, ours = quickstart
    info = save_gguf(dual, tmp_path / "s.gguf", tokenizer, qtype)
    assert sorted(info["fallback"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]  # 688-value rows
    theirs = llama_cpp_logits(tmp_path / "s.gguf", rows)
    assert kl(ours, theirs) < 3e-3
    assert top1(ours, theirs) > 0.95
    assert abs(perplexity(theirs, rows) / perplexity(ours, rows) - 1) < 0.01


@pytest.mark.parametrize("wtype,bound", [("f16", 1e-5), ("q8_0", 5e-4)])  # measured: 3.7e-7, 6.4e-5
def test_llama_cpp_computes_the_teachers_logits(wtype, bound, quickstart, tmp_path):
    """The teacher written by the same code, without ternary layers: what is left is llama.cpp's own arithmetic
    (fp16 weights and KV cache; Q8_0 weights with Q8_0 activations)."""
    tokenizer, dual, rows, _ = quickstart
    with torch.no_grad(), dual.teacher():
        ours = dual(rows).logits
    save_teacher_gguf(dual, tmp_path / "t.gguf", tokenizer, wtype)
    theirs = llama_cpp_logits(tmp_path / "t.gguf", rows)
    assert kl(ours, theirs) < bound and top1(ours, theirs) > 0.98


def peaked_dual(family: str, tokenizer):
    """A random model whose logits are far from uniform (initializer_range 0.2), so that a wrong tensor layout shows."""
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    dual = patch_model(tf.AutoModelForCausalLM.from_config(config).eval())
    for p in dual.trainable_parameters():
        torch.nn.init.normal_(p, std=0.2)
    return dual


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_computes_a_random_models_logits(family, tmp_path):
    tokenizer = build_tokenizer()
    dual = peaked_dual(family, tokenizer)
    rows = held_out_rows(tokenizer, 2, 64)
    with torch.no_grad(), dual.student():
        ours = dual(rows).logits
    save_gguf(dual, tmp_path / "s.gguf", tokenizer, "tq2_0")
    theirs = llama_cpp_logits(tmp_path / "s.gguf", rows)
    assert kl(ours, theirs) < 0.05 and top1(ours, theirs) > 0.8


def test_llama_cpp_runs_the_superposition_student_as_a_llama_model(tmp_path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    student = SuperpositionStudent(len(tokenizer), dim=256, n_layers=2, n_heads=4, mlp_hidden=512, max_seq_len=128)
    with torch.no_grad():  # sharper attention and peaked logits: without the q/k permutation KL is above 0.2
        for block in student.blocks:
            block.attn.qkv.weight.mul_(5)
        student.lm_head.weight.mul_(5)
    rows = held_out_rows(tokenizer, 2, 64)
    with torch.no_grad():
        ours = student(rows).logits
    save_gguf(student, tmp_path / "s.gguf", tokenizer, "tq1_0")
    theirs = llama_cpp_logits(tmp_path / "s.gguf", rows)
    assert kl(ours, theirs) < 2e-3 and top1(ours, theirs) > 0.9


def split_tokenizer(regex: str) -> tf.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer whose pre-tokenizer splits with ``regex`` (as Llama 3's and Qwen2's do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [doc.text for doc in itertools.islice(stdlib_documents("train"), 40)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
TOKENIZERS = {"gpt-2 (quickstart)": lambda: tf.AutoTokenizer.from_pretrained(QUICKSTART),
              "llama-bpe": lambda: split_tokenizer(LLAMA3),
              "qwen2": lambda: split_tokenizer(LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"))}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_llama_cpp_tokenizes_held_out_text_as_transformers_does(name, tmp_path):
    tokenizer = TOKENIZERS[name]()
    torch.manual_seed(0)
    student = SuperpositionStudent(len(tokenizer), dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    info = save_gguf(student, tmp_path / "s.gguf", tokenizer)
    assert info["pre_tokenizer"] == name.split(" ")[0]
    llm = llama_cpp.Llama(str(tmp_path / "s.gguf"), vocab_only=True, verbose=False)
    try:
        docs = [doc.text for doc in itertools.islice(stdlib_documents("eval"), 30)]
        docs.append("Ünïcödé: naïve café, 日本語 text, emoji 🦙🦙, numbers 1234567 and 3.14, tabs\t\tand   spaces\n\n")
        for text in docs:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text[:80]
        # the BOS/EOS metadata: llama.cpp adds what transformers adds when encoding
        assert llm.tokenize(b"def f(): pass", add_bos=True) == tokenizer("def f(): pass")["input_ids"]
    finally:
        llm.close()
