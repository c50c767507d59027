#!/usr/bin/env bash
# The GPU figures of issues 10 and 11 in one command, on a GPU machine whose Python has torch (CUDA) but none of
# polars, snakemake, sae-lens, datasets, ...: what bench/device/pack.sh put in .device/ supplies them.
#   1. unpack .device/site.tar.xz (onto PYTHONPATH) and .device/data.tar.xz (benchmarks, SAE corpus, tokenizer);
#   2. write a random-weight model of Llama-3.2-1B's shape (bench/random_model.py);
#   3. run the whole DAG of configs/gpu-random on the GPU (`--resources gpu=1`), then bench/main_job.py on it;
#   4. bench/extraction.py at the issue's H100 setup and bench/sae_training.py --stream (STREAM_VECTORS vectors).
# Every step's output goes to $OUT (default .device/out): dag.log, main_job.txt, extraction.txt, sae_stream.txt,
# and the run's figures and logs as results.tar.gz. STEPS (default "dag extraction stream") picks steps, PYTHON
# (default python3) the interpreter that has torch, SHAPE (default llama-1b) the random model's shape and
# SNAKEMAKE_ARGS more Snakemake options: bench/device/dry-run.yaml says how to try the script on a CPU.
# Usage: bash bench/device/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.device/out}
STEPS=${STEPS:-dag extraction stream}
STREAM_VECTORS=${STREAM_VECTORS:-4000000}
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-llama-1b}
SNAKEMAKE_ARGS=${SNAKEMAKE_ARGS:-}
mkdir -p "$OUT" /tmp/device-site /tmp/device-bin

tar -xJf .device/site.tar.xz -C /tmp/device-site && tar -xJf .device/data.tar.xz -C .device || exit 1
# The rules call `python`; the machine may only have python3. A wrapper, not a link: a link to a virtualenv's
# interpreter starts it outside that virtualenv.
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PYTHON")" > /tmp/device-bin/python && chmod +x /tmp/device-bin/python
export PATH="/tmp/device-bin:$PATH" PYTHONPATH="/tmp/device-site:$PWD/src" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# The carried packages have no byte code: the import check below writes it once, so that each job does not
# compile them again (measured on a CPU without it: 18-56 s of start-up per job).
unset PYTHONDONTWRITEBYTECODE
python - <<'EOF' 2>&1 | tee "$OUT/versions.txt" || exit 1
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "sae-lens", "polars", "snakemake", "datasets", "pyarrow", "numpy", "huggingface-hub"):
    print(name, m.version(name))
import competency_gaps.cli, competency_gaps.workflow, datasets, polars, sae_lens, snakemake.api, umap  # what the jobs import
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
EOF

# Peak host memory of a command and its children, from the kernel's accounting (no /usr/bin/time needed).
timed() {
  python - "$@" <<'EOF'
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"timed: {' '.join(sys.argv[1:4])}: exit {code}, {time.perf_counter() - start:.1f} s wall, peak RSS of one process {peak:,.0f} MB", flush=True)
sys.exit(code)
EOF
}

if [[ " $STEPS " == *" dag "* ]]; then
  [ -d .device/random-llama-1b ] || python bench/random_model.py --shape "$SHAPE" --tokenizer .device/tokenizer --out .device/random-llama-1b
  timed python -m snakemake -s Snakefile -d configs/gpu-random --cores "$(nproc)" --resources gpu=1 $SNAKEMAKE_ARGS > "$OUT/dag.log" 2>&1
  tail -5 "$OUT/dag.log"
  python bench/main_job.py --analyse-only --workdir configs/gpu-random --cores "$(nproc)" > "$OUT/main_job.txt" 2>&1; tail -25 "$OUT/main_job.txt"
  (cd configs/gpu-random && tar -czf - results/logs results/figures results/sae results/gaps results/benchmarks_runtime 2>/dev/null) > "$OUT/results.tar.gz"
fi
if [[ " $STEPS " == *" extraction "* ]]; then
  python bench/extraction.py --shape llama-1b --d-sae 65536 --k 64 --layer 8 --n-prompts 512 --batch-sizes 8,32 \
      --batch-tokens 32768 > "$OUT/extraction.txt" 2>&1; cat "$OUT/extraction.txt"
fi
if [[ " $STEPS " == *" stream "* ]]; then
  timed python bench/sae_training.py --stream --shape llama-1b --device cuda --layer 8 --d-sae 16384 --k 64 \
      --batch-size 4096 --collect-batch 64 --n-vectors "$STREAM_VECTORS" > "$OUT/sae_stream.txt" 2>&1; cat "$OUT/sae_stream.txt"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
