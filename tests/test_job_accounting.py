"""What a job logs about its own cost, and bench/main_job.py reading a run back from Snakemake's log."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import polars as pl

from competency_gaps.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import main_job  # noqa: E402


def test_every_job_logs_its_wall_cpu_time_and_peak_memory(tmp_path, caplog):
    spec = json.dumps({"config": {"adapter": "probe_arithmetic", "limit": None, "malformed": "fail",
                                  "options": {"n": 5, "seed": 0}, "seed": 0, "template": None}, "version": 2})
    with caplog.at_level(logging.INFO, logger="competency_gaps.cli"):
        main(["prepare", "--benchmark", "probe_arithmetic", "--spec", spec, "--items", str(tmp_path / "items.parquet"),
              "--report", str(tmp_path / "report.json")])
    match = re.search(r"finished after ([\d.]+) s wall, ([\d.]+) CPU-seconds, peak RSS (\d+) MB", caplog.text)
    assert match, caplog.text
    wall, cpu, peak_mb = float(match.group(1)), float(match.group(2)), int(match.group(3))
    # This test's own process: it has run the interpreter and imported polars and torch, so it has used CPU
    # time and holds more than 50 MB; the wall time is counted from the CLI module's import.
    assert wall > 0 and cpu > 0 and peak_mb > 50
    assert pl.read_parquet(tmp_path / "items.parquet").height == 5


SNAKEMAKE_LOG = """\
Select jobs to execute...
[Sun Dec  6 08:59:02 2026]
localrule sae:
    input: results/models/model=m/manifest.json
    log: results/logs/sae/model=m/layer=3.log
    jobid: 2
    benchmark: results/benchmarks_runtime/sae/model=m/layer=3.tsv
    threads: 2
    resources: tmpdir=/tmp, runtime=24, gpu=0, mem_mb=4147, mem=4.15 GB, mem_mib=3955
Shell command: python -m competency_gaps sae
[Sun Dec  6 09:00:42 2026]
Finished jobid: 2 (Rule: sae)
[Sun Dec  6 09:00:42 2026]
rule evaluate:
    log: results/logs/evaluate/model=m/benchmark=b.log
    jobid: 5
    benchmark: results/benchmarks_runtime/evaluate/model=m/benchmark=b.tsv
    resources: tmpdir=/tmp, runtime=120, mem_mb=3526
[Sun Dec  6 09:00:52 2026]
Finished jobid: 5 (Rule: evaluate)
[Sun Dec  6 09:00:52 2026]
localrule figures:
    jobid: 7
    threads: 1
"""


def _write_run(root: Path) -> None:
    (root / ".snakemake" / "log").mkdir(parents=True)
    (root / ".snakemake" / "log" / "2026-12-06T085832.snakemake.log").write_text(SNAKEMAKE_LOG)
    for job, cpu, rss in [("sae/model=m/layer=3", 150.0, 5000.0), ("evaluate/model=m/benchmark=b", 9.0, 1000.0)]:
        tsv = root / "results" / "benchmarks_runtime" / f"{job}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text(f"s\tmax_rss\tcpu_time\n1.0\t{rss}\t{cpu}\n")
    job_log = root / "results" / "logs" / "evaluate" / "model=m" / "benchmark=b.log"
    job_log.parent.mkdir(parents=True)
    job_log.write_text("INFO competency_gaps.cli: ready after 4.5 s (imports, model loaded)\n"
                       "INFO competency_gaps.cli: finished after 10.0 s wall, 9.5 CPU-seconds, peak RSS 900 MB\n")


def test_main_job_reads_the_run_back_from_the_logs(tmp_path):
    _write_run(tmp_path)
    jobs = main_job.parse_snakemake_log(main_job.latest_log(tmp_path))
    assert [(job.rule, job.threads, job.end is not None) for job in jobs] == [("sae", 2, True), ("evaluate", 1, True),
                                                                              ("figures", 1, False)]
    table = main_job.job_table(jobs, tmp_path)
    sae, evaluate = table.row(0, named=True), table.row(1, named=True)
    assert (sae["wall_s"], sae["start_s"], sae["threads"], sae["mem_mb"], sae["runtime_min"]) == (100.0, 0, 2, 4147, 24)
    assert sae["cpu_s"] == 150.0 and sae["start_up_s"] is None  # no job log: CPU time from the benchmark file
    assert (evaluate["cpu_s"], evaluate["start_up_s"], evaluate["start_s"]) == (9.5, 4.5, 100)  # from its own log
    # 2 cores over 110 s; the SAE held both for 100 s, the evaluation one for 10 s.
    assert main_job.idle_core_seconds(table, cores=2, span_s=110.0) == 220 - 200 - 10
    report = "\n".join(main_job.bounds_report(table, cores=2, span_s=110.0, target_s=60.0))
    assert "160 CPU-seconds over 2 jobs" in report  # 150 + 9.5
    assert "no schedule finishes in under 80 s" in report and "out of reach" in report
    assert "over mem_mb: sae/model=m/layer=3 peaked at 5000 MB against 4147 MB" in report
