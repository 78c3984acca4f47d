"""Benchmarks: speed, memory and storage of the pipeline, each a ratio against the baseline a user would compare
against, measured side by side in one process. Run one with ``python -m bench.<name>``; see bench/README.md."""
