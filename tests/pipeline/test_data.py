"""Documents -> fixed-length token rows: packing, padding, held-out split, text fields."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from distill.config import ConfigError, DataConfig
from distill.data import hash_split, iter_documents, pick_text, stdlib_split
from distill.stages.tokenize import Packer, Padder, token_rows


class CharTokenizer:
    """One token per character (ids 3..), EOS = 2, PAD = 0: enough to check packing exactly."""

    eos_token_id, pad_token_id, name_or_path = 2, 0, "chars"

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def test_packer_concatenates_with_eos_and_cuts_full_rows():
    packer = Packer(seq_len=4, eos_id=2)
    packer.add([5, 6, 7], doc_id=0)
    packer.add([8, 9, 10, 11, 12], doc_id=1)
    rows = packer.rows.take()
    assert rows["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 10, 11]]
    assert rows["doc_id"].tolist() == [0, 1] and rows["length"].tolist() == [4, 4]
    assert rows["input_ids"].dtype == np.int32
    assert packer.stream == [12, 2]  # the partial row waits for more text


def test_padder_truncates_and_pads_one_document_per_row():
    padder = Padder(seq_len=4, pad_id=0)
    padder.add([5, 6], doc_id=3)
    padder.add([5, 6, 7, 8, 9], doc_id=4)
    rows = padder.rows.take()
    assert rows["input_ids"].tolist() == [[5, 6, 0, 0], [5, 6, 7, 8]]
    assert rows["length"].tolist() == [2, 4] and rows["doc_id"].tolist() == [3, 4]


def test_hash_split_is_deterministic_and_roughly_the_fraction():
    keys = [f"doc-{i}" for i in range(4000)]
    splits = [hash_split(k, 0.1) for k in keys]
    assert splits == [hash_split(k, 0.1) for k in keys]
    assert 0.08 < splits.count("eval") / len(keys) < 0.12


def test_local_jsonl_documents_split_and_filter(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = [f"document number {i} " * 3 for i in range(200)] + ["", "tiny"]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = DataConfig(files=[str(path)], eval_fraction=0.2, min_chars=16)
    docs = list(iter_documents(cfg))
    assert len(docs) == 200  # empty and very short ones dropped
    assert {d.split for d in docs} == {"train", "eval"}
    assert [d.split for d in docs] == [d.split for d in iter_documents(cfg)]


def test_token_rows_respect_limits_and_keep_splits_apart(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text of document {i} " * 4}) for i in range(300)))
    cfg = DataConfig(files=[str(path)], seq_len=16, eval_fraction=0.2, max_train_rows=50, max_eval_rows=7)
    out, docs = {}, {}
    for split, rows in token_rows(cfg, CharTokenizer(), batch_rows=8):
        out.setdefault(split, []).append(rows["input_ids"])
        docs.setdefault(split, []).extend(rows["doc_id"].tolist())
    train, held_out = np.concatenate(out["train"]), np.concatenate(out["eval"])
    assert train.shape == (50, 16) and held_out.shape == (7, 16)
    # every row starts in a document of its own split (packing never carries one split's text into the other's rows)
    split_of = [d.split for d in iter_documents(cfg)]
    assert {split_of[i] for i in docs["train"]} == {"train"} and {split_of[i] for i in docs["eval"]} == {"eval"}


def test_instruction_response_fallback_and_unknown_column():
    assert pick_text({"instruction": "Q", "response": "A"}, None, "x") == "Q\nA"
    with pytest.raises(ConfigError, match="data.text_field 'body' is not a column of x; columns: \\['text'\\]"):
        pick_text({"text": "t"}, "body", "x")
    with pytest.raises(ConfigError, match="no 'text' column"):
        pick_text({"content": "t"}, None, "x")


def test_missing_empty_or_directory_data_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_documents(DataConfig(files=[str(tmp_path / "nope.jsonl")])))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="data.files: .*empty.jsonl is empty"):
        list(iter_documents(DataConfig(files=[str(tmp_path / "empty.jsonl")])))
    with pytest.raises(ConfigError, match="is a directory: list its files"):
        list(iter_documents(DataConfig(files=[str(tmp_path)])))


def test_stdlib_source_splits_by_module():
    docs = list(iter_documents(DataConfig(builtin="stdlib", max_documents=400)))
    assert len(docs) == 400 and all(d.text for d in docs)
    assert len({d.key for d in docs}) == 400
    # the corpus's own split by module path, both splits present, whatever data.eval_fraction says
    assert all(d.split == stdlib_split(d.key) for d in docs) and {d.split for d in docs} == {"train", "eval"}


def prepared_copies(cache, versions: dict) -> None:
    """The datasets library's cache holding a prepared copy of the Hub dataset org/stories per commit, the last one
    newest, each in the directory the library names by the commit it came from (built with the library itself, from a
    local directory per version, then moved where a Hub download at that commit puts it)."""
    import datasets

    for commit, text in versions.items():
        source = cache.parent / f"source-{commit[:4]}" / "stories"
        source.mkdir(parents=True)
        (source / "train.jsonl").write_text("".join(json.dumps({"text": f"{text} {i}"}) + "\n" for i in range(5)))
        prepared = datasets.load_dataset(str(source), split="train", cache_dir=str(cache)).cache_files[0]["filename"]
        copy = cache / "org___stories" / "default" / "0.0.0" / commit
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(prepared).parent, copy)
        os.utime(copy, (time.time() + len(os.listdir(copy.parent)),) * 2)  # strictly newer than the one before


def test_offline_a_hub_dataset_must_be_read_at_the_commit_the_fingerprints_name(tmp_path, monkeypatch):
    """Offline, the datasets library reads its newest cached copy of a Hub dataset whatever revision it is given:
    tokens from another commit than the run pinned would be stored under that commit's fingerprint."""
    import datasets
    from huggingface_hub import constants

    from distill.data import check_source, pin_dataset_revision

    first, newer = "a" * 40, "c" * 40
    cache = tmp_path / "datasets-cache"
    prepared_copies(cache, {first: "first version", newer: "newer version"})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    refs = tmp_path / "hub-cache" / "datasets--org--stories" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(first)  # the commit main named when the Hub was last asked

    pinned = pin_dataset_revision(DataConfig(dataset="org/stories", min_chars=1))
    assert pinned.revision == first
    with pytest.raises(ConfigError, match=f"read its cached copy commit {newer}, not commit {first}.*connect to the "
                                          f"Hub.*or set data.revision: {newer} to tokenize that copy"):
        check_source(pinned)
    texts = [d.text for d in iter_documents(pinned.model_copy(update={"revision": newer}))]
    assert texts and all(t.startswith("newer version") for t in texts)
    os.utime(cache / "org___stories" / "default" / "0.0.0" / first, (time.time() + 10,) * 2)  # now the newest: read
    assert all(d.text.startswith("first version") for d in iter_documents(pinned))


def test_a_home_relative_dataset_directory_is_read_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "stories").mkdir()
    (tmp_path / "stories" / "train.jsonl").write_text(json.dumps({"text": "a story from the home directory"}) + "\n")
    cfg = DataConfig(dataset="~/stories", min_chars=1)
    assert [d.text for d in iter_documents(cfg)] == ["a story from the home directory"]
    (tmp_path / "stories" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=f"cannot load the dataset directory {tmp_path / 'stories'} "
                                          r"\(data.dataset; config None, split 'train'\)") as error:
        iter_documents(cfg).__next__()
    assert "Hub" not in str(error.value)
