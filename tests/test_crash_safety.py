"""Crash safety end to end: `kill -9` of running jobs, damaged shards and two Snakemakes on one results folder.

Jobs are paused at known points by tests/crash_hook/sitecustomize.py (a test-only start-up hook put on the jobs'
PYTHONPATH; the package has no test branches), then killed from here with SIGKILL. Every rerun is the same
`snakemake` command, and every table must equal that of an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, SHARED_BENCHMARKS, TRAINING_TEXT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="../shared/benchmarks not present"),
]

HOOK_DIR = Path(__file__).resolve().parent / "crash_hook"
# A hang guard, not a timing assertion: a pause point that is never reached fails the test instead of hanging CI.
GUARD_S = 600

# Where each stage's job is paused: mid-job, after real work and before (or between) its outputs.
KILL_POINTS = [
    # evaluation: every item scored, nothing written yet
    {"stage": "evaluate", "target": "competency_gaps.evaluate:evaluate_items", "after_calls": 1},
    # SAE training: after the third optimiser step of sae-lens's trainer
    {"stage": "sae", "target": "sae_lens.training.sae_trainer:SAETrainer._train_step", "after_calls": 3},
    # extraction: after the first batch of prompts went through the model and the SAE
    {"stage": "extract", "target": "competency_gaps.saliency:batch_saliency", "after_calls": 1},
    # reduce: the first of its six outputs is in place, the others are not
    {"stage": "reduce", "target": "competency_gaps.tables:write_frame", "after_calls": 1},
]
COMPARED_SUFFIXES = {".parquet", ".json", ".md", ".safetensors"}
UNCOMPARED_FOLDERS = {"logs", "benchmarks_runtime"}  # wall times and memory differ from run to run


def crash_config(tiny_model_dir: Path, folder: Path) -> dict:
    """One tiny model whose SAE is trained by the pipeline (so training can be killed), one generated-answer benchmark."""
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"{number}. {text}" for number in range(40) for text in TRAINING_TEXT) + "\n")
    return {
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "batch_size": 4, "layers": [{"layer": 1, "sae": {
            "train": {"d_sae": 64, "k": 4, "training_tokens": 1000, "batch_size": 100, "heldout_tokens": 100}}}]}},
        "benchmarks": {"gsm8k": {"adapter": "gsm8k", "data_dir": str(SHARED_BENCHMARKS / "gsm8k"), "limit": 4,
                                 "max_new_tokens": 6}},
        "sae_corpus": {"sae_probes_package": None, "text_files": [str(corpus)], "context_length": 16},
        "labels": {"corpus_tokens": 300, "negative_pool": 20},
        "gaps": {"min_benchmarks": 1, "min_support": 1, "n_bootstrap": 30},
        "device": "cpu",
        "threads": 1,
    }


# The gap tables are the target: every stage that can be killed feeds them (figures and robustness only read them).
# The reducer's table and the robustness summary it quotes: a job that fails on a damaged shard loses its outputs,
# so whichever of the two reads the shard first, the rerun has a missing target to rebuild from the fixed shard.
TARGETS = ["results/concepts/model=tiny/layer=1/concepts.parquet", "results/robustness/model=tiny/layer=1/stability.json"]


def snakemake_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *TARGETS]


def job_environment(pause_dir: Path | None = None, points: list[dict] | None = None) -> dict[str, str]:
    """This checkout's src first (as the rules put it), then the hook, then what was there; pause points only when given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(HOOK_DIR), os.environ.get("PYTHONPATH")]))
    env.pop("COMPETENCY_GAPS_PAUSE_POINTS", None)
    if points is not None:
        env["COMPETENCY_GAPS_PAUSE_POINTS"] = json.dumps(points)
        env["COMPETENCY_GAPS_PAUSE_DIR"] = str(pause_dir)
    return env


def run_snakemake(workdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir), capture_output=True, text=True, cwd=REPO, env=env or job_environment())


def start_snakemake(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    with (workdir / "snakemake.out").open("w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(snakemake_command(workdir), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def tail(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()[-4000:]


def paused_pid(pause_dir: Path, stage: str, snakemake: subprocess.Popen, workdir: Path) -> int:
    """Wait until `stage`'s job is paused at its point; its pid."""
    marker = pause_dir / f"{stage}.pid"
    deadline = time.monotonic() + GUARD_S
    while not marker.exists():
        if snakemake.poll() is not None:
            pytest.fail(f"snakemake ended (rc {snakemake.returncode}) before the {stage} job paused:\n{tail(workdir)}")
        if time.monotonic() > deadline:
            snakemake.kill()
            pytest.fail(f"the {stage} job never reached its pause point:\n{tail(workdir)}")
        time.sleep(0.2)
    return int(marker.read_text())


def kill_paused_jobs_until_done(workdir: Path, pause_dir: Path, env: dict[str, str]) -> list[str]:
    """Run the same snakemake command again and again; SIGKILL every job that pauses. The stages killed, in order."""
    killed: list[str] = []
    for _attempt in range(len(KILL_POINTS) + 1):
        snakemake = start_snakemake(workdir, env)
        deadline = time.monotonic() + GUARD_S
        while snakemake.poll() is None:
            for point in KILL_POINTS:
                marker = pause_dir / f"{point['stage']}.pid"
                if point["stage"] not in killed and marker.exists():
                    os.kill(int(marker.read_text()), signal.SIGKILL)
                    killed.append(point["stage"])
            if time.monotonic() > deadline:
                snakemake.kill()
                pytest.fail(f"snakemake did not finish:\n{tail(workdir)}")
            time.sleep(0.2)
        if snakemake.returncode == 0:
            return killed
        assert "Error in rule" in tail(workdir), tail(workdir)  # it failed because a job was killed, nothing else
    pytest.fail(f"still failing after every stage was killed once:\n{tail(workdir)}")


def result_files(workdir: Path) -> dict[str, Path]:
    results = workdir / "results"
    return {str(path.relative_to(results)): path for path in sorted(results.rglob("*"))
            if path.is_file() and path.relative_to(results).parts[0] not in UNCOMPARED_FOLDERS}


def assert_same_tables(workdir: Path, reference: Path) -> None:
    """Every result file of `workdir` exists in `reference` and vice versa; tables, JSON, text and SAE weights are
    identical (Parquet compared as tables, NaN equal to NaN, JSON as data; the rest byte for byte)."""
    ours, theirs = result_files(workdir), result_files(reference)
    assert sorted(ours) == sorted(theirs)
    compared = 0
    for name, path in ours.items():
        if path.suffix not in COMPARED_SUFFIXES:
            continue
        if path.suffix == ".parquet":
            left, right = pl.read_parquet(path), pl.read_parquet(theirs[name])
            assert left.schema == right.schema, name
            assert left.equals(right, null_equal=True), name
        elif path.suffix == ".json":  # sae-lens writes cfg.json keys in no fixed order
            assert json.loads(path.read_text()) == json.loads(theirs[name].read_text()), name
        else:
            assert path.read_bytes() == theirs[name].read_bytes(), name
        compared += 1
    assert compared >= 20


@pytest.fixture(scope="module")
def config(tiny_model_dir, tmp_path_factory) -> dict:
    return crash_config(tiny_model_dir, tmp_path_factory.mktemp("crash-corpus"))


def new_workdir(tmp_path_factory, name: str, config: dict) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config) -> Path:
    """An uninterrupted run of the config."""
    workdir = new_workdir(tmp_path_factory, "uninterrupted", config)
    run = run_snakemake(workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir


def copy_of(reference: Path, tmp_path_factory, name: str) -> Path:
    """A finished run's working directory (results and Snakemake's metadata), times kept."""
    workdir = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(reference, workdir, symlinks=True)
    return workdir


def test_kill_9_during_evaluation_sae_training_extraction_and_reduce(tmp_path_factory, config, reference):
    workdir = new_workdir(tmp_path_factory, "killed", config)
    pause_dir = tmp_path_factory.mktemp("pauses")
    killed = kill_paused_jobs_until_done(workdir, pause_dir, job_environment(pause_dir, KILL_POINTS))
    assert sorted(killed) == sorted(point["stage"] for point in KILL_POINTS)
    assert not list((workdir / "results").rglob("*.partial"))
    assert_same_tables(workdir, reference)


def test_second_snakemake_is_refused_by_the_lock_and_the_first_finishes(tmp_path_factory, reference):
    workdir = copy_of(reference, tmp_path_factory, "locked")
    for path in (workdir / "results/concepts").rglob("*"):  # the first run redoes the reducer and what follows
        if path.is_file():
            path.unlink()
    pause_dir = tmp_path_factory.mktemp("lock-pause")
    reduce_pause = [{"stage": "reduce", "target": "competency_gaps.tables:write_frame", "after_calls": 1}]
    first = start_snakemake(workdir, job_environment(pause_dir, reduce_pause))
    paused_pid(pause_dir, "reduce", first, workdir)
    written = (workdir / "results/concepts/model=tiny/layer=1/concept_benchmark.parquet").read_bytes()

    second = run_snakemake(workdir)

    assert second.returncode != 0
    assert "cannot be locked" in second.stdout + second.stderr
    assert first.poll() is None  # still running, its partial output untouched
    assert (workdir / "results/concepts/model=tiny/layer=1/concept_benchmark.parquet").read_bytes() == written
    (pause_dir / "reduce.release").touch()
    assert first.wait(timeout=GUARD_S) == 0, tail(workdir)
    assert_same_tables(workdir, reference)


def test_a_truncated_shard_stops_its_readers_until_rebuilt(tmp_path_factory, reference):
    workdir = copy_of(reference, tmp_path_factory, "truncated")
    relative = "results/extract/model=tiny/benchmark=gsm8k/layer=1/saliency.parquet"
    shard = workdir / relative
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # an interrupted copy, a full disk
    concepts = workdir / "results/concepts/model=tiny/layer=1/concepts.parquet"
    before = concepts.read_bytes()

    damaged = run_snakemake(workdir)

    assert damaged.returncode != 0
    # The first job to read the shard stops naming it (robustness runs before the reducer, which quotes it).
    logs = "".join(path.read_text() for path in (workdir / "results/logs").rglob("*.log"))
    assert f"{relative}: not a readable Parquet file" in logs and "delete it and rerun" in logs
    assert concepts.read_bytes() == before  # nothing built on it
    shard.unlink()  # what the message says to do
    rebuilt = run_snakemake(workdir)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert_same_tables(workdir, reference)
