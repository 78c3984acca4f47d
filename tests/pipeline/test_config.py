"""Configuration: presets, overrides, and invalid values rejected before any work, naming the field."""

import importlib.util

import pytest
import torch

from distill.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["reference", "tinyllama"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.name == preset and cfg.data.dataset == "roneneldan/TinyStories"


def test_reference_preset_matches_the_notebook():
    cfg = load_config("reference")
    assert cfg.teacher.name_or_path == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert (cfg.data.seq_len, cfg.data.max_train_rows) == (128, 500)
    assert (cfg.student.dim, cfg.student.n_layers, cfg.student.n_heads) == (768, 12, 12)
    assert (cfg.train.steps, cfg.head.steps, cfg.train.batch_size, cfg.train.lr) == (500, 200, 16, 1e-3)


def test_overrides_take_dotted_keys_and_yaml_strings():
    cfg = load_config("reference", {"train.steps": "20", "cache.layers": "[-1, 4]", "storage.root": "s3://b/p"})
    assert cfg.train.steps == 20 and cfg.cache.layers == [-1, 4] and cfg.storage.root == "s3://b/p"


def test_a_section_valued_override_sets_its_keys_and_keeps_the_others():
    preset = load_config("quickstart")
    cfg = load_config("quickstart", {"train": "{steps: 5, lr: 0.01}"})
    assert (cfg.train.steps, cfg.train.lr) == (5, 0.01)
    assert cfg.train.model_dump(exclude={"steps", "lr"}) == preset.train.model_dump(exclude={"steps", "lr"})


def test_a_home_relative_storage_root_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config("quickstart", {"storage.root": "~/artifacts"}).resolved_root() == str(tmp_path / "artifacts")


def test_yaml_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndata:\n  files: [a.jsonl]\n")
    assert load_config(str(path)).data.files == ["a.jsonl"]


@pytest.mark.parametrize("overrides,message", [
    ({"student.dim": 770}, "student: .*student dim 770 must be divisible by n_heads 12"),
    ({"student.vocab_size": 9}, "student.vocab_size is set by the pipeline \\(the teacher's vocabulary"),
    ({"student.dimm": 9}, "student.dimm: Unexpected keyword argument"),
    ({"train.steps": 0}, "train.steps: Input should be greater than 0"),
    ({"head.steps": -5}, "head.steps: Input should be greater than 0"),
    ({"self_distill.delta": "lora"}, "self_distill.delta: .*'full' or 'lora:R'"),
    ({"train.stepz": 3}, "train.stepz: Extra inputs are not permitted"),
    ({"data.files": ["x.txt"]}, "exactly one of data.builtin, data.dataset or data.files"),
    ({"name": "a/b"}, "name: .*letters, digits"),
    ({"cache.codec": "lzma"}, "cache.codec: .*'lzma' is not one of zstd"),
    ({"cache.topk_codec": "blosc:lz5"}, "cache.topk_codec: .*'blosc:lz5': .*one of \\['lz4'"),
    ({"cache.logits": "sampled", "cache.topk": 0}, "cache: .*sampled draws cache.topk tokens .*between 1 and 255"),
    ({"cache.logits": "sampled", "cache.topk": 256}, "cache: .*set cache.topk between 1 and 255 .*not 256"),
    ({"cache.logits": "top"}, "cache.logits: Input should be 'topk' or 'sampled'"),
    ({"self_distill.kl_weight": 0, "self_distill.hidden_weight": 0},
     "self_distill: .*all 0: nothing would train dW"),
    ({"self_distill.magnitude_weight": 0.1}, "self_distill: .*magnitude_weight .*needs hidden_weight > 0"),
    ({"name": "2024"}, "name: Input should be a valid string, got 2024 .*quote the value, e.g. --set 'name=\"...\"'"),
    ({"eval.prompts": "['ok', ' ']"}, "eval.prompts: .*a prompt is blank"),
    ({"student.tie_embeddings": False, "head.untied": False},
     "config: .*head.untied: false retrains the student's tied embedding .*set student.tie_embeddings: true"),
])
def test_invalid_configurations_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("reference", overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="give a preset name \\(.*reference.*tinyllama.*\\) or a YAML file path"):
        load_config("nope")


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config("reference", {"name.x": 1})


def fingerprints(flow: str, overrides: dict, preset: str = "quickstart") -> dict[str, str]:
    from distill.plan import make_plan, preflight

    cfg = load_config(preset, overrides)
    return make_plan(cfg, flow, preflight(cfg, flow)).fingerprints


def test_self_distill_steps_lr_and_lr_floor_override_train_for_that_flow_only():
    def train_fingerprints(overrides):
        return [fingerprints("self-distill", overrides)["self_distill"],
                fingerprints("superposition-distill", overrides)["superposition"]]

    cfg = load_config("quickstart", {"train.steps": 40, "train.lr": 1e-2, "self_distill.steps": 7})
    optim = cfg.self_distill_optim()
    assert (optim.steps, optim.lr, cfg.train.steps, cfg.train.lr) == (7, cfg.self_distill.lr, 40, 1e-2)
    assert load_config("quickstart", {"self_distill.steps": None, "train.steps": 40}).self_distill_optim().steps == 40
    # self-distillation decays its lr to 0 whatever train.min_lr_ratio (the superposition stages') says
    assert (optim.min_lr_ratio, cfg.train.min_lr_ratio) == (0.0, 0.1)
    assert load_config("quickstart", {"self_distill.min_lr_ratio": 0.1}).self_distill_optim().min_lr_ratio == 0.1

    self_fp, super_fp = train_fingerprints({"self_distill.steps": 7})
    other_self_fp, other_super_fp = train_fingerprints({"self_distill.steps": 8})
    assert self_fp != other_self_fp and super_fp == other_super_fp
    floor_self_fp, floor_super_fp = train_fingerprints({"self_distill.steps": 7, "self_distill.min_lr_ratio": 0.1})
    assert floor_self_fp != self_fp and floor_super_fp == super_fp
    # the same resolved schedule is the same run, however it was spelled
    assert train_fingerprints({"self_distill.steps": None, "train.steps": 7})[0] == self_fp
    # activation checkpointing gives the same gradients (tests/bitnet/test_checkpointing.py): the same run
    assert train_fingerprints({"self_distill.steps": 7, "self_distill.activation_checkpointing": True})[0] == self_fp
    # checkpoint cadence and retention change no result (tests/pipeline/test_resume.py): the same run in both flows;
    # the evaluation cadence changes the recorded history: another run
    operational = {"self_distill.steps": 7, "train.checkpoint_every": 3, "train.keep_checkpoints": 9}
    assert train_fingerprints(operational) == [self_fp, super_fp]
    evals = train_fingerprints({"self_distill.steps": 7, "train.eval_every": 3})
    assert evals[0] != self_fp and evals[1] != super_fp
    # the 8-bit optimiser trains another run in both flows; naming the default changes nothing
    eight_bit = train_fingerprints({"self_distill.steps": 7, "train.optimizer": "adamw8bit"})
    assert eight_bit[0] != self_fp and eight_bit[1] != super_fp
    assert train_fingerprints({"self_distill.steps": 7, "train.optimizer": "adamw"}) == [self_fp, super_fp]


def test_evaluation_rows_rebuild_neither_the_teacher_cache_nor_the_student():
    from_cache = {"self_distill.teacher_signal": "cache"}
    for flow, settings in (("superposition-distill", {}), ("self-distill", from_cache), ("self-distill", {})):
        base = fingerprints(flow, settings)
        changed = {name for name, fp in fingerprints(flow, {**settings, "eval.max_rows": 64}).items()
                   if fp != base[name]}
        assert changed == {"evaluate", "export"}, (flow, settings)
    # the cache's own held-out rows are a cache setting: the cache and everything after it are new
    base = fingerprints("superposition-distill", {})
    changed = {name for name, fp in fingerprints("superposition-distill", {"cache.eval_samples": 64}).items()
               if fp != base[name]}
    assert changed == {"teacher_cache", "superposition", "lm_head", "evaluate", "export"}


def test_a_stage_whose_output_changes_gets_new_fingerprints_from_itself_on(monkeypatch):
    """A stage that writes something new bumps its version: its old artifacts are rebuilt once, not read as new."""
    from distill.stages import STAGES

    base = fingerprints("superposition-distill", {})
    monkeypatch.setattr(type(STAGES["lm_head"]), "version", STAGES["lm_head"].version + 1)
    bumped = fingerprints("superposition-distill", {})
    assert {name for name in base if bumped[name] != base[name]} == {"lm_head", "evaluate", "export"}


def test_a_setting_added_later_keeps_the_fingerprints_of_artifacts_made_before_it():
    """cache.logits and superposition.projectors came after caches and students were made: at their defaults they
    are left out of the fingerprint (those artifacts are reused), and any other value makes new ones."""
    from distill.config import CacheConfig, SuperpositionConfig

    assert "logits" not in CacheConfig().fingerprinted() and "projectors" not in SuperpositionConfig().fingerprinted()
    assert CacheConfig(topk=8, logits="sampled").fingerprinted()["logits"] == "sampled"
    top_k = fingerprints("superposition-distill", {"cache.logits": "topk"})
    changed = {name for name, fp in fingerprints("superposition-distill", {"cache.logits": "sampled"}).items()
               if fp != top_k[name]}
    assert changed == {"teacher_cache", "superposition", "lm_head", "evaluate", "export"}
    base = fingerprints("superposition-distill", {})
    changed = {name for name, fp in fingerprints("superposition-distill", {"superposition.projectors": "shared"}).items()
               if fp != base[name]}
    assert changed == {"superposition", "lm_head", "evaluate", "export"}


def test_the_configs_top_k_codec_default_is_the_caches():
    from storage.cache_spec import TOPK_CODEC  # the reason for it is written there; config.py repeats the literal

    assert load_config("quickstart").cache.topk_codec == TOPK_CODEC


def test_8bit_optimiser_without_torchao_fails_before_any_work(monkeypatch):
    import importlib.util

    from distill.optim import check_optimizer

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="train.optimizer 'adamw8bit' needs torchao: pip install "
                                          "'bitnet-distill\\[optim8bit\\]', or set train.optimizer: adamw"):
        check_optimizer(load_config("quickstart", {"train.optimizer": "adamw8bit"}).train)
    check_optimizer(load_config("quickstart").train)  # AdamW needs nothing


def test_8bit_optimiser_on_cpu_without_a_compiler_fails_before_any_work(monkeypatch):
    import shutil

    import torch

    from distill.optim import check_optimizer

    optim = load_config("quickstart", {"train.optimizer": "adamw8bit"}).train
    monkeypatch.setenv("CXX", "no-such-compiler-g++")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert shutil.which("no-such-compiler-g++") is None
    with pytest.raises(ConfigError, match="compiles its step with torch.compile, which on CPU needs a C\\+\\+ compiler, "
                                          "and no-such-compiler-g\\+\\+ was not found: .*TORCHDYNAMO_DISABLE=1"):
        check_optimizer(optim, torch.device("cpu"))
    check_optimizer(optim, torch.device("cuda"))  # inductor's GPU kernels need Triton, not a C++ compiler
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    check_optimizer(optim, torch.device("cpu"))  # eager: nothing to compile


def test_new_teacher_weights_keep_the_token_shards_and_4bit_loading_recomputes_the_cache(tiny_teacher, tmp_path):
    import shutil

    import transformers as tf

    from distill.plan import make_plan, preflight

    from .conftest import TINY, tiny_overrides

    retrained = tmp_path / "retrained" / "another-name"  # a local teacher is known by its files alone
    shutil.copytree(tiny_teacher, retrained)
    model = tf.AutoModelForCausalLM.from_pretrained(retrained)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    model.save_pretrained(retrained)  # same tokenizer files, new weights

    def fingerprints(teacher, **overrides):
        cfg = load_config(TINY, tiny_overrides(teacher, tmp_path, **overrides))
        plan = make_plan(cfg, "superposition-distill", preflight(cfg, "superposition-distill"))
        return plan.stages["tokenize"].fingerprint, plan.stages["teacher_cache"].fingerprint

    tokens, cache = fingerprints(tiny_teacher)
    copy = tmp_path / "copy" / "renamed-teacher"
    shutil.copytree(tiny_teacher, copy)
    assert fingerprints(copy) == (tokens, cache)  # the same files under another name: the same teacher
    new_tokens, new_cache = fingerprints(retrained)
    assert new_tokens == tokens and new_cache != cache
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="teacher.load_in_4bit (loads the teacher onto a CUDA|needs bitsandby)"):
            fingerprints(tiny_teacher, **{"teacher.load_in_4bit": True})
    else:
        four_bit_tokens, four_bit_cache = fingerprints(tiny_teacher, **{"teacher.load_in_4bit": True})
        assert four_bit_tokens == tokens and four_bit_cache != cache


def test_a_data_file_edited_in_place_rebuilds_the_tokens(tiny_teacher, tmp_path):
    from distill.plan import make_plan, preflight

    from .conftest import TINY, tiny_overrides

    data = tmp_path / "corpus.jsonl"

    def tokens_fingerprint(text: str) -> str:
        data.write_text("".join(f'{{"text": "{text} {i}"}}\n' for i in range(40)))
        cfg = load_config(TINY, tiny_overrides(tiny_teacher, tmp_path, **{"data.builtin": None,
                                                                          "data.files": [str(data)]}))
        return make_plan(cfg, "self-distill", preflight(cfg, "self-distill")).stages["tokenize"].fingerprint

    first = tokens_fingerprint("def f(x): return x")
    assert tokens_fingerprint("def f(x): return x") == first  # the same contents: the same tokens
    assert tokens_fingerprint("class A: pass") != first  # the same name, other contents: not yesterday's tokens


def test_a_local_dataset_directory_is_fingerprinted_by_its_contents(tiny_teacher, tmp_path):
    from distill.plan import make_plan, preflight

    from .conftest import TINY, tiny_overrides

    directory = tmp_path / "stories"
    directory.mkdir()

    def tokens_fingerprint(text: str, **extra) -> str:
        (directory / "part-0.jsonl").write_text("".join(f'{{"text": "{text} {i}"}}\n' for i in range(40)))
        overrides = {"data.builtin": None, "data.dataset": str(directory), "data.streaming": True, **extra}
        cfg = load_config(TINY, tiny_overrides(tiny_teacher, tmp_path, **overrides))
        return make_plan(cfg, "self-distill", preflight(cfg, "self-distill")).stages["tokenize"].fingerprint

    first = tokens_fingerprint("def f(x): return x")
    assert tokens_fingerprint("def f(x): return x") == first
    assert tokens_fingerprint("class A: pass") != first  # edited in place: not yesterday's tokens
    with pytest.raises(ConfigError, match="is a local directory, which has none .*remove data.revision"):
        tokens_fingerprint("class A: pass", **{"data.revision": "main"})


def test_a_hub_dataset_is_tokenized_at_the_commit_its_revision_names(tiny_teacher, tmp_path, fake_hub, monkeypatch):
    """The Hub (its API on 127.0.0.1) says which commit a revision names; the datasets library's download is the one
    thing replaced, by a stand-in that serves each commit's rows and nothing for a branch or tag name."""
    import datasets
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    from distill.plan import plan_run
    from distill.stage import execute
    from distill.stages import STAGES
    from storage import shards

    from .conftest import TINY, tiny_overrides

    first, second, tagged = "a" * 40, "b" * 40, "c" * 40
    versions = {first: "alpha: the first version of every story", second: "beta: the second version, rewritten",
                tagged: "gamma: the tagged release of the stories"}
    served = []

    def load_dataset(path, name=None, split=None, streaming=False, revision=None):
        served.append(revision)
        if path != "org/stories" or revision not in versions:
            raise FileNotFoundError(f"{path} has no revision {revision!r}")
        return [{"text": f"{versions[revision]} ({i})"} for i in range(60)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    fake_hub.commits["org/stories"] = {"main": first, "v1": tagged}
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    logged = []

    class Log:  # what plan_run logs through Prefect's run logger
        def info(self, message, *args):
            logged.append(("info", message % args))

        def warning(self, message, *args):
            logged.append(("warning", message % args))

    def tokenize(**extra):
        overrides = {"data.builtin": None, "data.dataset": "org/stories", "data.eval_fraction": 0.2, **extra}
        run, store = plan_run("self-distill", TINY, tiny_overrides(tiny_teacher, tmp_path, **overrides), Log())
        tokens = execute(STAGES["tokenize"], run.context("tokenize"))
        ids = shards.read_token_shards(store, tokens.splits["train"].path)["input_ids"]
        return tokens.fingerprint, tokenizer.decode(ids[0])

    fingerprint, text = tokenize()
    assert text.startswith("alpha") and set(served) == {first}  # main, read at the commit it named
    assert logged == [("info", f"data: org/stories revision main is commit {first}")]
    fake_hub.commits["org/stories"]["main"] = second  # upstream pushes a new version: tonight's run rebuilds
    new_fingerprint, new_text = tokenize()
    assert new_fingerprint != fingerprint and new_text.startswith("beta")
    fake_hub.commits["org/stories"]["main"] = first  # and back: yesterday's shards are found again
    assert tokenize() == (fingerprint, text)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a night without the Hub: the commit main named at the
    assert tokenize() == (fingerprint, text)  # last answer is in the cache's refs, so the same shards are found
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert tokenize(**{"data.revision": "v1"})[1].startswith("gamma")  # a tag, read at its commit
    requests = len(fake_hub.requests)
    assert tokenize(**{"data.revision": second})[1].startswith("beta") and len(fake_hub.requests) == requests

    monkeypatch.setattr(fake_hub, "commits", {})  # the Hub no longer knows it (offline alike): named, and said so
    logged.clear()
    with pytest.raises(ConfigError, match="cannot load dataset 'org/stories'.*revision 'main'"):
        tokenize()
    assert logged[0][0] == "warning" and "the commit of org/stories revision main is unknown" in logged[0][1]
    with pytest.raises(ConfigError, match="data.revision 'v1' names a revision of a Hugging Face dataset"):
        load_config(TINY, tiny_overrides(tiny_teacher, tmp_path, **{"data.revision": "v1"}))


def test_a_hub_teacher_is_loaded_at_the_commit_the_run_planned_even_when_main_moves(tiny_teacher, tmp_path,
                                                                                   monkeypatch):
    """A Hugging Face cache (offline, as in every test) holding two commits of ``org/tiny``; ``main`` moves to the
    second after the run is planned, as an upstream push during a nightly run would: every stage must still load the
    first, which the fingerprints name."""
    import shutil

    import transformers as tf
    from huggingface_hub import constants

    from distill.plan import plan_run
    from distill.teacher import Teacher

    from .conftest import TINY

    first, second = "1" * 40, "2" * 40
    repo = tmp_path / "hf-cache" / "models--org--tiny"
    shutil.copytree(tiny_teacher, repo / "snapshots" / first)
    shutil.copytree(tiny_teacher, repo / "snapshots" / second)
    pushed = tf.AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        pushed.lm_head.weight.add_(1.0)
    pushed.save_pretrained(repo / "snapshots" / second)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(repo.parent))

    class Log:
        def info(self, *args):
            pass

        warning = info

    overrides = {"teacher.name_or_path": "org/tiny", "storage.root": str(tmp_path / "artifacts")}
    run, _ = plan_run("self-distill", TINY, overrides, Log())
    assert run.config.teacher.revision == first
    (repo / "refs" / "main").write_text(second)  # pushed upstream while the run goes on
    planned = run.context("self_distill").teacher.load()  # what every stage of the run loads
    original = tf.AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert torch.equal(planned.lm_head.weight, original.lm_head.weight)
    assert torch.equal(Teacher(load_config(TINY, overrides).teacher).load().lm_head.weight, pushed.lm_head.weight)
    next_run, _ = plan_run("self-distill", TINY, overrides, Log())  # the next run: the new weights
    assert next_run.config.teacher.revision == second
    assert next_run.stages["self_distill"].fingerprint != run.stages["self_distill"].fingerprint


def test_a_teacher_that_is_not_a_causal_lm_or_whose_tokenizer_outgrew_it_fails_in_preflight(tiny_teacher, tmp_path):
    import shutil

    import transformers as tf

    from distill.plan import preflight

    from .conftest import TINY, tiny_overrides

    def check(teacher):
        preflight(load_config(TINY, tiny_overrides(teacher, tmp_path)), "self-distill")

    t5 = tmp_path / "t5"
    tf.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=400).save_pretrained(t5)
    with pytest.raises(ConfigError, match="is a t5 model, which transformers does not load as a causal LM"):
        check(t5)
    (tmp_path / "no-model-type").mkdir()
    (tmp_path / "no-model-type" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a Hugging Face model transformers can load: Unrecognized model"):
        check(tmp_path / "no-model-type")
    grown = tmp_path / "grown"
    shutil.copytree(tiny_teacher, grown)
    tokenizer = tf.AutoTokenizer.from_pretrained(grown)
    tokenizer.add_tokens(["<new-token>"])  # and the model not resized
    tokenizer.save_pretrained(grown)
    with pytest.raises(ConfigError, match=f"tokenizer has {len(tokenizer)} tokens but its model only "
                                          f"{len(tokenizer) - 1} embeddings .*resize_token_embeddings"):
        check(grown)


def test_a_teacher_whose_self_distilled_student_could_not_be_exported_fails_in_preflight(tiny_teacher, tmp_path):
    """transformers' packed layout needs output sizes divisible by 4: found before training, not after it."""
    import json
    import shutil

    from distill.plan import preflight

    from .conftest import TINY, tiny_overrides

    uneven = tmp_path / "uneven"
    shutil.copytree(tiny_teacher, uneven)
    config = json.loads((uneven / "config.json").read_text())
    (uneven / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 2}))
    cfg = load_config(TINY, tiny_overrides(uneven, tmp_path))
    with pytest.raises(ConfigError, match=r"self-distilled student could not be exported.*not divisible by 4: "
                                          r"model\.layers\.0\.mlp\.gate_proj, .*; distil it with the superposition "
                                          r"flow"):
        preflight(cfg, "self-distill")
    preflight(cfg, "superposition-distill")  # its student has sizes of its own


def test_the_gguf_options_change_the_export_alone_and_are_validated():
    for flow in ("self-distill", "superposition-distill"):
        base = fingerprints(flow, {})
        for overrides in ({"export.gguf": "tq1_0"}, {"export.gguf": "none"}, {"export.gguf_embeddings": "q8_0"}):
            changed = {name for name, fp in fingerprints(flow, overrides).items() if fp != base[name]}
            assert changed == {"export"}, (flow, overrides)
        assert fingerprints(flow, {"export.gguf": "tq2_0"}) == base  # the default, named
    with pytest.raises(ConfigError, match="export.gguf: Input should be 'tq2_0', 'tq1_0' or 'none'"):
        load_config("quickstart", {"export.gguf": "q4_0"})


def test_a_tokenizer_the_gguf_writer_cannot_write_fails_in_preflight_unless_the_gguf_is_off(tiny_teacher, tmp_path):
    """A byte-level BPE whose pre-tokenizer llama.cpp does not know (here: one that adds a prefix space) would make a
    GGUF llama.cpp refuses or tokenizes differently: found before any work, with the way out."""
    import json
    import shutil

    from distill.plan import preflight

    from .conftest import TINY, tiny_overrides

    spaced = tmp_path / "spaced"
    shutil.copytree(tiny_teacher, spaced)
    spec = json.loads((spaced / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (spaced / "tokenizer.json").write_text(json.dumps(spec))
    for flow in ("self-distill", "superposition-distill"):
        with pytest.raises(ConfigError, match=r"export.gguf 'tq2_0': llama.cpp has no pre-tokenizer known to match .*"
                                              r"or set export.gguf: none"):
            preflight(load_config(TINY, tiny_overrides(spaced, tmp_path)), flow)
        preflight(load_config(TINY, tiny_overrides(spaced, tmp_path, **{"export.gguf": "none"})), flow)
