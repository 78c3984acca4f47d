"""Benchmark accuracy through EleutherAI's lm-evaluation-harness (``lm-eval`` on PyPI, the ``eval`` extra): an
optional part of the evaluate stage, on while ``eval.lm_eval.tasks`` names tasks.

A task is a harness task name (``hellaswag``: the harness's own YAML, its data from the Hub), a task YAML file, or
the name of a task shipped in ``configs/lm_eval/`` (``stdlib_next_line``: offline, the quickstart's domain). This
module checks the list before any work, says what of it enters the evaluate stage's fingerprint (a local task by
its files' content, a harness task by its name and the harness's version), runs the harness's ``simple_evaluate``
on each model and tables the results. lm_eval itself is imported only here and in ``distill.harness_lm``, and only
when tasks are set.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from storage.fingerprint import file_sha256

from .config import REPO_ROOT, ConfigError, LmEvalConfig

FIELD = "eval.lm_eval.tasks"
INSTALL = "pip install -e '.[eval]'"
LOCAL_TASKS = REPO_ROOT / "configs" / "lm_eval"
# the request types a model must answer, by a task's output_type
REQUESTS = {"multiple_choice": "loglikelihood", "loglikelihood": "loglikelihood",
            "loglikelihood_rolling": "loglikelihood_rolling", "generate_until": "generate_until"}


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def harness_version() -> str:
    return importlib.metadata.version("lm_eval")


def _existing(path: str) -> Path | None:
    """``path`` as it is (absolute, or relative to the working directory), else relative to the repository."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    return None


def local_task(entry: str) -> Path | None:
    """The task YAML ``entry`` names: a ``.yaml``/``.yml`` path, or a task shipped in ``configs/lm_eval/``; None
    for a harness task name. A path that does not exist is a ``ConfigError``."""
    if entry.endswith((".yaml", ".yml")):
        found = _existing(entry)
        if found is None:
            raise ConfigError(f"{FIELD}: {entry} does not exist (a task YAML, relative to the working directory or "
                              f"the repository); the tasks shipped here: {', '.join(shipped_tasks())}")
        return found
    shipped = LOCAL_TASKS / f"{entry}.yaml"
    return shipped.resolve() if shipped.is_file() else None


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in LOCAL_TASKS.glob("*.yaml"))


# ---- a task YAML's files, read without the harness ------------------------------------------------------------

class _Function(str):
    """A ``!function module.name`` reference of a task YAML (its module is a file beside the YAML)."""


class _TaskYamlLoader(yaml.SafeLoader):
    pass


_TaskYamlLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def _read_task_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader with one more tag)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{FIELD}: {path} is not a task YAML the harness could read: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{FIELD}: {path} is not a task YAML (a mapping with task:, dataset_path:, ...)")
    return raw


def _merged_task_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """The YAML with its ``include`` files under it, as the harness merges them, and every YAML file read."""
    if path in seen:
        raise ConfigError(f"{FIELD}: {path} includes itself (through {' -> '.join(map(str, seen))})")
    raw = _read_task_yaml(path)
    merged, files = {}, [path]
    includes = raw.pop("include", [])
    for include in includes if isinstance(includes, list) else [includes]:
        inc = Path(include) if Path(include).is_absolute() else path.parent / include
        if not inc.is_file():
            raise ConfigError(f"{FIELD}: {path} includes {include}, which does not exist")
        cfg, more = _merged_task_yaml(inc.resolve(), (*seen, path))
        merged.update(cfg)
        files += more
    return {**merged, **raw}, files


def _data_files(cfg: dict) -> list[str]:
    given = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = given.values() if isinstance(given, dict) else [given]
    return [f for v in values if v for f in ([v] if isinstance(v, str) else v)]


def _is_plain_path(name: str) -> bool:
    return "://" not in name and not any(c in name for c in "*?[")  # not a URL, not a glob


def _resolve_data_file(task: Path, name: str) -> Path:
    found = _existing(name)
    if found is None:
        raise ConfigError(f"{FIELD}: {task} reads {name} (dataset_kwargs.data_files), which does not exist relative "
                          "to the working directory or the repository; fix the path in the YAML")
    return found


def _functions(value: Any) -> Iterator[str]:
    if isinstance(value, _Function):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _functions(v)
    elif isinstance(value, list):
        for v in value:
            yield from _functions(v)


def local_task_identity(path: Path) -> dict:
    """What a local task scores, by content: its YAML files, the modules its ``!function``s name and its data files
    (a URL or a glob pattern, by name). The same task spelt as a short name or a path is the same task."""
    cfg, files = _merged_task_yaml(path)
    modules = {path.parent / f"{ref.rpartition('.')[0].replace('.', '/')}.py" for ref in _functions(cfg)}
    files += sorted(m for m in modules if m.is_file())
    data = [file_sha256(_resolve_data_file(path, f)) if _is_plain_path(f) else f for f in _data_files(cfg)]
    digest = hashlib.sha256("\n".join([file_sha256(f) for f in files] + data).encode()).hexdigest()
    return {"task": cfg.get("task") or cfg.get("group"), "sha256": digest}


# ---- checks before any work, and the fingerprint ----------------------------------------------------------------

@cache
def _harness_index() -> dict:
    """The harness's own task index (name -> entry), built once per process: it reads every YAML it ships."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def check(cfg: LmEvalConfig, requests: tuple[str, ...] | None = None, student: str = "student") -> None:
    """Raise ``ConfigError`` if the tasks could not run: the harness missing, a YAML or its data missing, a task
    name the harness does not know, or (``requests``: what the student answers; None: everything) a task whose
    requests the student cannot answer."""
    if not cfg.tasks:
        return
    if not installed():
        raise ConfigError(f"{FIELD} {cfg.tasks} needs lm-evaluation-harness, which is not installed: {INSTALL} (or "
                          f"pip install lm-eval), or set {FIELD}: []")
    output_types = {}
    for entry in cfg.tasks:
        path = local_task(entry)
        if path is not None:
            merged, _ = _merged_task_yaml(path)
            for name in _data_files(merged):
                if _is_plain_path(name):
                    _resolve_data_file(path, name)
            output_types[entry] = merged.get("output_type")
            continue
        index = _harness_index()
        if entry not in index:
            close = difflib.get_close_matches(entry, list(index), n=3)
            raise ConfigError(f"{FIELD}: lm-eval {harness_version()} knows no task {entry!r}"
                              + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + f"; `lm_eval ls tasks` lists them; a local task is a YAML path, or one of "
                              f"{', '.join(shipped_tasks())}")
        output_types[entry] = (index[entry].cfg or {}).get("output_type")  # groups and tags: their members vary
    if requests is not None:
        unsupported = {e: t for e, t in output_types.items() if t in REQUESTS and REQUESTS[t] not in requests}
        if unsupported:
            listed = ", ".join(f"{e} ({t})" for e, t in unsupported.items())
            raise ConfigError(f"{FIELD}: the {student} answers {' and '.join(requests)} requests only, and {listed} "
                              f"needs {', '.join(sorted({REQUESTS[t] for t in unsupported.values()}))}: choose "
                              "multiple-choice tasks for it")


def settings(cfg: LmEvalConfig) -> dict:
    """What the harness's results depend on (``check`` has passed): each task (a local one by content), few-shot,
    limit, batch size and the harness's version (its tasks' prompts and metrics change with it)."""
    tasks = []
    for entry in cfg.tasks:
        path = local_task(entry)
        tasks.append(local_task_identity(path) if path is not None else {"task": entry})
    return {"tasks": tasks, **cfg.fingerprinted(exclude=("tasks",)), "harness": harness_version()}


# ---- running it ------------------------------------------------------------------------------------------------

def task_specs(cfg: LmEvalConfig) -> tuple[list, bool]:
    """What ``simple_evaluate`` is given for each task, and whether the harness's own tasks are needed. A local
    single-task YAML goes as its mapping, its relative data files resolved here (the datasets library reads them
    relative to the working directory, which a Prefect worker chooses); other YAMLs (``!function``, ``include``,
    groups) go as their path, read by the harness itself."""
    specs, harness_tasks = [], False
    for entry in cfg.tasks:
        path = local_task(entry)
        if path is None:
            specs.append(entry)
            harness_tasks = True
            continue
        raw = _read_task_yaml(path)
        plain = (isinstance(raw.get("task"), str) and "include" not in raw and not list(_functions(raw)))
        if not plain:
            specs.append(str(path))
            continue
        given = (raw.get("dataset_kwargs") or {}).get("data_files")
        if given:
            raw["dataset_kwargs"]["data_files"] = _resolved_data_files(path, given)
        specs.append(raw)
    return specs, harness_tasks


def _resolved_data_files(task: Path, given):
    """``data_files`` (a name, a list, or a mapping of splits to either) with local paths made absolute."""
    def one(name: str) -> str:
        return str(_resolve_data_file(task, name)) if _is_plain_path(name) else name

    def many(value):
        return one(value) if isinstance(value, str) else [one(v) for v in value]

    return {split: many(v) for split, v in given.items()} if isinstance(given, dict) else many(given)


def json_safe(results: dict) -> dict:
    """The harness's results as JSON, made as its own CLI writes them (functions and dtypes as strings)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def evaluate(models: dict[str, Callable[[], AbstractContextManager]], cfg: LmEvalConfig,
             log: Callable[[str], None] = print) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Each model's ``simple_evaluate`` results on the tasks, and the seconds each took (``wall``, and ``cpu``: this
    process's, which a busy machine inflates less). ``models`` maps a name to a context factory yielding the model
    as a harness ``LM`` (and switching a dual-mode model while it is open)."""
    import copy

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    specs, harness_tasks = task_specs(cfg)
    # the harness's own index takes seconds to build: only when one of its tasks is named
    manager = TaskManager(include_defaults=harness_tasks)
    results, seconds = {}, {}
    for name, opening in models.items():
        log(f"lm-evaluation-harness {harness_version()}: {', '.join(cfg.tasks)} on the {name}")
        start, cpu = time.perf_counter(), time.process_time()
        with opening() as lm:
            out = simple_evaluate(model=lm, tasks=copy.deepcopy(specs), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  batch_size=cfg.batch_size, task_manager=manager, log_samples=False)
        seconds[name] = {"wall": round(time.perf_counter() - start, 2), "cpu": round(time.process_time() - cpu, 2)}
        results[name] = json_safe(out)
    return results, seconds


class AccuracyRow(BaseModel):
    """One task and metric: the teacher's, naive ternary's and the student's value, and the student's difference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    metric: str  # acc, acc_norm, exact_match,strict-match (a filter other than "none" is named after a comma)
    n: int | None  # examples scored
    teacher: float
    ptq_ternary: float
    student: float
    student_minus_teacher: float


def accuracy_rows(results: dict[str, dict]) -> list[AccuracyRow]:
    """Rows of the table from the three models' harness results (``teacher``, ``ptq_ternary``, ``student``): every
    metric the harness says is better higher or lower, per task (groups too). Standard errors stay in lm_eval.json."""
    teacher = results["teacher"]
    rows = []
    for task, metrics in teacher["results"].items():
        scored = teacher.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_ = key.partition(",")
            if metric not in scored or not isinstance(value, (int, float)):
                continue
            values = {name: float(results[name]["results"][task][key]) for name in ("teacher", "ptq_ternary",
                                                                                    "student")}
            rows.append(AccuracyRow(task=task, metric=metric if filter_ in ("", "none") else key,
                                    n=(teacher.get("n-samples", {}).get(task) or {}).get("effective"), **values,
                                    student_minus_teacher=values["student"] - values["teacher"]))
    return rows
