"""Shared by the storage tests and the subprocesses they start: opening a store from a JSON description,
deterministic teacher-cache data, running a Python snippet in a child process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage import ArtifactStore
from storage.cache import TeacherCacheSpec

REPO = Path(__file__).resolve().parents[2]


def describe(store: ArtifactStore) -> str:
    """JSON a child process turns back into the same store with ``open_described``."""
    options = {k: v for k, v in store.storage_options.items() if k in ("endpoint_url", "key", "secret")}
    return json.dumps({"root": store.root, "options": options or None})


def open_described(text: str) -> ArtifactStore:
    spec = json.loads(text)
    return ArtifactStore(spec["root"], storage_options=spec["options"], check=False)


def small_spec(**overrides) -> TeacherCacheSpec:
    """A tiny cache: 10 samples in chunks of 3 (the last one partial), two layers, top-k."""
    values = dict(num_samples=10, seq_len=6, layers=[0, 2], hidden_size=8, dtype="bfloat16", chunk_size=3, topk=4,
                  fingerprint="fp-test")
    return TeacherCacheSpec(**{**values, **overrides})


def chunk_arrays(spec: TeacherCacheSpec, chunk: int) -> dict[str, torch.Tensor]:
    """What a teacher would produce for ``chunk``: the same in every process (seeded by the chunk index)."""
    start, stop = spec.chunk_rows(chunk)
    n, t = stop - start, spec.seq_len
    rng = torch.Generator().manual_seed(1000 + chunk)
    lengths = torch.randint(1, t + 1, (n,), generator=rng)
    arrays = {"input_ids": torch.randint(0, 50_000, (n, t), generator=rng, dtype=torch.int32),
              "attention_mask": (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int8)}
    for layer in spec.layers:
        arrays[f"hidden/layer_{layer}"] = torch.randn(n, t, spec.hidden_size, generator=rng) * (layer + 1)
    if spec.topk and spec.logits == "sampled":
        arrays["sampled_counts"] = torch.randint(0, 256, (n, t, spec.topk), generator=rng, dtype=torch.uint8)
        arrays["sampled_indices"] = torch.randint(0, 50_000, (n, t, spec.topk), generator=rng, dtype=torch.int32)
    elif spec.topk:
        values, indices = torch.randn(n, t, 100, generator=rng).topk(spec.topk, dim=-1)
        arrays["topk_values"], arrays["topk_indices"] = values.half(), indices.int()
    if spec.full_logits:
        arrays["logits"] = torch.randn(n, t, spec.vocab_size, generator=rng)
    return arrays


def expected_stored(spec: TeacherCacheSpec, chunk: int) -> dict[str, torch.Tensor]:
    """``chunk_arrays`` as the reader must return them (hidden states and logits in the storage dtype)."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    return {name: (value.to(dtype) if name.startswith(("hidden/", "logits")) else value)
            for name, value in chunk_arrays(spec, chunk).items()}


def tree_bytes(store: ArtifactStore, path: str, skip=("_lock", "_lease.json")) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, but the writer's lock."""
    return {name: store.read_bytes(name) for name in store.find(path) if name.rsplit("/", 1)[-1] not in skip}


def run_python(code: str, *args: str, timeout: float = 120, wait: bool = True, env_extra: dict | None = None,
               **kwargs):
    """Run ``code`` in a fresh interpreter with the repository importable; returns the CompletedProcess (or the
    Popen when ``wait`` is False)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    command = [sys.executable, "-c", code, *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kwargs)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def build_cache(store: ArtifactStore, path: str, spec: TeacherCacheSpec, before_chunk=None, **writer_options) -> int:
    """Write every missing chunk of ``chunk_arrays`` data, calling ``before_chunk(chunk)`` first (the teacher's
    forward pass would run there); returns how many chunks this call wrote."""
    from storage.cache import TeacherCacheWriter

    with TeacherCacheWriter(store, path, spec, **writer_options) as writer:
        missing = writer.missing_chunks()
        for chunk in missing:
            if before_chunk is not None:
                before_chunk(chunk)
            writer.write_chunk(chunk, chunk_arrays(spec, chunk))
    return len(missing)


# ---- read-only and full filesystems: real tmpfs mounts in a private mount namespace ------------------------------

def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def run_on_tmpfs(mount_options: str, mount_point, code: str) -> dict:
    """Run ``code`` in a child process that sees a fresh tmpfs (``mount_options``) at ``mount_point``; the child
    prints one JSON line, returned here."""
    if not can_mount():
        pytest.skip("needs `unshare --user --mount` (unprivileged user namespaces) to mount a real tmpfs")
    mount_point.mkdir()
    script = f'mount -t tmpfs -o {mount_options} tmpfs "{mount_point}" && exec "$0" "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, sys.executable,
                             "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
