"""Results do not depend on the number of threads a job runs on (config `threads`, capped at --cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# A fresh interpreter: MKL reads its reproducibility setting at the first matrix product, which in this test
# session may have happened before competency_gaps was imported. Products of a few rows by the default model's
# widths are the case that differed between 1 and 2 threads (6 of the row counts 1-64 on the reference machine).
PRODUCTS = """
import json, competency_gaps, torch
generator = torch.Generator().manual_seed(0)
differ = []
for rows in range(1, 17):
    x = torch.randn(rows, 576, generator=generator)
    w = torch.randn(1536, 576, generator=generator)
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[threads] = torch.nn.functional.linear(x, w)
    if not torch.equal(out[1], out[2]):
        differ.append(rows)
print(json.dumps(differ))
"""


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without Intel MKL")
def test_matrix_products_are_the_same_on_one_and_two_threads():
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    run = subprocess.run([sys.executable, "-c", PRODUCTS], env=env, capture_output=True, text=True, check=True)
    assert json.loads(run.stdout) == []
