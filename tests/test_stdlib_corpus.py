"""The stdlib quickstart corpus (split rules) and the committed quickstart teacher (loads offline, sane)."""

import math
from pathlib import Path

import pytest
import torch

from distill.data import STDLIB_EVAL_FRACTION, stdlib_documents, stdlib_files, stdlib_split

TEACHER = Path(__file__).resolve().parents[1] / "assets" / "quickstart-teacher"


# ---------------------------------------------------------------- corpus

def test_split_is_a_fixed_function_of_the_path():
    # Pinned values: changing the hash or the fraction would silently move modules the committed
    # teacher was trained on into the held-out split.
    assert stdlib_split("chunk.py") == "eval"
    assert stdlib_split("traceback.py") == "eval"
    assert stdlib_split("os.py") == "train"
    assert stdlib_split("json/decoder.py") == "train"


def test_eval_fraction_over_many_paths():
    paths = [f"pkg{i % 37}/module_{i}.py" for i in range(20000)]
    frac = sum(stdlib_split(p) == "eval" for p in paths) / len(paths)
    assert abs(frac - STDLIB_EVAL_FRACTION) < 0.01


def test_real_stdlib_splits_are_disjoint_and_cover_every_file():
    files = stdlib_files()
    assert files == sorted(files) and len(files) == len(set(files)) and len(files) > 100
    train = [d.key for d in stdlib_documents("train")]
    evals = [d.key for d in stdlib_documents("eval")]
    assert not set(train) & set(evals)
    assert sorted(train + evals) == files
    assert 0.02 < len(evals) / len(files) < 0.10
    assert not [p for p in files if {"site-packages", "test", "tests", "idle_test"} & set(p.split("/"))]
    assert "os.py" in files


@pytest.fixture
def fake_stdlib(tmp_path):
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "x = 1\n",
        "empty.py": "  \n",
        "test/test_os.py": "assert True\n",
        "lib2to3/tests/data/bad.py": "def (:\n",
        "site-packages/pkg/mod.py": "y = 2\n",
        "pydoc_data/topics.py": "topics = {}\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "encodings/cp1252.py": "import codecs\ndecoding_table = (\n    '\\x00'\n)\n",
        "encodings/utf_8.py": "import codecs\n",
        "latin.py": b"# caf\xe9\nz = 3\n",  # not UTF-8: must not fail
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path


def test_exclusions_and_reading(fake_stdlib, tmp_path):
    assert stdlib_files(fake_stdlib) == ["encodings/utf_8.py", "json/__init__.py", "latin.py", "os.py"]
    docs = {d.key: d.text for d in stdlib_documents(None, fake_stdlib)}
    assert docs["latin.py"].endswith("z = 3\n") and "\ufffd" in docs["latin.py"]
    train = {d.key for d in stdlib_documents("train", fake_stdlib)}
    assert train | {d.key for d in stdlib_documents("eval", fake_stdlib)} == set(docs)
    assert all(stdlib_split(key) == "train" for key in train)
    with pytest.raises(ValueError):
        next(stdlib_documents("test", fake_stdlib))


# ---------------------------------------------------------------- committed teacher

@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, local_files_only=True, dtype=torch.float32).eval()
    return tok, model


def test_teacher_is_small_and_committed():
    size = sum(f.stat().st_size for f in TEACHER.iterdir() if f.is_file())
    assert size <= 20e6
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.json"):
        assert (TEACHER / name).is_file(), name


def test_teacher_config(teacher):
    _, model = teacher
    c = model.config
    assert c.model_type == "llama"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert c.hidden_size % c.num_attention_heads == 0
    assert all(d % 4 == 0 for d in (c.hidden_size, c.intermediate_size, head_dim, c.vocab_size))
    assert c.max_position_embeddings >= 512
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 20e6


def test_teacher_tokenizer_round_trips_code(teacher):
    tok, model = teacher
    code = 'def fibonacci(n):\n    """Return F(n)."""\n\tif n < 2:  # base\n        return n\n    return "é" * n\n'
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == code
    assert len(ids) < len(code) / 2  # BPE merges actually learned
    assert None not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert tok.eos_token_id == model.config.eos_token_id
    assert len(tok) == model.config.vocab_size


# The forward pass runs in a fresh interpreter, as a user's first load does. At the end of the full suite, in the
# process that ran every other test (Ray, llama.cpp and lm-eval loaded beside torch), this same forward gave finite
# logits with a loss of 1e17 to 1e30 in two runs of five; alone, or after the llama.cpp tests, never. The cause is
# not known; this test checks the committed asset, not that process.
_FORWARD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from distill.data import stdlib_documents
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.float32).eval()
text = {d.key: d.text for d in stdlib_documents("eval")}
ids = torch.tensor([tok(next(iter(text.values())), add_special_tokens=False)["input_ids"][:256]])
with torch.no_grad():
    out = model(input_ids=ids, labels=ids)
print(json.dumps({"shape": list(out.logits.shape), "tokens": ids.shape[1], "vocab": model.config.vocab_size,
                  "finite": bool(torch.isfinite(out.logits).all()), "loss": out.loss.item()}))
"""


def test_teacher_forward_is_finite_and_trained():
    import json
    import os
    import subprocess
    import sys

    # A held-out module, so the check also says the teacher learned code, not this text.
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _FORWARD, str(TEACHER)], capture_output=True, text=True, timeout=300,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [1, out["tokens"], out["vocab"]]
    assert out["finite"]
    assert out["loss"] < 0.6 * math.log(out["vocab"])  # far below a uniform guess
