"""The quickstart corpus: the Python standard library source of the running interpreter.

It exists on every machine that runs this project, so the quickstart needs no
download, and it is code, which suits a code teacher. Nothing is copied into the
repository: the files are read at run time from ``sysconfig.get_paths()["stdlib"]``.

Which files
    Every ``*.py`` under the stdlib root, in sorted order of their path relative to
    the root (POSIX separators), except:

    * ``site-packages/``: installed third-party packages, not the standard library;
    * test suites, i.e. any directory named ``test``, ``tests`` or ``idle_test``
      (``test/``, ``lib2to3/tests``, ``idlelib/idle_test``, ``ctypes/test`` ...):
      they hold deliberately broken files (bad syntax, bad encodings) and bulky
      fixtures, and many distributions (Debian's ``python3``) do not ship them, so
      excluding them also keeps the corpus alike across machines;
    * generated data rather than code: ``pydoc_data/`` (0.75 MB of help text in
      one dict), the 70 charmap codecs in ``encodings/`` that define a module-level
      ``decoding_table``/``decoding_map`` (1.2 MB of ``'\\x00' # 0x00 -> NULL``
      lines, mostly made by ``gencodec.py``, which would make perplexity look better
      than the model is), and ``_sysconfigdata_*.py`` (this machine's build flags);
    * empty files.

    On CPython 3.11 on Linux this leaves about 660 files, 10 MB of text.

The split
    A file is in ``eval`` when the first 8 bytes of ``sha256(relpath)``, read as a
    big-endian integer, fall below ``EVAL_FRACTION`` (5%) of 2**64, else ``train``.
    The split depends only on the relative path, so it is the same on every
    machine and Python version, and a module is never in both splits.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterator, Literal

Split = Literal["train", "eval"]

EVAL_FRACTION = 0.05
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "pydoc_data"})
# Module-level table of a charmap codec (encodings/cp1252.py and friends).
_CODEC_TABLE = re.compile(r"^decoding_(table|map) = ", re.MULTILINE)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def split_of(relpath: str) -> Split:
    """``"eval"`` for ~EVAL_FRACTION of paths, chosen by a hash of the POSIX relative path."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64 else "train"


def _read(path: Path) -> str:
    # A few stdlib files carry Latin-1 bytes in comments; replace rather than fail.
    return path.read_text(encoding="utf-8", errors="replace")


def _excluded(relpath: str, text: str) -> bool:
    parts = relpath.split("/")
    if EXCLUDED_DIRS.intersection(parts[:-1]):
        return True
    if parts[-1].startswith("_sysconfigdata"):
        return True
    if parts[0] == "encodings" and _CODEC_TABLE.search(text):
        return True
    return not text.strip()


def list_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files, sorted (see the module docstring)."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        # Cheap directory test first so that site-packages and tests are never read.
        if EXCLUDED_DIRS.intersection(rel.split("/")[:-1]) or not path.is_file():
            continue
        if not _excluded(rel, _read(path)):
            out.append(rel)
    return sorted(out)


def iter_documents(split: Split, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(relpath, text)`` for the files of one split, in sorted path order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    root = stdlib_root() if root is None else Path(root)
    for rel in list_files(root):
        if split_of(rel) == split:
            yield rel, _read(root / rel)


def write_jsonl(path: str | Path, split: Split, root: Path | None = None) -> int:
    """Write one split as JSON lines ``{"path": ..., "text": ...}``; return the number of documents.

    This is the form the pipeline's "local jsonl files" dataset option reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rel, text in iter_documents(split, root):
            f.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n
