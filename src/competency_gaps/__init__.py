"""Competency Gaps: where a model is weak and what its benchmarks miss, at the level of SAE concepts."""

import os as _os

# Intel MKL (torch's CPU matrix products on x86) sums a product of a few rows, a forward pass over a few tokens say,
# in an order that depends on the number of threads, so an SAE trained on 2 threads differed from one trained on 1,
# and results would change with --cores. Strict conditional numerical reproducibility fixes the order whatever the
# thread count, at no cost measured (bench/README.md). Set before torch's first matrix product, when MKL reads it;
# a value already in the environment is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
