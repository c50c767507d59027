"""Every performance figure in one run on one machine: each bench script in turn, its output under a heading.

Usage: .venv/bin/python bench/all.py [--quick] [--skip reduce,mc_scoring]
(23 minutes on the 2-vCPU reference VM while another job shared it, mostly extraction and multiple-choice
 scoring, before generation.py decoded the evaluate stage's own batch, which adds about 5; --quick: smaller
 sizes everywhere, 10 minutes there)

Runs, as child processes with the project's interpreter and each script's own CPU defaults: extraction.py
(saliency extraction, random weights), shard_rows.py (extraction's host side), mc_scoring.py (multiple-choice
scoring against lm-eval), generation.py (greedy generation against plain `generate`), sae_training.py (activation collection and SAE
training, the stage's against sae-lens's own SAE and trainer), labels.py (the labels stage), reduce.py (the reducer on synthetic shards up to 3×10^5 items) and
explorer.py (the explorer's load and interaction latency at 65,536 concepts in headless Chromium).
First it prints the machine (CPU model, cores, RAM, GPU, torch version, load average); a script whose inputs
are missing is skipped with the reason (the model and corpus come from `make run`; lm-eval from
`pip install -e ".[bench]"`). Timings on a shared machine are noisy: the load average is printed before each
script so that a figure taken under load can be recognised.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = REPO / "results"
MANIFEST = RESULTS / "models" / "model=smollm2-135m" / "manifest.json"
CORPUS = RESULTS / "sae_corpus" / "corpus.parquet"
GSM8K_ITEMS = RESULTS / "benchmarks" / "benchmark=gsm8k" / "items.parquet"
RUN_FIRST = "run `make run` first (it converts the model and writes the SAE corpus and benchmark items)"


# --- prerequisites --------------------------------------------------------------------------------------

def missing_files(*paths: Path) -> str | None:
    """Why a script cannot run: the first missing input (None: all there)."""
    for path in paths:
        if not path.exists():
            return f"{path.relative_to(REPO)} is missing: {RUN_FIRST}"
    return None


def missing_model() -> str | None:
    """The default model's manifest and the folder it points to (a relative `hf` beside it once converted)."""
    if not MANIFEST.is_file():
        return missing_files(MANIFEST)
    import json

    manifest = json.loads(MANIFEST.read_text())
    folder = MANIFEST.parent / manifest["load_from"] if manifest.get("relative") else Path(manifest["load_from"])
    if manifest.get("relative") and not (folder / "config.json").is_file():
        return f"the converted model {folder.relative_to(REPO)} is missing: {RUN_FIRST}"
    return None


def missing_package(module: str, install: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{module} is not installed: {install}"


def first_reason(*checks: Callable[[], str | None]) -> str | None:
    for check in checks:
        reason = check()
        if reason:
            return reason
    return None


# --- the scripts ----------------------------------------------------------------------------------------

@dataclass
class Bench:
    name: str
    what: str
    missing: Callable[[], str | None] = lambda: None
    quick: list[str] = field(default_factory=list)  # arguments of a --quick run, after `args`
    args: list[str] = field(default_factory=list)  # arguments of every run


BENCHES = [
    Bench("extraction", "saliency extraction: pipeline vs naive (random weights, SmolLM2-135M shape)",
          quick=["--n-prompts", "16"], args=["--shared-head", "48"]),  # the default benchmarks share 37-60 tokens
    Bench("shard_rows", "extraction's host side: keeping the saliency rows for the shard (ShardRows vs Python lists)",
          quick=["--items", "2000"]),
    Bench("mc_scoring", "multiple-choice scoring: pipeline vs lm-evaluation-harness",
          lambda: missing_package("lm_eval", "pip install -e '.[bench]'"), quick=["--n-items", "24", "--skip-old"]),
    Bench("generation", "greedy generation: evaluate.greedy_decode vs plain model.generate",
          lambda: first_reason(missing_model, lambda: missing_files(GSM8K_ITEMS)),
          quick=["--n-prompts", "16", "--batch-size", "16", "--max-new-tokens", "256"]),
    Bench("sae_training", "SAE stage: activation collection; TopK training, the stage's vs sae-lens's own",
          lambda: first_reason(missing_model, lambda: missing_files(CORPUS)), quick=["--n-vectors", "5120"]),
    Bench("labels", "labels stage: corpus pass, context tables, labels (default SAE width)",
          lambda: first_reason(missing_model, lambda: missing_files(CORPUS)), quick=["--corpus-tokens", "8192"]),
    Bench("reduce", "reducer on synthetic shards: time, peak memory, bytes on disk",
          quick=["--sizes", "10000"]),
    Bench("explorer", "explorer in headless Chromium: load, table and map latency at 65,536 concepts",
          lambda: None if shutil.which("chromium") else "chromium is not installed (apt-get install chromium)",
          quick=["--concepts", "16384", "--items", "20000"]),
]


# --- the machine ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def gpu_and_torch() -> tuple[str, str]:
    """The GPU (or 'none') and torch's version, asked of torch itself."""
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)", "not installed"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "none"
    return gpu, torch.__version__


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def print_machine() -> None:
    gpu, torch_version = gpu_and_torch()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores ({usable} usable); RAM {memory_gib():.1f} GiB; GPU: {gpu}")
    print(f"Python {platform.python_version()}, torch {torch_version}; {platform.platform()}")
    print(f"load average (1/5/15 min) at start: {load_average()}; date {time.strftime('%Y-%m-%d %H:%M')}")
    from extraction import cpu_matmul_gflops

    print(f"fp32 matmul rate: {cpu_matmul_gflops():.0f} GFLOP/s (all usable cores; the 2-vCPU VMs this project runs on "
          "measured 135 to 300, so compare timings from different days through it)")


# --- running --------------------------------------------------------------------------------------------

def run_script(bench: Bench, quick: bool) -> tuple[str, float]:
    """Run one script, its stdout streamed as it comes; its stderr (logs, progress bars) is kept aside and
    its tail printed only when it fails. Returns the status and the wall seconds."""
    command = [sys.executable, str(BENCH / f"{bench.name}.py"), *bench.args, *(bench.quick if quick else [])]
    print(f"$ python bench/{bench.name}.py {' '.join(command[2:])}".rstrip(), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env) as child:
            for line in child.stdout:
                print(line, end="", flush=True)
        seconds = time.perf_counter() - start
        if child.returncode == 0:
            return "ok", seconds
        stderr.seek(0)
        tail = stderr.read().splitlines()[-15:]
        print(f"\n[{bench.name} failed with exit status {child.returncode}; last lines of its stderr:]")
        print("\n".join(f"    {line}" for line in tail))
        return f"failed ({child.returncode})", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", default="", help=f"comma-separated names to leave out: {', '.join(b.name for b in BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes everywhere (e.g. reduce --sizes 10000)")
    args = parser.parse_args()
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skipped - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown name(s) in --skip: {', '.join(sorted(unknown))}")

    print_machine()
    outcomes: list[tuple[str, str, float | None]] = []
    for bench in BENCHES:
        print(f"\n{'=' * 100}\n## {bench.name}: {bench.what}\n{'=' * 100}")
        reason = "--skip" if bench.name in skipped else bench.missing()
        if reason:
            print(f"skipped: {reason}")
            outcomes.append((bench.name, f"skipped: {reason}", None))
            continue
        print(f"load average before: {load_average()}")
        status, seconds = run_script(bench, args.quick)
        outcomes.append((bench.name, status, seconds))

    print(f"\n{'=' * 100}\n## summary{' (--quick)' if args.quick else ''}\n{'=' * 100}")
    for name, status, seconds in outcomes:
        timing = f"{seconds:.0f} s" if seconds is not None else ""
        print(f"  {name:<14}{timing:>8}  {status}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
