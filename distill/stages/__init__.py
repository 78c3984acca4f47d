"""The pipeline's stages, one module each, named as the stage is everywhere: in the plan, in Prefect and in the
artifact store."""

from .evaluate import Evaluate
from .export import Export
from .lm_head import LmHead
from .self_distill import SelfDistill
from .superposition import Superposition
from .teacher_cache import TeacherCache
from .tokenize import Tokenize

STAGES = {stage.name: stage() for stage in (Tokenize, TeacherCache, Superposition, LmHead, SelfDistill, Evaluate,
                                            Export)}
