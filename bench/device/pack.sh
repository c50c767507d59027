#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what bench/device/run.sh needs on a GPU machine that has torch but cannot reach
# a package index or the hub, within a 64 MiB transfer:
#   site.tar.xz   the packages of bench/device/packages.txt, at this .venv's versions, as unpacked CPython wheels
#                 for the machine's Python (DEVICE_PYTHON, default 3.12); large binaries nothing imports are left out
#   data.tar.xz   the default run's three benchmark folders (../shared/benchmarks), its SAE corpus and SmolLM2's
#                 tokenizer (from results/: run `make run` first)
# Usage: bash bench/device/pack.sh      (PYTHON312=/path/to/python3.12 if it is not on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."

DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
# (a pyenv shim can exist without the version behind it, so each candidate is tried)
for candidate in ${PYTHON312:-} "python$DEVICE_PYTHON" ~/.pyenv/versions/"$DEVICE_PYTHON".*/bin/python"$DEVICE_PYTHON"; do
  "$candidate" -m pip --version >/dev/null 2>&1 && PYTHON312=$candidate && break
done
[ -n "${PYTHON312:-}" ] || { echo "pack: need a Python $DEVICE_PYTHON with pip to unpack its wheels (set PYTHON312=...)" >&2; exit 1; }
[ -f results/sae_corpus/corpus.parquet ] && [ -d results/models/model=smollm2-135m/hf ] || { echo "pack: results/sae_corpus/corpus.parquet or the converted model is missing: run make run first" >&2; exit 1; }

rm -rf .device/wheels .device/site .device/data && mkdir -p .device/wheels .device/site .device/data
pins=$(grep -v '^#' bench/device/packages.txt | while read -r name; do
  echo "$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
done)
# Binary wheels for the machine's Python where the index has them; a package published only as a source
# distribution (pure Python) is built into a wheel here.
for pin in $pins; do
  "$PYTHON312" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 -d .device/wheels "$pin" 2>/dev/null ||
    "$PYTHON312" -m pip wheel -q --no-deps -w .device/wheels "$pin"
done
"$PYTHON312" -m pip install -q --no-deps --no-compile --target .device/site .device/wheels/*.whl
# Left out, to fit the transfer: wandb's service binaries, which run only when a wandb run starts (the workflow
# never starts one; sae-lens imports wandb), and pulp's CBC solvers for other platforms than the machine's x86-64
# Linux (Snakemake's scheduler uses pulp).
rm -rf .device/site/wandb/bin .device/site/bin .device/site/pulp/solverdir/cbc/{osx,win,linux/arm64,linux/i32}
find .device/site -name __pycache__ -prune -exec rm -rf {} +
tar -C .device/site -cf - . | xz -9e -T0 > .device/site.tar.xz

mkdir -p .device/data/benchmarks
cp -r ../shared/benchmarks/gsm8k ../shared/benchmarks/social_iqa ../shared/benchmarks/bbq .device/data/benchmarks/
cp results/sae_corpus/corpus.parquet .device/data/
mkdir -p .device/data/tokenizer
cp results/models/model=smollm2-135m/hf/tokenizer* results/models/model=smollm2-135m/hf/chat_template.jinja .device/data/tokenizer/
tar -C .device/data -cf - . | xz -9 -T0 > .device/data.tar.xz
rm -rf .device/wheels .device/site .device/data
ls -l .device/*.tar.xz
echo "pack: a device call carries the two archives (carry: .device/site.tar.xz .device/data.tar.xz) and runs bash bench/device/run.sh"
