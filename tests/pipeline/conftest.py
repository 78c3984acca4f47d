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


TINY = "tests/pipeline/tiny.yaml"


def tiny_overrides(teacher, root, **extra) -> dict:
    """The tiny preset pointed at a teacher and an artifact root."""
    return {"teacher.name_or_path": str(teacher), "storage.root": str(root), **extra}
