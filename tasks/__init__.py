"""Thin Prefect tasks: one per stage, each returning a small manifest (paths, fingerprints, metrics)."""
