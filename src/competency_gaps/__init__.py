"""Competency Gaps: where a model is weak and what its benchmarks miss, at the level of SAE concepts."""

__version__ = "0.1.0"
