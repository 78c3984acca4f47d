"""The exported model card's Hub metadata (its YAML front matter), from the run's configuration."""

import pytest
import yaml

from distill.config import load_config
from distill.stages.export import TAGS, card_metadata
from distill.students import SelfDistilled, Superposed

STUDENTS = {"self-distill": SelfDistilled, "superposition-distill": Superposed}


def front_matter(flow: str, preset: str, overrides: dict | None = None) -> dict:
    student = STUDENTS[flow]
    return yaml.safe_load(card_metadata(load_config(preset, overrides or {}), student.library_name,
                                        student.base_model_relation))


def test_a_hub_teachers_self_distilled_student_is_listed_as_its_quantization():
    meta = front_matter("self-distill", "reference")  # Qwen/Qwen2.5-Coder-1.5B-Instruct on roneneldan/TinyStories
    assert meta["base_model"] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["datasets"] == ["roneneldan/TinyStories"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == TAGS


def test_a_superposition_student_names_its_teacher_but_not_transformers_or_a_quantization():
    meta = front_matter("superposition-distill", "reference")
    assert meta["base_model"] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert "base_model_relation" not in meta and "library_name" not in meta  # loaded by bitnet.load_student


@pytest.mark.parametrize("flow", ["self-distill", "superposition-distill"])
def test_a_local_teacher_and_corpus_are_not_named_as_hub_repositories(flow, tmp_path):
    (tmp_path / "stories").mkdir()
    meta = front_matter(flow, "quickstart", {"data.builtin": None, "data.dataset": str(tmp_path / "stories")})
    assert "base_model" not in meta and "datasets" not in meta  # a local path is no Hub id
    assert meta["tags"] == TAGS
