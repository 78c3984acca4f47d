"""Both flows end to end under a temporary Prefect server, reuse across runs, and bad configurations."""

import asyncio
import json
import logging
import math
import re
import time

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort

from pathlib import Path

from bitnet import load_student
from distill.config import ConfigError
from distill.stages.export import TAGS
from flows import self_distill, superposition_distill
from flows.__main__ import main
from storage.cache_spec import GROUP_DIR, RECORDS_DIR, record_path
from storage.store import MARKER

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_harness")

REQUIRED_METRICS = ["teacher", "ptq_ternary", "student", "packed_bytes", "fp16_bytes", "flow", "config", "fingerprints"]
SUPERPOSITION = ["tokenize", "teacher_cache", "superposition", "lm_head", "evaluate", "export"]


def read_api(method: str, flow_run_id, **kwargs):
    """Read task runs or artifacts of a flow run back through the Prefect API."""
    async def read():
        async with get_client() as client:
            only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            return await getattr(client, method)(flow_run_filter=only_this_run, **kwargs)
    return asyncio.run(read())


def task_states(flow_run_id, expected: list[str], timeout: float = 30) -> dict[str, str]:
    """Final state name of each task run of a flow run, by task name.

    Task run states reach the server as events, written a moment after the flow returns: poll until every
    ``expected`` task has a final state (or the timeout passes, and the caller's assertion shows what was seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = read_api("read_task_runs", flow_run_id, limit=100, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        states = {run.name.rsplit("-", 1)[0]: run.state for run in runs if run.state}
        if all(name in states and states[name].is_final() for name in expected) or time.monotonic() > deadline:
            return {name: state.name for name, state in states.items()}
        time.sleep(0.5)


def run_flow(flow_fn, teacher, root, **extra):
    state = flow_fn(config=TINY, overrides=tiny_overrides(teacher, root, **extra), return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def check_metrics(result):
    links = {name: Path(where) for name, where in result["links"].items()}  # a local root: absolute paths
    metrics = json.loads(links["metrics.json"].read_text())
    for key in REQUIRED_METRICS:
        assert key in metrics, key
    for name in ("teacher", "ptq_ternary", "student"):
        assert math.isfinite(metrics[name]["perplexity"]) and metrics[name]["perplexity"] > 1
        assert metrics[name] == result["metrics"][name]  # the flow returns what metrics.json holds
    for key in ("kl_to_teacher", "top1_agreement"):
        assert key in metrics["student"]
    assert links["report"].read_text().startswith("# ")
    assert links["loss curves"].read_bytes()[:4] == b"\x89PNG"
    return metrics


def artifacts_of(flow_run_id) -> dict[str, list[str]]:
    """Artifact type -> keys (or descriptions, for unkeyed ones) created by a flow run and its tasks."""
    kinds: dict[str, list[str]] = {}
    for artifact in read_api("read_artifacts", flow_run_id, limit=200, offset=0, sort=ArtifactSort.CREATED_DESC,
                             artifact_filter=ArtifactFilter(), task_run_filter=TaskRunFilter()):
        kinds.setdefault(artifact.type, []).append(artifact.key or artifact.description)
    return kinds


def test_superposition_flow_end_to_end(tiny_teacher, tmp_path):
    result, flow_run_id = run_flow(superposition_distill, tiny_teacher, tmp_path)
    metrics = check_metrics(result)
    artifacts = artifacts_of(flow_run_id)
    assert "superposition-distill-tiny-report" in artifacts["markdown"]
    report = read_artifact(flow_run_id, "superposition-distill-tiny-report")
    assert "## Loss curves\n\n![loss curves](data:image/png;base64,iVBORw0KGgo" in report  # the PNG, in the report
    assert "superposition-distill-tiny-metrics" in artifacts["table"]
    links = {"superposition-distill-tiny-student", "superposition-distill-tiny-loss-curves",  # links are markdown
             "superposition-distill-tiny-checkpoints", "superposition-distill-tiny-student-checkpoints"}
    assert links <= set(artifacts["markdown"])
    assert any("cache teacher" in d for d in artifacts["progress"]) and any("superposition" in d for d in
                                                                            artifacts["progress"])
    assert Path(result["links"]["checkpoints"]).name == "checkpoints"  # the head's, beside the student's
    assert "/lm_head-" in result["links"]["checkpoints"] and "/superposition-" in result["links"]["student checkpoints"]
    assert "student_via_teacher_head" in metrics
    [cosine] = metrics["student"]["hidden_cosine"]  # the reconstructed layer, through the decompressor
    assert -1 <= cosine <= 1
    student, projector = load_student(tmp_path / result["export"]["path"])
    assert projector is not None
    ids = torch.randint(0, 300, (1, 8))
    assert torch.isfinite(student(ids).logits).all()
    assert (tmp_path / result["export"]["path"] / "tokenizer.json").exists()
    check_model_card(tmp_path / result["export"]["path"], library=None)
    check_gguf(tmp_path / result["export"]["path"], result, student.config.n_layers * 7)  # q, k, v apart
    assert "## Run it with llama.cpp" in report and "llama-completion -m " in report


def check_gguf(directory, result, ternary_layers: int):
    """student.gguf beside the transformers export: the manifest names it, its size and the layers that are not
    TQ2_0 (the tiny models' rows of 32 to 128 values are not 256-value blocks: all of them, in Q8_0); the card says how
    to run it; gguf reads it back."""
    gguf = pytest.importorskip("gguf")  # a dependency of the project

    manifest = result["export"]["gguf"]
    path = directory / "student.gguf"
    assert manifest["file"] == "student.gguf" and manifest["bytes"] == path.stat().st_size
    assert manifest["qtype"] == "tq2_0" and len(manifest["fallback"]) == ternary_layers
    assert set(manifest["fallback"].values()) == {"Q8_0"}
    assert Path(result["links"]["student gguf"]) == path
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types == {"Q8_0", "F16", "F32"}
    card = ModelCard.load(directory / "README.md").text
    assert "## Run it with llama.cpp" in card and "llama-completion -m student.gguf" in card


def read_artifact(flow_run_id, key: str) -> str:
    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": [key]}),
                                                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return found[0].data
    return asyncio.run(read())


def test_a_run_validates_its_configuration_once_and_loads_the_teacher_at_most_once_per_stage(tiny_teacher, tmp_path,
                                                                                         monkeypatch):
    """Counted in this process, where Prefect runs the stages: the configuration is resolved once by the flow and
    travels to the tasks as it is; each stage loads the teacher's weights and tokenizer at most once."""
    from prefect.context import TaskRunContext

    from distill.config import PipelineConfig

    validations, loads = [], []
    validate, init = PipelineConfig.model_validate.__func__, PipelineConfig.__init__

    def counting_validate(cls, *args, **kwargs):
        validations.append("model_validate")
        return validate(cls, *args, **kwargs)

    def counting_init(self, *args, **kwargs):  # how Prefect would rebuild a model it introspects
        validations.append("__init__")
        init(self, *args, **kwargs)

    monkeypatch.setattr(PipelineConfig, "model_validate", classmethod(counting_validate))
    monkeypatch.setattr(PipelineConfig, "__init__", counting_init)
    for cls in (tf.AutoModelForCausalLM, tf.AutoTokenizer):
        def counting_load(klass, *args, _original=cls.from_pretrained.__func__, _what=cls.__name__, **kwargs):
            context = TaskRunContext.get()
            loads.append((context.task.name if context else "flow", _what))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(counting_load))
    run_flow(self_distill, tiny_teacher, tmp_path, **{"self_distill.teacher_signal": "cache"})
    assert len(validations) == 1, validations
    per_stage = {(stage, what): loads.count((stage, what)) for stage, what in set(loads)}
    assert set(stage for stage, _ in per_stage) == {"flow", "tokenize", "teacher_cache", "self_distill", "evaluate",
                                                    "export"}, per_stage
    assert all(count == 1 for count in per_stage.values()), per_stage


def test_self_distill_flow_end_to_end_and_stock_loading(tiny_teacher, tmp_path):
    result, _ = run_flow(self_distill, tiny_teacher, tmp_path)
    metrics = check_metrics(result)
    assert len(metrics["student"]["hidden_cosine"]) == 2  # "all" layers of the 2-layer teacher
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / result["export"]["path"])
    assert exported.config.quantization_config.quant_method == "bitnet"
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / result["export"]["path"])
    with torch.no_grad():
        assert torch.isfinite(exported(**tokenizer("def f(x):", return_tensors="pt")).logits).all()
    check_model_card(tmp_path / result["export"]["path"], library="transformers")
    check_gguf(tmp_path / result["export"]["path"], result, 2 * 7)


def check_model_card(directory, library):
    """The export's README parses as a Hub model card (huggingface_hub's own parser) with our metadata."""
    card = ModelCard.load(directory / "README.md")
    assert card.data.tags == TAGS and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == library
    assert card.data.base_model is None  # the tiny teacher is a local directory, no Hub id
    assert "# BitNet b1.58 student of" in card.text and "## Held-out metrics" in card.text


def test_rerun_reuses_every_stage_and_a_change_reruns_from_the_first_affected(tiny_teacher, tmp_path):
    first, first_id = run_flow(superposition_distill, tiny_teacher, tmp_path)
    again, again_id = run_flow(superposition_distill, tiny_teacher, tmp_path)
    stages = SUPERPOSITION
    states = task_states(again_id, stages)
    assert {s: states[s] for s in stages} == {s: "Cached" for s in stages}
    assert again["metrics"]["student"] == first["metrics"]["student"]
    # settings that change no result (how often training checkpoints, how many checkpoints it keeps) reuse it all
    _, operational_id = run_flow(superposition_distill, tiny_teacher, tmp_path,
                                 **{"train.checkpoint_every": 1, "train.keep_checkpoints": 1})
    states = task_states(operational_id, stages)
    assert {s: states[s] for s in stages} == {s: "Cached" for s in stages}

    def rerun_from(stage: str) -> dict[str, str]:
        i = stages.index(stage)
        return {**dict.fromkeys(stages[:i], "Cached"), **dict.fromkeys(stages[i:], "Completed")}

    # a stage's own settings alone: it and the stages after it run again, beside (not over) the first results
    head, head_id = run_flow(superposition_distill, tiny_teacher, tmp_path, **{"head.steps": 2})
    states = task_states(head_id, stages)
    assert {s: states[s] for s in stages} == rerun_from("lm_head")
    assert head["metrics"]["student"] != first["metrics"]["student"]
    assert head["export"]["path"] != first["export"]["path"] and head["run"] == first["run"]
    evaluated, eval_id = run_flow(superposition_distill, tiny_teacher, tmp_path, **{"eval.max_new_tokens": 2})
    states = task_states(eval_id, stages)
    assert {s: states[s] for s in stages} == rerun_from("evaluate")
    assert evaluated["metrics"]["student"] == first["metrics"]["student"]  # the same student, only fewer samples
    for result in (first, head, evaluated):
        assert Path(result["links"]["metrics.json"]).exists()
        assert (tmp_path / result["export"]["path"] / MARKER).exists()
    assert json.loads(Path(first["links"]["metrics.json"]).read_text())["config"]["head"]["steps"] == 4

    _, changed_id = run_flow(superposition_distill, tiny_teacher, tmp_path, **{"data.seq_len": 24})
    states = task_states(changed_id, stages)
    assert {s: states[s] for s in stages} == {s: "Completed" for s in stages}

    _, student_id = run_flow(superposition_distill, tiny_teacher, tmp_path, **{"student.n_layers": 1})
    states = task_states(student_id, stages)
    assert states["tokenize"] == states["teacher_cache"] == "Cached"
    assert states["superposition"] == states["evaluate"] == "Completed"


def test_a_repaired_teacher_cache_is_rebuilt_by_the_next_run(tiny_teacher, tmp_path, capsys):
    """`python -m flows verify --repair` reopens the damaged chunks and their stage: the next run of the flow must
    rewrite exactly those chunks (not return the stage's stored result) and reuse every other stage."""
    first, _ = run_flow(superposition_distill, tiny_teacher, tmp_path)
    metrics = json.loads(Path(first["links"]["metrics.json"]).read_text())
    train = tmp_path / "teacher_cache" / metrics["fingerprints"]["teacher_cache"] / "train"
    command = ["verify", "superposition-distill", "--config", TINY, "--set", f"teacher.name_or_path={tiny_teacher}",
               "--set", f"storage.root={tmp_path}"]

    def record_times() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (train / RECORDS_DIR).iterdir()}

    assert main(command) == 0 and capsys.readouterr().out.count(" intact") == len(SUPERPOSITION)
    chunk_files = sorted((train / GROUP_DIR / "input_ids").glob("c.*"))
    chunk_files[1].write_bytes(b"damaged")
    export = tmp_path / first["export"]["path"]
    (export / "README.md").write_text("edited by hand")
    assert main(command) == 1  # damage found, nothing changed
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "damaged (teacher cache at" in lines["teacher_cache"]
    assert "1 corrupt (chunk 1 (samples 8-15)" in lines["teacher_cache"]
    assert lines["export"].endswith("damaged (README.md does not match the checksum recorded when it was written)")
    assert [stage for stage, line in lines.items() if "damaged" in line] == ["teacher_cache", "export"]
    assert main([*command, "--repair"]) == 0
    assert capsys.readouterr().out.count("reopened: the next run redoes it") == 2
    assert not (export / MARKER).exists() and not (train / MARKER).exists()
    before = record_times()
    _, again_id = run_flow(superposition_distill, tiny_teacher, tmp_path)
    states = task_states(again_id, SUPERPOSITION)
    assert {s: states[s] for s in SUPERPOSITION} == {**dict.fromkeys(SUPERPOSITION, "Cached"),
                                                     "teacher_cache": "Completed", "export": "Completed"}
    after = record_times()
    assert {name for name in after if before.get(name) != after[name]} == {record_path(1).rsplit("/", 1)[1]}
    assert (export / "README.md").read_text().startswith("---\n")  # rewritten
    assert main(command) == 0 and capsys.readouterr().out.count(" intact") == len(SUPERPOSITION)


CACHED_SIGNAL = {"self_distill.teacher_signal": "cache"}


@pytest.mark.parametrize("flow,overrides,message", [
    (self_distill, {"data.seq_len": 128}, "data.seq_len 128 exceeds the teacher's maximum positions \\(64\\)"),
    (superposition_distill, {"cache.layers": [5]}, "cache.layers \\[5\\] do not exist: the teacher has hidden states 0..2"),
    (self_distill, {"self_distill.hidden_layers": [9]}, "self_distill.hidden_layers \\[9\\] do not exist"),
    (self_distill, {"train.steps": 0}, "train.steps: Input should be greater than 0"),
    # the cached teacher signal must hold every term of the loss: found out before tokenizing, not at step 1
    (self_distill, {**CACHED_SIGNAL, "cache.topk": 0}, "kl_weight > 0 reads the teacher's logits.*cache.topk > 0"),
    (self_distill, {**CACHED_SIGNAL, "self_distill.hidden_weight": 1.0},
     "hidden_weight > 0 matches hidden states \\[1\\], which cache.layers \\[-1\\] does not hold"),
    (superposition_distill, {"cache.layers": [0]}, "reconstructs the deepest listed layer, here the embeddings"),
    (superposition_distill, {"cache.topk": 0, "head.topk_kl_weight": 0.5}, "head.topk_kl_weight > 0 needs cached teacher logits"),
    (superposition_distill, {"cache.topk": 100000}, "cache.topk 100000 exceeds the teacher's \\d+ logits per token"),
    # a local teacher has no revisions: a set revision would be ignored (and split the fingerprint for nothing)
    (superposition_distill, {"teacher.revision": "v1"}, "teacher.revision 'v1' names a Hub revision, but .* is a "
                                                          "local directory"),
    (superposition_distill, {"cache.layers": []}, "cache.layers is empty: list at least one hidden state"),
    (self_distill, {"teacher.device": "gpu"}, "teacher.device 'gpu' is not a device: use auto, cpu, cuda"),
    (self_distill, {"teacher.device": "cuda:99"}, "teacher.device 'cuda:99': (torch sees no CUDA|this machine has)"),
    (self_distill, {"teacher.device": "meta"}, "teacher.device 'meta': the pipeline runs on cpu, cuda"),
])
def test_bad_configurations_fail_before_any_work(tiny_teacher, tmp_path, flow, overrides, message):
    with pytest.raises(ConfigError, match=message):
        flow(config=TINY, overrides=tiny_overrides(tiny_teacher, tmp_path, **overrides))
    assert not (tmp_path / "tokens").exists()


def test_a_user_error_is_logged_without_its_traceback(tiny_teacher, tmp_path):
    """Prefect logs the exception that ends a run with its traceback; a ConfigError's message is the whole story."""
    records = []
    capture = logging.Handler()
    capture.emit = records.append
    flow_runs = logging.getLogger("prefect.flow_runs")
    flow_runs.addHandler(capture)
    try:
        overrides = tiny_overrides(tiny_teacher, tmp_path, **{"cache.topk": 100000})
        with pytest.raises(ConfigError, match="cache.topk 100000 exceeds"):
            superposition_distill(config=TINY, overrides=overrides)
        try:  # any other exception keeps its traceback
            raise RuntimeError("a bug")
        except RuntimeError as exc:
            flow_runs.exception("Encountered exception during execution: %r", exc, extra={"send_to_api": False})
    finally:
        flow_runs.removeHandler(capture)
    failures = [r for r in records if r.getMessage().startswith("Encountered exception during execution")]
    assert [("cache.topk 100000" in r.getMessage(), r.exc_info is None) for r in failures] == [(True, True),
                                                                                               (False, False)]


def test_missing_teacher_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="teacher.name_or_path: .*does not exist"):
        superposition_distill(config=TINY, overrides=tiny_overrides(tmp_path / "no-such-teacher", tmp_path))


def test_malformed_data_file_is_a_clear_error(tiny_teacher, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "cut short\n')
    overrides = tiny_overrides(tiny_teacher, tmp_path, **{"data.builtin": None, "data.files": [str(data)]})
    with pytest.raises(ConfigError, match=f"data.files: cannot read {data} as jsonl: "):
        self_distill(config=TINY, overrides=overrides)
    assert not (tmp_path / "tokens").exists()


def test_unknown_dataset_column_is_a_clear_error(tiny_teacher, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"body": "some text " * 20}) + "\n")
    overrides = tiny_overrides(tiny_teacher, tmp_path, **{"data.builtin": None, "data.files": [str(data)],
                                                          "data.text_field": "content"})
    with pytest.raises(ConfigError, match="data.text_field 'content' is not a column"):
        self_distill(config=TINY, overrides=overrides)


def test_a_failed_stage_leaves_prefects_record_of_it_in_one_folder_and_readable(tiny_teacher, tmp_path):
    # preflight reads the first file; tokenizing fails on the second
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 8}) + "\n")
    bad.write_text('{"text": "cut short\n')
    root = tmp_path / "artifacts"
    overrides = tiny_overrides(tiny_teacher, root, **{"data.builtin": None, "data.files": [str(good), str(bad)]})
    state = self_distill(config=TINY, overrides=overrides, return_state=True)
    assert state.is_failed()
    [tokenize] = read_api("read_task_runs", state.state_details.flow_run_id)
    assert tokenize.state.is_failed() and f"cannot read {bad} as jsonl" in tokenize.state.message
    # Prefect persists the failure under a random key of the result storage: not among the stages' directories
    [record] = (root / "prefect").iterdir()
    assert not [p.name for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)]
    with pytest.raises(ConfigError, match=f"cannot read {bad} as jsonl"):  # and reads it back from there
        tokenize.state.result()
    assert record.name == tokenize.state.data.storage_key
