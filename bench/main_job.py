"""Measure the main job and say what bounds its wall time: per job its time, CPU time, start-up and peak
memory against what the rule declared, the schedule's idle cores, and the least wall time the jobs' work allows.

Usage: .venv/bin/python bench/main_job.py [--workdir DIR] [--cores 2] [--forceall] [--analyse-only] [--target-s 540]

Without --analyse-only it runs `snakemake --cores N` first (--forceall: every job again) and times it. Either
way it then reads the run back from what Snakemake writes anyway:
- the latest Snakemake log (.snakemake/log/): each job's start and finish, threads and declared resources;
- each job's benchmark file (results/benchmarks_runtime/): wall and CPU seconds, peak RSS;
- each job's own log: the start-up the CLI logs ("ready after X s": imports and loading, up to model work)
  and its CPU time ("finished after …"; measured by the process, where the benchmark file samples it).
It prints one table of the jobs and then the bounds: the jobs' CPU seconds divided by the cores is the least
wall time any schedule could reach on this machine (the work bound); the cores left idle while the run lasted
is what a better schedule could still recover. Jobs whose peak RSS exceeded their mem_mb, or whose wall time
their declared runtime, are flagged. Nothing here is a test: it prints figures.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
# Issue 10's 10 minutes for the default `make run`, less its set-up on a fresh clone (about 60 s on the
# reference VM since uv installs the packages: 105 s with pip), leaves this much for Snakemake.
TARGET_S = 540

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_FINISHED = re.compile(r"^Finished jobid: (\d+)")
_READY = re.compile(r"ready after ([\d.]+) s")
_FINISHED_AFTER = re.compile(r"finished after [\d.]+ s wall, ([\d.]+) CPU-seconds")


@dataclass
class Job:
    """One job of a Snakemake run, as its log records it."""

    rule: str
    start: datetime
    jobid: int = -1
    threads: int = 1
    resources: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    benchmark: str | None = None
    end: datetime | None = None


def _parse_stamp(text: str) -> datetime:
    return datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")


def _read_job_field(job: Job, key: str, value: str) -> None:
    if key == "jobid":
        job.jobid = int(value)
    elif key == "threads":
        job.threads = int(value)
    elif key == "resources":
        job.resources = dict(part.split("=", 1) for part in value.split(", ") if "=" in part)
    elif key in ("log", "benchmark"):
        setattr(job, key, value.split(", ")[0])


def parse_snakemake_log(path: Path) -> list[Job]:
    """Every job the log started, with its finish time (None: it never finished in this run)."""
    jobs: dict[int, Job] = {}
    stamp: datetime | None = None
    current: Job | None = None
    for line in path.read_text(errors="replace").splitlines():
        if match := _STAMP.match(line):
            stamp, current = _parse_stamp(match.group(1)), None
        elif (match := _RULE.match(line)) and stamp is not None:
            current = Job(match.group(1), stamp)
        elif (match := _FINISHED.match(line)) and stamp is not None:
            if (job := jobs.get(int(match.group(1)))) is not None:
                job.end = stamp
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            _read_job_field(current, key, value)
            if key == "jobid":
                jobs[current.jobid] = current
    return list(jobs.values())


def latest_log(workdir: Path) -> Path:
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        raise SystemExit(f"no Snakemake log under {workdir / '.snakemake' / 'log'}: run the workflow first")
    return logs[-1]


def _benchmark_figures(path: Path | None) -> dict[str, float]:
    if path is None or not path.is_file():
        return {}
    last = pl.read_csv(path, separator="\t").row(-1, named=True)
    return {"cpu_s": float(last["cpu_time"]), "max_rss_mb": float(last["max_rss"])}


def _from_job_log(path: Path | None, pattern: re.Pattern[str]) -> float | None:
    """A figure the CLI logs in every job (start-up, CPU time), or None for jobs that log none."""
    if path is None or not path.is_file():
        return None
    match = pattern.search(path.read_text(errors="replace"))
    return float(match.group(1)) if match else None


def job_table(jobs: list[Job], workdir: Path) -> pl.DataFrame:
    """One row per finished job: wall from the Snakemake log, start-up and CPU time from the job's own log (CPU
    time from its benchmark file where the job logs none) and peak RSS from its benchmark file."""
    finished = sorted((j for j in jobs if j.end is not None and j.rule != "all"), key=lambda j: j.start)
    rows = []
    for job in finished:
        figures = _benchmark_figures(workdir / job.benchmark if job.benchmark else None)
        job_log = workdir / job.log if job.log else None
        name = Path(job.benchmark).with_suffix("").as_posix().split("benchmarks_runtime/")[-1] if job.benchmark else job.rule
        rows.append({
            "job": name, "threads": job.threads, "start_s": (job.start - finished[0].start).total_seconds(),
            "wall_s": (job.end - job.start).total_seconds(),
            "cpu_s": _from_job_log(job_log, _FINISHED_AFTER) or figures.get("cpu_s"),
            "start_up_s": _from_job_log(job_log, _READY),
            "max_rss_mb": figures.get("max_rss_mb"), "mem_mb": _int_or_none(job.resources.get("mem_mb")),
            "runtime_min": _int_or_none(job.resources.get("runtime")),
        })
    return pl.DataFrame(rows)


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def idle_core_seconds(table: pl.DataFrame, cores: int, span_s: float) -> float:
    """Core-seconds no job held: the run's span times the cores, less each job's threads (capped at the cores)
    over its wall time. Snakemake's own work between jobs counts as idle."""
    held = (table["threads"].clip(upper_bound=cores) * table["wall_s"]).sum()
    return cores * span_s - held


def bounds_report(table: pl.DataFrame, cores: int, span_s: float, target_s: float) -> list[str]:
    """What bounds the wall time: the work, the idle cores, the jobs that dominate, start-up, and resources."""
    cpu = float(table["cpu_s"].fill_null(0).sum())
    work_bound = cpu / cores
    idle = idle_core_seconds(table, cores, span_s)
    held = table.filter(pl.col("cpu_s").is_not_null())
    unused = held.with_columns(unused=pl.col("threads").clip(upper_bound=cores) * pl.col("wall_s") - pl.col("cpu_s"))
    unused = unused.sort("unused", descending=True)
    lines = [
        f"Snakemake span (first job start to last finish): {span_s:.0f} s ({span_s / 60:.1f} min)",
        f"work: {cpu:.0f} CPU-seconds over {table.height} jobs; on {cores} cores no schedule finishes in under "
        f"{work_bound:.0f} s (the work bound)",
        f"idle: {idle:.0f} core-seconds while the run lasted ({100 * idle / (cores * span_s):.0f} % of {cores} × span): "
        f"the most a better schedule could recover is {idle / cores:.0f} s of wall time",
        f"held but not computing: {unused['unused'].clip(lower_bound=0).sum():.0f} core-seconds (threads × wall − CPU "
        "seconds: single-threaded stretches of multi-threaded jobs, waiting on files; a job that logs no CPU time "
        "has it from Snakemake's samples, which miss up to a sampling interval): most in " + "; ".join(
            f"{row['job']} ({row['cpu_s']:.0f} of {min(row['threads'], cores) * row['wall_s']:.0f})"
            for row in unused.head(3).iter_rows(named=True)),
    ]
    top = held.sort("cpu_s", descending=True).head(5)
    lines.append("largest shares of the work: " + "; ".join(
        f"{row['job']} {row['cpu_s']:.0f} s ({100 * row['cpu_s'] / cpu:.0f} %)" for row in top.iter_rows(named=True)))
    start_up = table["start_up_s"].drop_nulls()
    if start_up.len():
        lines.append(f"start-up (imports and loading, from the jobs' logs): {start_up.sum():.0f} s over {start_up.len()} "
                     f"jobs, {start_up.min():.1f}–{start_up.max():.1f} s each")
    verdict = ("within reach of the work" if work_bound <= target_s else
               f"out of reach on this machine: the work alone needs {work_bound:.0f} s; {work_bound - target_s:.0f} s "
               f"of wall ({cores * (work_bound - target_s):.0f} CPU-seconds) would have to go")
    lines.append(f"target {target_s:.0f} s of Snakemake wall (--target-s): {verdict}")
    lines += _resource_flags(table)
    return lines


def _resource_flags(table: pl.DataFrame) -> list[str]:
    over_mem = table.filter(pl.col("max_rss_mb") > pl.col("mem_mb"))
    over_time = table.filter(pl.col("wall_s") > 60 * pl.col("runtime_min"))
    lines = [f"over mem_mb: {row['job']} peaked at {row['max_rss_mb']:.0f} MB against {row['mem_mb']} MB"
             for row in over_mem.iter_rows(named=True)]
    lines += [f"over runtime: {row['job']} ran {row['wall_s']:.0f} s against {row['runtime_min']} min"
              for row in over_time.iter_rows(named=True)]
    headroom = table.filter(pl.col("mem_mb").is_not_null() & pl.col("max_rss_mb").is_not_null())
    if headroom.height:
        tightest = headroom.with_columns(share=pl.col("max_rss_mb") / pl.col("mem_mb")).sort("share").row(-1, named=True)
        lines.append(f"memory: {'no' if not over_mem.height else over_mem.height} job(s) over their mem_mb; the tightest, "
                     f"{tightest['job']}, peaked at {tightest['max_rss_mb']:.0f} of {tightest['mem_mb']} MB")
    return lines


def run_workflow(workdir: Path, cores: int, forceall: bool) -> None:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores)]
    if forceall:
        command.append("--forceall")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    # ru_maxrss of waited-for descendants: the largest single process of the run (KiB on Linux).
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"wall time of `snakemake --cores {cores}`: {wall:.0f} s ({wall / 60:.1f} min); peak process RSS: {peak_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO), help="folder holding config.yaml (default: the repository)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--forceall", action="store_true", help="rerun every job even if results exist")
    parser.add_argument("--analyse-only", action="store_true", help="read back the latest run; run nothing")
    parser.add_argument("--target-s", type=float, default=TARGET_S,
                        help="Snakemake wall time to compare the bounds with (default: 600 s less ~60 s of set-up)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    if not args.analyse_only:
        run_workflow(workdir, args.cores, args.forceall)
    log_path = latest_log(workdir)
    jobs = parse_snakemake_log(log_path)
    finished = [job for job in jobs if job.end is not None]
    if not finished:
        raise SystemExit(f"{log_path}: no finished job found (is it a Snakemake log of a run that did work?)")
    table = job_table(jobs, workdir)
    span = (max(job.end for job in finished) - min(job.start for job in finished)).total_seconds()
    print(f"run: {log_path.relative_to(workdir)}")
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=200, float_precision=1):
        print(table)
    for line in bounds_report(table, args.cores, span, args.target_s):
        print(line)
    from extraction import cpu_matmul_gflops

    print(f"this machine's fp32 matmul rate on {args.cores} threads: {cpu_matmul_gflops(args.cores):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
