import pytest

from .tiny_teacher import build_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session: it takes ~15 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_overrides(teacher, root, **extra) -> dict:
    """A complete pipeline in a few seconds: stdlib text, 32-token rows, a 2-layer student, a few steps."""
    return {
        "name": "tiny", "teacher.name_or_path": str(teacher), "storage.root": str(root),
        "data.builtin": "stdlib", "data.max_documents": 60, "data.seq_len": 32, "data.max_train_rows": 48,
        "data.max_eval_rows": 8, "data.rows_per_shard": 16,
        "cache.batch_size": 8, "cache.topk": 8, "cache.layers": [-1],
        "student.dim": 32, "student.n_layers": 2, "student.n_heads": 4,
        "train.steps": 6, "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 3,
        "train.checkpoint_every": 3, "head.steps": 4, "head.batch_size": 4,
        "eval.batch_size": 4, "eval.max_rows": 8, "eval.max_new_tokens": 4,
        **extra,
    }
