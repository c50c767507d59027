"""Stage 5: per (model, layer), the concept × benchmark gap tables from exactly the shards it is given."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from competency_gaps.concepts import (
    GapOptions,
    concept_benchmark_table,
    concept_suite_table,
    jaccard_overlap,
    missing_percent,
    summary_markdown,
)
from competency_gaps.tables import write_frame, write_json, write_text

log = logging.getLogger(__name__)

# Shard paths are hive-style (…/model=M/benchmark=B/layer=L/file.parquet); the benchmark comes from the path.
HIVE_SCHEMA = {"model": pl.String, "benchmark": pl.String, "layer": pl.Int64}


def scan_shards(paths: list[str]) -> pl.LazyFrame:
    return pl.scan_parquet(paths, hive_partitioning=True, hive_schema=HIVE_SCHEMA)


def load_inputs(saliency_paths: list[str], token_paths: list[str], score_paths: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Saliency rows, and the item universe (items extraction kept) with their scores."""
    saliency = scan_shards(saliency_paths).select("benchmark", "item_id", "concept", "saliency").collect()
    tokens = scan_shards(token_paths).select("benchmark", "item_id").collect()
    scores = (
        pl.scan_parquet(score_paths, hive_partitioning=True, hive_schema={"model": pl.String, "benchmark": pl.String})
        .select("benchmark", "item_id", "score")
        .collect()
    )
    items = tokens.join(scores, on=["benchmark", "item_id"], how="left")
    return saliency, items


def benchmark_overview(concept_benchmark: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    accuracy = items.group_by("benchmark").agg(pl.col("score").mean().alias("mean_score"),
                                               pl.col("score").is_not_null().sum().alias("n_scored"))
    return missing_percent(concept_benchmark).join(accuracy, on="benchmark", how="left").sort("benchmark")


def coverage_only_note(items: pl.DataFrame) -> str:
    """Say which benchmarks have no per-item scores: their concepts get χ_bench but χ_model is N/A."""
    unscored = items.group_by("benchmark").agg(pl.col("score").is_null().all().alias("unscored")).filter("unscored")
    if unscored.is_empty():
        return ""
    names = ", ".join(sorted(unscored["benchmark"].to_list()))
    return f"**Coverage only** (no scorer available, χ_model N/A, never imputed): {names}.\n\n"


def run_reduce(saliency_paths: list[str], token_paths: list[str], score_paths: list[str], n_concepts: int,
               gaps: dict[str, Any], seed: int, out_dir: Path, title: str) -> None:
    options = GapOptions(**{**gaps, "seed": seed})
    saliency, items = load_inputs(saliency_paths, token_paths, score_paths)
    per_benchmark = concept_benchmark_table(saliency, items, n_concepts, options)
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, n_concepts, options)
    write_frame(per_benchmark, out_dir / "concept_benchmark.parquet")
    write_frame(suite, out_dir / "concepts.parquet")
    write_frame(benchmark_overview(per_benchmark, items), out_dir / "benchmarks.parquet")
    write_frame(jaccard_overlap(per_benchmark), out_dir / "overlap.parquet")
    write_json(thresholds, out_dir / "thresholds.json")
    write_text(f"# {title}\n\n" + coverage_only_note(items) + summary_markdown(suite, per_benchmark, thresholds),
               out_dir / "summary.md")
    log.info("reduced %d benchmarks × %d concepts", per_benchmark["benchmark"].n_unique(), n_concepts)
