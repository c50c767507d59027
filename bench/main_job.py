"""Measure the main job: wall time and peak memory of `snakemake --cores N` on a config, plus per-rule figures.

Usage: .venv/bin/python bench/main_job.py [--workdir DIR] [--cores 2] [--forceall]
Prints a table of each job's time and peak RSS (from Snakemake's benchmark files) and the totals.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]


def job_table(results: Path) -> pl.DataFrame:
    rows = []
    for tsv in sorted((results / "benchmarks_runtime").rglob("*.tsv")):
        frame = pl.read_csv(tsv, separator="\t")
        rows.append({"job": str(tsv.relative_to(results / "benchmarks_runtime").with_suffix("")),
                     "seconds": float(frame["s"][-1]), "max_rss_mb": float(frame["max_rss"][-1])})
    return pl.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=str(REPO), help="folder holding config.yaml (default: the repository)")
    parser.add_argument("--cores", default="2")
    parser.add_argument("--forceall", action="store_true", help="rerun every job even if results exist")
    args = parser.parse_args()
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", args.workdir, "--cores", args.cores]
    if args.forceall:
        command.append("--forceall")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    # ru_maxrss of waited-for descendants: the largest single process of the run (KiB on Linux).
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    import yaml

    results = Path(args.workdir) / yaml.safe_load((Path(args.workdir) / "config.yaml").read_text()).get("results", "results")
    table = job_table(results)
    with pl.Config(tbl_rows=100, fmt_str_lengths=80):
        print(table)
    print(f"sum of job times: {table['seconds'].sum():.0f} s; largest job RSS (Snakemake): {table['max_rss_mb'].max():.0f} MB")
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min) on {args.cores} cores; peak process RSS: {peak_mb:.0f} MB")
    # Jobs run side by side only when their threads fit the cores; model jobs take all of them here, so the
    # run is bounded by the sum of its jobs, and the matmul rate says how fast this machine does that work.
    from extraction import cpu_matmul_gflops

    print(f"this machine's fp32 matmul rate on {args.cores} threads: {cpu_matmul_gflops(int(args.cores)):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
