"""Which device and dtype the pipeline computes on (``teacher.device``, ``teacher.dtype``)."""

from __future__ import annotations

import torch

from .config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``teacher.device`` as a torch device: ``auto`` picks CUDA, then MPS, then the CPU; a named device must exist."""
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ConfigError(f"teacher.device {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: torch knows them; this pipeline does not
            raise ConfigError(f"teacher.device {spec!r}: the pipeline runs on cpu, cuda (cuda:N) or mps")
        _check_present(device, spec)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _check_present(device: torch.device, spec: str) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"teacher.device {spec!r}: torch sees no CUDA device here (torch {torch.__version__}); "
                              "use teacher.device: auto or cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"teacher.device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"teacher.device {spec!r}: MPS is not available here; use teacher.device: auto or cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: a CUDA GPU of compute capability 8.0 on (Ampere, Hopper, ...)
    or ROCm. torch's ``is_bf16_supported()`` also says yes for a V100 or T4, which only emulate bf16, far slower."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``teacher.dtype``; ``auto`` is bf16 where the GPU computes it natively, else fp32 (``float16`` is the fast
    choice on an older GPU: training then scales the loss)."""
    if spec != "auto":
        return DTYPES[spec]
    return torch.bfloat16 if native_bf16(device) else torch.float32
