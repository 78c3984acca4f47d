"""The teacher cache in shards: several workers writing disjoint ranges of chunks at once, then the stage finishing
what they left, give the very cache one process writes."""

import logging
import threading

from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES

from .conftest import TINY, tiny_overrides

CACHE = {"cache.batch_size": 4, "data.max_train_rows": 40}  # 10 train chunks, 2 eval chunks


def planned(tiny_teacher, root):
    run, store = plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, root, **CACHE),
                          logging.getLogger())
    return run, store, execute(STAGES["tokenize"], run.context("tokenize"))


def files(root, path) -> dict[str, bytes]:
    """Every file of the cache but the locks (the shard writers' and the stage's own)."""
    base = root / path
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.name not in ("_lock", "_COMPLETE.json") and "_ranges" not in p.parts}


def test_shards_written_at_once_then_finished_equal_one_writers_cache(tiny_teacher, tmp_path):
    stage = STAGES["teacher_cache"]
    run, _, tokens = planned(tiny_teacher, tmp_path / "one")
    single = execute(stage, run.context("teacher_cache"), tokens=tokens)

    run, _, tokens = planned(tiny_teacher, tmp_path / "sharded")
    shards = stage.shards(run.context("teacher_cache"), 3, tokens=tokens)
    assert [s.name for s in shards] == ["train-0-2", "train-3-6", "train-7-9", "eval-0-0", "eval-1-1"]
    written, errors = {}, []

    def work(shard):
        try:
            written[shard.name] = stage.run_shard(run.context("teacher_cache"), shard, tokens=tokens)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(shard,)) for shard in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and written == {"train-0-2": 3, "train-3-6": 4, "train-7-9": 3, "eval-0-0": 1, "eval-1-1": 1}
    assert stage.run_shard(run.context("teacher_cache"), shards[0], tokens=tokens) == 0  # done: nothing to write
    assert stage.shards(run.context("teacher_cache"), 3, tokens=tokens) == []  # no work left to hand out
    finished = execute(stage, run.context("teacher_cache"), tokens=tokens)  # writes nothing, finishes each split
    assert finished.model_dump(exclude={"path"}) == single.model_dump(exclude={"path"})
    assert files(tmp_path / "sharded", finished.path) == files(tmp_path / "one", single.path)
