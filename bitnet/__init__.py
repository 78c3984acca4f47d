"""BitNet b1.58 model core: quantizers, layers, dual-mode patching, students, losses, packed and GGUF export.

Pure PyTorch (+ transformers for patching and export, and the optional gguf package, imported by the GGUF export
when it runs); knows nothing of Prefect or storage.
"""

from .checkpointing import checkpoint_blocks
from .export import (
    freeze_ternary,
    load_student,
    pack_ternary,
    save_gguf,
    save_student,
    save_ternary_pretrained,
    unpack_ternary,
    unpackable_layers,
)
from .layers import BitLinear, DualModeLinear, TernaryLinear
from .losses import hidden_cosine_loss, kl_to_teacher, next_token_cross_entropy, sampled_kl, sparse_topk_kl
from .patch import DualModel, find_block_linears, find_block_lists, patch_model
from .quant import bitlinear, int8_activation, ste_int8_codes, ste_ternary_codes, ternary_weight
from .student import Decompressor, StudentConfig, SuperpositionStudent

__all__ = [
    "BitLinear", "DualModeLinear", "TernaryLinear", "DualModel", "patch_model", "find_block_linears",
    "find_block_lists", "checkpoint_blocks",
    "SuperpositionStudent", "StudentConfig", "Decompressor",
    "ternary_weight", "int8_activation", "ste_ternary_codes", "ste_int8_codes", "bitlinear",
    "next_token_cross_entropy", "kl_to_teacher", "sparse_topk_kl", "sampled_kl", "hidden_cosine_loss",
    "pack_ternary", "unpack_ternary", "save_ternary_pretrained", "save_gguf", "save_student", "load_student",
    "freeze_ternary",
    "unpackable_layers",
]
