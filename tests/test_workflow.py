"""End to end: `snakemake` on a tiny random model, random SAEs and tiny benchmark slices; incremental dry runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, SHARED_BENCHMARKS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="../shared/benchmarks not present"),
]

BENCHMARKS = {
    "gsm8k": {"adapter": "gsm8k", "data_dir": str(SHARED_BENCHMARKS / "gsm8k"), "limit": 3, "max_new_tokens": 6},
    "social_iqa": {"adapter": "social_iqa", "data_dir": str(SHARED_BENCHMARKS / "social_iqa"), "limit": 4},
    "bbq": {"adapter": "bbq", "data_dir": str(SHARED_BENCHMARKS / "bbq"), "limit": 4, "seed": 1},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Job counts per rule of a dry run (the 'Job stats' table)."""
    out = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("Reasons:")[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M) if rule != "total"}


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def gsm8k_copy(tmp_path_factory) -> Path:
    """GSM8K's data in a folder the tests may touch (../shared stays untouched)."""
    folder = tmp_path_factory.mktemp("data") / "gsm8k"
    shutil.copytree(SHARED_BENCHMARKS / "gsm8k", folder)
    return folder


def tiny_corpus(folder: Path) -> dict:
    """A small text file as the SAE corpus (the labels stage reads corpus contexts from it), as config keys."""
    from conftest import TRAINING_TEXT

    path = folder / "corpus.txt"
    path.write_text("\n\n".join(TRAINING_TEXT * 3) + "\n")
    return {"sae_corpus": {"sae_probes_package": None, "text_files": [str(path)], "context_length": 16},
            "labels": {"corpus_tokens": 300, "negative_pool": 20}}


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory) -> dict:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base_config(tiny_model_dir, random_sae_dirs, gsm8k_copy, corpus_config) -> dict:
    return {
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "batch_size": 4,
                            "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
        "benchmarks": {**BENCHMARKS, "gsm8k": {**BENCHMARKS["gsm8k"], "data_dir": str(gsm8k_copy)}},
        **corpus_config,
        "gaps": {"min_benchmarks": 1, "min_support": 1, "n_bootstrap": 30},
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_config) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    write_config(workdir, base_config)
    snakemake(workdir)
    return workdir


def test_outputs_have_the_expected_shape_and_values(finished_run, random_sae_dirs):
    out = finished_run / "results" / "concepts" / "model=tiny" / "layer=1"
    n_concepts = json.loads((random_sae_dirs[1] / "cfg.json").read_text())["d_sae"]
    table = pl.read_parquet(out / "concept_benchmark.parquet")
    assert table.height == n_concepts * len(BENCHMARKS)
    assert {"concept", "benchmark", "chi_bench", "chi_model", "support", "ess", "missing"} <= set(table.columns)
    # χ_bench is normalised per benchmark so its mean over concepts is 1.
    means = table.group_by("benchmark").agg(pl.col("chi_bench").mean())
    assert means["chi_bench"].to_list() == pytest.approx([1.0] * len(BENCHMARKS))
    # N/A exactly where the concept never fires; otherwise a weighted mean of p_i in [0, 1].
    assert table.filter(pl.col("support") == 0)["chi_model"].null_count() == table.filter(pl.col("support") == 0).height
    assert table["chi_model"].drop_nulls().is_between(0, 1).all()
    assert (table["missing"] == (table["chi_bench"] == 0)).all()
    suite = pl.read_parquet(out / "concepts.parquet")
    assert suite.height == n_concepts
    assert set(suite["classification"].unique()) <= {"missing", "under", "normal", "over"}
    summary = (out / "summary.md").read_text()
    assert all(name in summary for name in BENCHMARKS)


def test_the_sae_quality_reads_every_benchmark(finished_run):
    quality = json.loads((finished_run / "results/sae/model=tiny/layer=1/quality.json").read_text())
    assert quality["corpus"] is None  # a pretrained SAE: no held-out corpus figures of its own
    assert set(quality["benchmarks"]) == set(BENCHMARKS) | {"all"}
    assert quality["benchmarks"]["all"]["tokens"] == sum(quality["benchmarks"][name]["tokens"] for name in BENCHMARKS) > 0


def test_chi_values_match_a_recomputation_from_the_shards(finished_run, random_sae_dirs):
    """Recompute χ_bench and χ_model for every (concept, benchmark) straight from the extraction shards and scores."""
    results = finished_run / "results"
    n_concepts = json.loads((random_sae_dirs[1] / "cfg.json").read_text())["d_sae"]
    table = pl.read_parquet(results / "concepts/model=tiny/layer=1/concept_benchmark.parquet")
    for benchmark in BENCHMARKS:
        shard = pl.read_parquet(results / f"extract/model=tiny/benchmark={benchmark}/layer=1/saliency.parquet")
        scores = pl.read_parquet(results / f"evaluate/model=tiny/benchmark={benchmark}/scores.parquet")
        joined = shard.join(scores.select("item_id", "score"), on="item_id")
        per_concept = joined.group_by("concept").agg(
            (pl.col("saliency").sum() * n_concepts / shard["saliency"].sum()).alias("chi_bench_expected"),
            ((pl.col("saliency") * pl.col("score")).sum() / pl.col("saliency").sum()).alias("chi_model_expected"),
            pl.len().alias("support_expected"),
        )
        got = table.filter(pl.col("benchmark") == benchmark).join(per_concept, on="concept")
        assert got.height == per_concept.height > 0
        assert got["chi_bench"].to_list() == pytest.approx(got["chi_bench_expected"].to_list(), rel=1e-4)
        assert got["chi_model"].to_list() == pytest.approx(got["chi_model_expected"].to_list(), rel=1e-4, abs=1e-9)
        assert got["support"].to_list() == got["support_expected"].to_list()


def test_every_item_is_scored_in_range(finished_run):
    for benchmark, spec in BENCHMARKS.items():
        scores = pl.read_parquet(finished_run / f"results/evaluate/model=tiny/benchmark={benchmark}/scores.parquet")
        assert scores.height == spec["limit"]
        assert scores["score"].is_between(0, 1).all()
        assert scores["response"].null_count() == 0


def test_rerun_is_a_no_op(finished_run):
    assert planned_jobs(finished_run) == {}


@contextmanager
def edited(workdir: Path, base_config: dict, change):
    """Write a changed copy of the config for the duration of the block, then restore the base config."""
    config = json.loads(json.dumps(base_config))
    change(config)
    write_config(workdir, config)
    try:
        yield
    finally:
        write_config(workdir, base_config)


@contextmanager
def appended(path: Path, text: str):
    """Edit `path` (Snakemake compares checksums, so a mere touch is no edit), then restore it exactly."""
    before, stat = path.read_bytes(), path.stat()
    path.write_bytes(before + text.encode())
    try:
        yield
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# Every (model, layer) analysis reads all shards: a changed shard reruns the reducer, the robustness checks
# and the figures; a changed extraction also the labels (they merge every shard's top contexts).
ANALYSES = {"reduce_concepts": 1, "robustness": 1, "figures": 1, "explorer": 1, "explorer_index": 1, "all": 1}
EXTRACTED = {"labels": 1, **ANALYSES}
# Each SAE's quality is measured on every benchmark's items: a changed benchmark reruns that measurement too.
DOWNSTREAM_OF_ONE = {"prepare_benchmark": 1, "evaluate": 1, "extract": 1, "sae_quality": 1, **EXTRACTED}


def test_editing_the_prompt_templates_reruns_every_benchmark(finished_run):
    from competency_gaps.templates import TEMPLATES_FILE

    n = len(BENCHMARKS)
    with appended(TEMPLATES_FILE, "\n# an edit\n"):
        assert planned_jobs(finished_run) == {"prepare_benchmark": n, "evaluate": n, "extract": n, "sae_quality": 1,
                                              **EXTRACTED}


def test_editing_a_data_file_reruns_only_that_benchmark(finished_run, gsm8k_copy):
    with appended(gsm8k_copy / "test.jsonl", "\n"):  # a blank line: the items stay the same, the file changed
        assert planned_jobs(finished_run) == DOWNSTREAM_OF_ONE


def test_throughput_settings_rerun_nothing(finished_run, base_config):
    def faster(config):
        config["models"]["tiny"].update(batch_size=2, generation_batch_size=3)
        config.update(threads=1, benchmark_threads=2)

    with edited(finished_run, base_config, faster):
        assert planned_jobs(finished_run) == {}


def test_the_gap_seed_reruns_only_the_reducer(finished_run, base_config):
    with edited(finished_run, base_config, lambda config: config["gaps"].update(seed=5)):
        assert planned_jobs(finished_run) == {"reduce_concepts": 1, "figures": 1, "explorer": 1, "explorer_index": 1,
                                              "all": 1}


def dry_run_jobs(workdir: Path, *args: str) -> dict[str, str]:
    """Rule name -> the text of its first job block in a dry run."""
    out = snakemake(workdir, "-n", *args).stdout
    return {match.group(1): match.group(0) for match in re.finditer(r"^rule (\w+):\n(?:    .*\n)+", out, flags=re.M)}


def test_gpu_resources_and_threads_follow_the_job(finished_run, base_config):
    """cuda: model jobs ask for a GPU; copying a pretrained SAE asks for neither a GPU nor many threads; the
    per-benchmark model jobs and the labels' corpus pass take `benchmark_threads`, the once-per-layer ones
    `threads`."""
    with edited(finished_run, base_config, lambda config: config.update(device="cuda", threads=2, benchmark_threads=3)):
        jobs = dry_run_jobs(finished_run, "--forceall", "--cores", "4")
    assert "gpu=1" in jobs["evaluate"] and "gpu=1" in jobs["extract"]
    assert "gpu=0" in jobs["sae"] and "threads:" not in jobs["sae"]  # a dry run prints threads only when > 1
    assert "threads: 3" in jobs["evaluate"] and "threads: 3" in jobs["extract"]
    assert "threads: 2" in jobs["labels"]
    assert "threads: 3" in jobs["corpus_contexts"] and "gpu=1" in jobs["corpus_contexts"]  # an extraction-like pass
    assert re.search(r"mem_mb=\d+", jobs["evaluate"])


def test_sae_training_goes_first_and_long_jobs_lead(finished_run):
    """Scheduling priorities, as a dry run plans them: the SAE above the evaluations that could start in its place
    on 2 cores; then evaluations scored by decoding (GSM8K), then those scored by log-likelihood and the corpus
    pass, and the short jobs (extraction, the concept map) last."""
    out = snakemake(finished_run, "-n", "--forceall").stdout
    priority = {}
    for rule, body in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", out, flags=re.M):
        benchmark = re.search(r"benchmark=(\w+)", body)
        stated = re.search(r"priority: (\d+)", body)  # a dry run states a priority only when it is not 0
        priority[rule, benchmark.group(1) if benchmark else None] = int(stated.group(1)) if stated else 0
    assert priority["sae", None] > 2 * priority["evaluate", "gsm8k"]
    assert priority["evaluate", "gsm8k"] > priority["evaluate", "bbq"]
    assert priority["evaluate", "bbq"] == priority["evaluate", "social_iqa"] == priority["corpus_contexts", None]
    assert priority["corpus_contexts", None] > priority["extract", "gsm8k"] == priority["concept_map", None] == 0


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="snakemake-executor-plugin-slurm is not installed")
def test_the_slurm_profile_parses_without_a_core_count(finished_run):
    """A cluster run has no --cores: the rules must not ask for workflow.cores (it raises there)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(finished_run),
               "--profile", str(REPO / "profiles" / "slurm")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_adding_a_benchmark_schedules_only_its_jobs_and_the_reducer(finished_run, base_config):
    config = json.loads(json.dumps(base_config))
    config["benchmarks"]["gsm8k_more"] = {**BENCHMARKS["gsm8k"], "limit": 2, "seed": 7}
    write_config(finished_run, config)
    try:
        assert planned_jobs(finished_run) == DOWNSTREAM_OF_ONE
    finally:
        write_config(finished_run, base_config)


def test_adding_a_layer_schedules_only_its_sae_extractions_and_reducer(finished_run, base_config, random_sae_dirs):
    config = json.loads(json.dumps(base_config))
    config["models"]["tiny"]["layers"].append({"layer": 2, "sae": {"path": str(random_sae_dirs[2])}})
    write_config(finished_run, config)
    try:
        assert planned_jobs(finished_run) == {"sae": 1, "sae_quality": 1, "concept_map": 1, "corpus_contexts": 1,
                                              "extract": len(BENCHMARKS), **EXTRACTED}
    finally:
        write_config(finished_run, base_config)


def test_imported_scores_reproduce_the_computed_chi_model(finished_run, base_config):
    """Scores brought in as an lm-evaluation-harness --log_samples file give the same χ tables as computing them."""
    results = finished_run / "results"
    computed = pl.read_parquet(results / "concepts/model=tiny/layer=1/concept_benchmark.parquet")
    scores = pl.read_parquet(results / "evaluate/model=tiny/benchmark=gsm8k/scores.parquet")
    samples = finished_run / "samples_gsm8k_2026-01-01T00-00-00.jsonl"
    with samples.open("w") as handle:
        for row in scores.iter_rows(named=True):
            doc_id = int(row["item_id"].split("-")[1])  # our GSM8K ids are the 0-based line of the test split
            handle.write(json.dumps({"doc_id": doc_id, "doc": {}, "target": "", "arguments": [], "resps": [[row["response"]]],
                                     "filtered_resps": [row["prediction"]], "exact_match": row["score"]}) + "\n")
    config = json.loads(json.dumps(base_config))
    config["models"]["tiny"]["scores_from"] = {"gsm8k": {"lm_eval_samples": str(samples), "metric": "exact_match",
                                                         "match": "doc_id", "prefix": "gsm8k-"}}
    write_config(finished_run, config)
    assert planned_jobs(finished_run) == {"evaluate": 1, **ANALYSES}
    snakemake(finished_run)
    imported = pl.read_parquet(results / "concepts/model=tiny/layer=1/concept_benchmark.parquet")
    assert imported["chi_model"].to_list() == pytest.approx(computed["chi_model"].to_list(), nan_ok=True)
    assert imported["chi_bench"].to_list() == pytest.approx(computed["chi_bench"].to_list())
    assert "imported scores" in (results / "logs/evaluate/model=tiny/benchmark=gsm8k.log").read_text()


def test_figures_robustness_and_the_report(finished_run):
    """The leaves of the DAG: every figure (PNG and SVG), the robustness tables, and `snakemake --report`."""
    figures = finished_run / "results/figures/model=tiny/layer=1"
    for stem in ("chi_bench_hist", "chi_bench_per_benchmark", "chi_model_per_benchmark", "chi_model_hist",
                 "missing_percent", "jaccard_overlap", "chi_model_correlation"):
        assert (figures / f"{stem}.png").stat().st_size > 0 and (figures / f"{stem}.svg").stat().st_size > 0
    assert "#" in (figures / "ranked_concepts.md").read_text()
    robustness = finished_run / "results/robustness/model=tiny/layer=1"
    stability = json.loads((robustness / "stability.json").read_text())
    assert stability["n_resamples"] == 100 and stability["paper"] == {"chi_bench_std": 0.025, "chi_model_std": 0.014}
    assert set(json.loads((robustness / "validity.json").read_text())["directions"]) == {"A->B", "B->A"}
    for stem in ("stability", "validity"):
        assert (robustness / f"{stem}.png").stat().st_size > 0 and (robustness / f"{stem}.svg").stat().st_size > 0
    assert "## " in (figures / "wrong_items.md").read_text()
    snakemake(finished_run, "--report", str(finished_run / "report.html"))
    report = (finished_run / "report.html").read_text()
    assert "chi_bench_hist.png" in report and "Gaps" in report
    assert "validity.png" in report and "Robustness" in report


def test_the_explorer_is_built_for_every_model_and_layer(finished_run, random_sae_dirs):
    explorer = finished_run / "results/explorer"
    assert 'href="model=tiny/layer=1/index.html"' in (explorer / "index.html").read_text()
    assert "model=tiny/layer=1/index.html" in (explorer / "sites.js").read_text()
    site = explorer / "model=tiny/layer=1"
    for name in ("index.html", "app.js", "style.css", "data/meta.js", "data/table.js", "data/map.js", "data/item_index.js"):
        assert (site / name).stat().st_size > 0, name
    table = (site / "data/table.js").read_text()
    table = json.loads(table[table.index(",") + 1:table.rindex(")")])
    concepts = pl.read_parquet(finished_run / "results/concepts/model=tiny/layer=1/concepts.parquet")
    assert table["concept"] == sorted(concepts["concept"].to_list())
    assert len(table["per_benchmark"]["model"]) == len(BENCHMARKS)


def test_every_live_concept_is_labelled_and_named_by_its_label(finished_run):
    """The labels stage labels every concept that fires, and the summary and ranked tables show the labels."""
    results = finished_run / "results"
    labels = pl.read_parquet(results / "labels/model=tiny/layer=1/labels.parquet")
    fired = pl.concat([pl.read_parquet(path) for path in results.glob("extract/model=tiny/benchmark=*/layer=1/saliency.parquet")])
    live = labels.filter("live")
    assert set(fired["concept"].unique().to_list()) <= set(live["concept"].to_list())
    assert live["label"].null_count() == 0
    summary = (results / "concepts/model=tiny/layer=1/summary.md").read_text()
    ranked = (results / "figures/model=tiny/layer=1/ranked_concepts.md").read_text()
    from competency_gaps.figure_data import concept_markdown

    named = [concept_markdown(c, dict(live.select("concept", "label").iter_rows())) for c in live["concept"].to_list()]
    assert any(name in summary for name in named) and any(name in ranked for name in named)
    assert "concept_cards.md" in (finished_run / "report.html").read_text()
