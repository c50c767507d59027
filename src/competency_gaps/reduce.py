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
    """Saliency rows, and every evaluated item with its score and whether extraction kept (`extracted`) or
    truncated it; items a `skip` context policy left out are not extracted and count in no χ."""
    saliency = scan_shards(saliency_paths).select("benchmark", "item_id", "concept", "saliency").collect()
    tokens = scan_shards(token_paths).select("benchmark", "item_id", "truncated").collect()
    scores = (
        pl.scan_parquet(score_paths, hive_partitioning=True, hive_schema={"model": pl.String, "benchmark": pl.String})
        .select("benchmark", "item_id", "score")
        .collect()
    )
    items = scores.join(tokens, on=["benchmark", "item_id"], how="left").with_columns(
        pl.col("truncated").is_not_null().alias("extracted")
    )
    return saliency, items


def benchmark_overview(concept_benchmark: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Per benchmark: missing %, mean score over scored items, and the context-policy counts."""
    counts = items.group_by("benchmark").agg(
        pl.col("score").filter("extracted").mean().alias("mean_score"),
        pl.col("score").filter("extracted").is_not_null().sum().alias("n_scored"),
        pl.col("truncated").sum().alias("n_truncated"),
        (~pl.col("extracted")).sum().alias("n_skipped"),
    )
    return missing_percent(concept_benchmark).join(counts, on="benchmark", how="left").sort("benchmark")


def context_note(overview: pl.DataFrame) -> str:
    """Say how many prompts were longer than max_length (truncated or skipped by the context policy)."""
    affected = overview.filter((pl.col("n_truncated") > 0) | (pl.col("n_skipped") > 0))
    if affected.is_empty():
        return ""
    parts = [f"{row['benchmark']}: {row['n_truncated']} truncated, {row['n_skipped']} skipped" for row in affected.iter_rows(named=True)]
    return f"**Prompts longer than max_length** — {'; '.join(parts)}.\n\n"


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
    saliency, evaluated = load_inputs(saliency_paths, token_paths, score_paths)
    items = evaluated.filter("extracted").select("benchmark", "item_id", "score")
    per_benchmark = concept_benchmark_table(saliency, items, n_concepts, options)
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, n_concepts, options)
    overview = benchmark_overview(per_benchmark, evaluated)
    write_frame(per_benchmark, out_dir / "concept_benchmark.parquet")
    write_frame(suite, out_dir / "concepts.parquet")
    write_frame(overview, out_dir / "benchmarks.parquet")
    write_frame(jaccard_overlap(per_benchmark), out_dir / "overlap.parquet")
    write_json(thresholds, out_dir / "thresholds.json")
    notes = coverage_only_note(items) + context_note(overview)
    write_text(f"# {title}\n\n{notes}" + summary_markdown(suite, per_benchmark, thresholds), out_dir / "summary.md")
    log.info("reduced %d benchmarks × %d concepts", per_benchmark["benchmark"].n_unique(), n_concepts)
