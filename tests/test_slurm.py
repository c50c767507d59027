"""SLURM end to end: the tiny workflow submitted through profiles/slurm to a single-node cluster on this machine
(scripts/local-slurm.sh). Every job goes through sbatch with its resources, a bad item and an out-of-memory kill
are reported with their logs, a rerun retries only what failed, and the tables equal those of a local run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from conftest import REPO, SHARED_BENCHMARKS, TRAINING_TEXT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("slurmctld") is None,
                       reason="slurmctld not installed (scripts/local-slurm.sh start installs it, as root)"),
    pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="../shared/benchmarks not present"),
]

LOCAL_SLURM = REPO / "scripts" / "local-slurm.sh"
# The per-item shards of both benchmarks: items, scores, saliency (the jobs that run the model and the SAE). The
# reducers after them are functions of these tables; stopping here keeps the test within a few minutes.
TARGETS = [f"results/{stage}/model=tiny/benchmark={benchmark}/{table}" for benchmark in ("gsm8k", "bad")
           for stage, table in (("evaluate", "scores.parquet"), ("extract", "layer=1/saliency.parquet"))]
BAD_ITEM = '{"question": "An item without its answer field"}\n'


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started for these tests unless it was running already (then left running)."""
    was_running = subprocess.run([LOCAL_SLURM, "status"], capture_output=True).returncode == 0
    start = subprocess.run([LOCAL_SLURM, "start"], capture_output=True, text=True)
    assert start.returncode == 0, start.stdout + start.stderr
    yield
    if not was_running:
        subprocess.run([LOCAL_SLURM, "stop"], check=True)


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True)


def on_cluster(workdir: Path, *args: str, targets: list[str] = TARGETS) -> subprocess.CompletedProcess:
    # Targets first: options like --set-resources take every value that follows them.
    # The plugin's first status check comes 40 s after a submission by default (kind to a busy slurmctld).
    return snakemake(workdir, *targets, "--profile", str(REPO / "profiles" / "slurm"),
                     "--slurm-init-seconds-before-status-checks", "2", *args)


def job_stats(out: str) -> dict[str, int]:
    table = out.split("Job stats:")[1].split("\n\n")[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M) if rule != "total"}


def submitted_jobs(out: str) -> list[dict]:
    """Each cluster job of a run: its rule, the resources Snakemake gave it and the SLURM job id it got."""
    out = re.sub(r"^Logfile .*:\n(=+)\n.*?\n\1$", "", out, flags=re.M | re.S)  # failed jobs' logs, shown
    blocks = {}
    for match in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", out, flags=re.M):
        body = match.group(2)
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", body).group(1)))
        threads = re.search(r"threads: (\d+)", body)
        blocks[re.search(r"jobid: (\d+)", body).group(1)] = {
            "rule": match.group(1), "mem_mb": int(resources["mem_mb"]), "runtime": int(resources["runtime"]),
            "threads": int(threads.group(1)) if threads else 1}
    ids = dict(re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", out, flags=re.M))
    assert set(ids) == set(blocks), "every job must be submitted with sbatch"
    return [{**blocks[job], "slurm_id": slurm_id} for job, slurm_id in ids.items()]


def sacct(slurm_ids: list[str]) -> dict[str, dict]:
    fields = ["JobID", "State", "ReqMem", "ReqCPUS", "Timelimit", "ReqTRES"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", ",".join(fields), "-j", ",".join(slurm_ids)],
                         capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines()]
    return {row["JobID"]: row for row in rows}


def write_config(workdir: Path, config: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def config(tiny_model_dir, random_sae_dirs, tmp_path_factory) -> dict:
    """Two benchmarks; the second is a copy of GSM8K whose file gets a bad item for the first run."""
    data = tmp_path_factory.mktemp("data")
    for name in ("gsm8k", "bad"):
        shutil.copytree(SHARED_BENCHMARKS / "gsm8k", data / name)
    (data / "corpus.txt").write_text("\n\n".join(TRAINING_TEXT * 3) + "\n")
    return {
        "device": "cpu",
        "threads": 1,  # two jobs at a time on a 2-core node
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "batch_size": 4,
                            "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
        "benchmarks": {name: {"adapter": "gsm8k", "data_dir": str(data / name), "limit": 3, "max_new_tokens": 6}
                       for name in ("gsm8k", "bad")},
        "sae_corpus": {"sae_probes_package": None, "text_files": [str(data / "corpus.txt")], "context_length": 16},
        "gaps": {"min_benchmarks": 1, "min_support": 1, "n_bootstrap": 30},
    }


@pytest.fixture(scope="module")
def runs(cluster, config, tmp_path_factory) -> dict:
    """A first cluster run with a bad item and evaluate jobs given too little memory, then the rerun once the
    item is fixed and the memory is back to what the rule asks; and the same config run locally."""
    workdir = tmp_path_factory.mktemp("cluster")
    write_config(workdir, config)
    data_file = Path(config["benchmarks"]["bad"]["data_dir"]) / "test.jsonl"
    good_data = data_file.read_text()
    data_file.write_text(good_data + BAD_ITEM)
    failed = on_cluster(workdir, "--set-resources", "evaluate:mem_mb=200")
    data_file.write_text(good_data)
    rerun = on_cluster(workdir)
    local = tmp_path_factory.mktemp("local")
    write_config(local, config)
    local_run = snakemake(local, *TARGETS, "--cores", "2")
    assert local_run.returncode == 0, local_run.stdout[-3000:] + local_run.stderr[-3000:]
    return {"workdir": workdir, "failed": failed, "rerun": rerun, "local": local,
            "bad_line": len(good_data.splitlines()) + 1}


def test_failed_jobs_are_reported_with_their_logs(runs):
    failed = runs["failed"]
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    errors = {match.group(1): match.group(2) for match in
              re.finditer(r"^Error in rule (\w+):\n((?:    .*\n)+)", out, flags=re.M)}
    assert set(errors) == {"prepare_benchmark", "evaluate"}
    # The bad item: the rule's log names the file and line, and Snakemake shows that log (show-failed-logs).
    assert "results/logs/prepare/benchmark=bad.log" in errors["prepare_benchmark"]
    assert f"test.jsonl, line {runs['bad_line']}, field 'answer'" in out
    # The out-of-memory kill: SLURM's own log of the job says why.
    assert "benchmark=gsm8k" in errors["evaluate"]
    slurm_log = re.search(r"(\S+/slurm_logs/rule_evaluate/\S+\.log)", errors["evaluate"]).group(1)
    assert "exceeded memory limit" in Path(slurm_log).read_text()
    jobs = submitted_jobs(out)
    states = sacct([job["slurm_id"] for job in jobs])
    failed_on_slurm = sorted(job["rule"] for job in jobs if states[job["slurm_id"]]["State"] != "COMPLETED")
    assert failed_on_slurm == ["evaluate", "prepare_benchmark"]
    # keep-going (profiles/slurm): independent jobs finished despite the failures.
    assert (runs["workdir"] / "results/extract/model=tiny/benchmark=gsm8k/layer=1/saliency.parquet").is_file()


def test_the_rerun_retries_only_what_failed(runs):
    assert runs["rerun"].returncode == 0, runs["rerun"].stdout[-3000:] + runs["rerun"].stderr[-3000:]
    # The bad benchmark's chain (it never got past prepare) and the killed evaluation; not the model, the SAE,
    # nor the good benchmark's preparation and extraction.
    assert job_stats(runs["rerun"].stdout + runs["rerun"].stderr) == {"prepare_benchmark": 1, "evaluate": 2, "extract": 1}


def test_every_job_reaches_slurm_with_its_resources(runs):
    jobs = [job for run in ("failed", "rerun") for job in submitted_jobs(runs[run].stdout + runs[run].stderr)]
    accounted = sacct([job["slurm_id"] for job in jobs])
    for job in jobs:
        row = accounted[job["slurm_id"]]
        assert row["ReqMem"] == f"{job['mem_mb']}M", (job, row)
        assert int(row["ReqCPUS"]) == job["threads"], (job, row)
        hours, minutes = divmod(job["runtime"], 60)
        assert row["Timelimit"] == f"{hours:02d}:{minutes:02d}:00", (job, row)
        assert "gpu" not in row["ReqTRES"], (job, row)  # device: cpu
    assert {row["State"] for row in accounted.values()} <= {"COMPLETED", "FAILED", "OUT_OF_MEMORY"}


def test_cluster_tables_equal_a_local_run(runs):
    cluster, local = runs["workdir"] / "results", runs["local"] / "results"
    tables = sorted(path.relative_to(cluster) for path in cluster.rglob("*.parquet"))
    assert tables == sorted(path.relative_to(local) for path in local.rglob("*.parquet"))
    assert len(tables) == 10  # items, scores, saliency, item tokens and contexts of both benchmarks
    for table in tables:
        assert_frame_equal(pl.read_parquet(cluster / table), pl.read_parquet(local / table), check_exact=True)


def test_a_cuda_config_asks_slurm_for_a_gpu(runs, config, tmp_path):
    """device: cuda: the evaluation's sbatch asks for one GPU, which this GPU-less cluster refuses at submission."""
    workdir = tmp_path / "cuda"
    shutil.copytree(runs["workdir"], workdir)  # a finished run: only the evaluation reruns, for the new device
    write_config(workdir, {**config, "device": "cuda"})
    run = on_cluster(workdir, targets=["results/evaluate/model=tiny/benchmark=gsm8k/scores.parquet"])
    out = run.stdout + run.stderr
    assert run.returncode != 0
    calls = re.findall(r"sbatch call:\n\s+(sbatch .*)", out)
    assert calls and all("--gpus=1" in call for call in calls), out[-3000:]
