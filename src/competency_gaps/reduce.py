"""Stage 5: per (model, layer), the concept × benchmark gap tables from exactly the shards it is given."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from competency_gaps.concepts import (
    GapOptions,
    SaliencyBatches,
    benchmark_table,
    gap_statistics,
    jaccard_overlap,
    missing_percent,
    suite_table,
    summary_markdown,
)
from competency_gaps.figure_data import owned_strings, read_labels
from competency_gaps.tables import unreadable, write_frame, write_json, write_text

log = logging.getLogger(__name__)

SKIP_REASONS = {"too_long": "n_skipped_too_long", "no_counted_tokens": "n_skipped_no_tokens"}
SALIENCY_COLUMNS = ["item_id", "concept", "saliency"]
BATCH_ROWS = 1 << 20
"""Saliency rows read at a time (pyarrow's default row group): tens of MB a batch, whatever the shard's size."""


def benchmark_of(path: str) -> str:
    """The slug of the last `benchmark=<slug>` folder of a shard path. Only that segment is read: hive parsing
    of the whole path would also pick up any `key=value` folder above the results (`/scratch/run=3/…`)."""
    slugs = [part.split("=", 1)[1] for part in Path(path).parts[:-1] if part.startswith("benchmark=")]
    if not slugs:
        raise ValueError(f"shard path has no benchmark=<slug> folder: {path}")
    return slugs[-1]


def check_columns(path: str, columns: list[str]) -> None:
    """Fail with the shard's name when it lacks one of `columns`."""
    absent = [name for name in columns if name not in pl.read_parquet_schema(path)]
    if absent:  # a shard written before the column existed: say which one, not a polars plan dump
        raise ValueError(f"{path} lacks column(s) {absent}: it was written by an older version of the pipeline; "
                         "delete it and rerun the stage that writes it")


def read_shard(path: str, columns: list[str]) -> pl.DataFrame:
    """`columns` of one shard plus its benchmark (from the path) as a literal column."""
    check_columns(path, columns)
    try:
        frame = pl.read_parquet(path, columns=columns, hive_partitioning=False)
    except (pl.exceptions.ComputeError, OSError) as error:  # a damaged data page: the input check reads the footer
        raise unreadable(path, error) from None
    return frame.with_columns(benchmark=pl.lit(benchmark_of(path), pl.String))


def read_shards(paths: list[str], columns: list[str]) -> pl.DataFrame:
    return pl.concat(read_shard(path, columns) for path in paths)


@dataclass(frozen=True)
class ShardBatches:
    """One benchmark's saliency rows (SALIENCY_COLUMNS), read from its shards BATCH_ROWS at a time and anew on
    every iteration: the reducer holds one batch, never a whole shard."""

    paths: tuple[str, ...]

    def __iter__(self) -> Iterator[pl.DataFrame]:
        for path in self.paths:
            for batch in _record_batches(path, SALIENCY_COLUMNS):
                yield pl.from_arrow(batch)


def keyed_batches(paths: list[str]) -> Iterator[pl.DataFrame]:
    """Every shard's saliency rows (SALIENCY_COLUMNS), BATCH_ROWS at a time, each batch with its benchmark."""
    for path in paths:
        check_columns(path, SALIENCY_COLUMNS)
        for batch in ShardBatches((path,)):
            yield batch.with_columns(benchmark=pl.lit(benchmark_of(path), pl.String))


def saliency_of_pairs(paths: list[str], pairs: pl.DataFrame) -> pl.DataFrame:
    """The saliency rows of the given (benchmark, item_id, concept) pairs, read a batch at a time, so only
    those rows are held."""
    wanted = pairs.select(pl.col("benchmark").cast(pl.String), pl.col("item_id").cast(pl.String),
                          pl.col("concept").cast(pl.Int32)).unique()
    found = [batch.join(wanted, on=["benchmark", "item_id", "concept"], how="semi").with_columns(owned_strings("item_id"))
             for batch in keyed_batches(paths)]
    return pl.concat(found) if found else pl.DataFrame(
        schema={"item_id": pl.String, "concept": pl.Int32, "saliency": pl.Float32, "benchmark": pl.String})


def _record_batches(path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`columns` of a Parquet file, BATCH_ROWS rows at a time; a damaged data page (the input check reads only the
    footer) raises the error that names the file."""
    try:
        with pq.ParquetFile(path) as shard:
            yield from shard.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise unreadable(path, error) from None


def saliency_batches(paths: list[str]) -> dict[str, SaliencyBatches]:
    """benchmark (from each path's `benchmark=` folder) -> its shards' rows in batches; columns checked now, so a
    stale shard fails before the long computation."""
    by_benchmark: dict[str, list[str]] = {}
    for path in paths:
        check_columns(path, SALIENCY_COLUMNS)
        by_benchmark.setdefault(benchmark_of(path), []).append(path)
    return {benchmark: ShardBatches(tuple(shards)) for benchmark, shards in by_benchmark.items()}


def _check_every_item_has_tokens(items: pl.DataFrame) -> None:
    """Extraction writes one item_tokens row per item; an item without one means scores and extraction ran
    on different item sets, and counting it either way would be silently wrong."""
    missing = items.filter(pl.col("has_tokens").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise ValueError(f"{missing.height} scored item(s) have no item_tokens row, e.g. {first['benchmark']}/"
                         f"{first['item_id']}: rerun extraction for that benchmark")


def load_items(token_paths: list[str], score_paths: list[str]) -> pl.DataFrame:
    """Every evaluated item with its score, cut_off, truncated, skipped (null or the reason) and `extracted`
    (skipped is null); skipped items have no saliency and count in no χ."""
    tokens = read_shards(token_paths, ["item_id", "truncated", "skipped"]).with_columns(has_tokens=pl.lit(True))
    scores = read_shards(score_paths, ["item_id", "score", "cut_off"])
    items = scores.join(tokens, on=["benchmark", "item_id"], how="left")
    _check_every_item_has_tokens(items)
    return items.drop("has_tokens").with_columns(extracted=pl.col("skipped").is_null())


def benchmark_overview(concept_benchmark: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Per benchmark handed to the reducer (also those with no extracted item: covered/missing % null there):
    items evaluated and extracted, skips by reason, truncations, mean score over the analysed items (p̄_b, the
    benchmark prior behind chi_model_prior / chi_model_adjusted, computed from the same items by the gap
    tables), and the share of generated responses cut off at max_new_tokens."""
    extracted = pl.col("extracted")
    counts = items.group_by("benchmark").agg(
        n_items=pl.len().cast(pl.Int64),
        n_extracted=extracted.sum().cast(pl.Int64),
        n_skipped=(~extracted).sum().cast(pl.Int64),
        **{column: (pl.col("skipped") == reason).sum().cast(pl.Int64) for reason, column in SKIP_REASONS.items()},
        # Only items that were read (truncated) count here; a too-long skipped item is counted as skipped.
        n_truncated=(pl.col("truncated") & extracted).sum().cast(pl.Int64),
        mean_score=pl.col("score").filter(extracted).mean(),
        n_scored=pl.col("score").filter(extracted).is_not_null().sum().cast(pl.Int64),
        n_generated=pl.col("cut_off").is_not_null().sum().cast(pl.Int64),
        n_cut_off=pl.col("cut_off").sum().cast(pl.Int64),
    ).with_columns(
        cut_off_share=pl.when(pl.col("n_generated") > 0).then(pl.col("n_cut_off") / pl.col("n_generated"))
    )
    coverage = missing_percent(concept_benchmark).drop("n_items")  # n_items there counts extracted items only
    return counts.join(coverage, on="benchmark", how="left").sort("benchmark")


def context_note(overview: pl.DataFrame) -> str:
    """Say how many prompts were longer than max_length (truncated or skipped by the context policy)."""
    affected = overview.filter((pl.col("n_truncated") > 0) | (pl.col("n_skipped_too_long") > 0))
    if affected.is_empty():
        return ""
    parts = [f"{row['benchmark']}: {row['n_truncated']} truncated, {row['n_skipped_too_long']} skipped"
             for row in affected.iter_rows(named=True)]
    return f"**Prompts longer than max_length** — {'; '.join(parts)}.\n\n"


def no_tokens_note(overview: pl.DataFrame) -> str:
    """Say which items were skipped because none of their own text survived masking."""
    affected = overview.filter(pl.col("n_skipped_no_tokens") > 0)
    if affected.is_empty():
        return ""
    parts = [f"{row['benchmark']}: {row['n_skipped_no_tokens']}" for row in affected.iter_rows(named=True)]
    return f"**Items skipped with no counted tokens** (none of the item's own text survived masking) — {'; '.join(parts)}.\n\n"


def all_skipped_note(overview: pl.DataFrame) -> str:
    """Warn about benchmarks with no extracted item: they are absent from every χ table."""
    lines = [
        f"**Benchmark {row['benchmark']} had all {row['n_items']} items skipped ({row['n_skipped_too_long']} too "
        f"long, {row['n_skipped_no_tokens']} with no counted tokens) and counts in no χ.**\n\n"
        for row in overview.filter(pl.col("n_extracted") == 0).iter_rows(named=True)
    ]
    return "".join(lines)


def cut_off_note(overview: pl.DataFrame) -> str:
    """One line per benchmark whose generated responses hit max_new_tokens (a cut-off answer may score 0)."""
    affected = overview.filter(pl.col("n_cut_off") > 0)
    if affected.is_empty():
        return ""
    lines = [f"- {row['benchmark']}: {row['n_cut_off']} of {row['n_generated']} responses hit max_new_tokens"
             for row in affected.iter_rows(named=True)]
    return "**Responses cut off at max_new_tokens** (their scores may be too low):\n\n" + "\n".join(lines) + "\n\n"


def coverage_only_note(items: pl.DataFrame) -> str:
    """Say which benchmarks have no per-item scores: their concepts get χ_bench but χ_model is N/A."""
    unscored = items.group_by("benchmark").agg(pl.col("score").is_null().all().alias("unscored")).filter("unscored")
    if unscored.is_empty():
        return ""
    names = ", ".join(sorted(unscored["benchmark"].to_list()))
    return f"**Coverage only** (no scorer available, χ_model N/A, never imputed): {names}.\n\n"


def before_heading(markdown: str, heading: str, section: str) -> str:
    """`markdown` with `section` placed just before its line `heading` (appended when there is none)."""
    marker = f"\n{heading}\n"
    if marker not in markdown:
        return markdown + "\n" + section
    head, tail = markdown.split(marker, 1)
    return f"{head}\n{section}{marker}{tail}"


def robustness_section(stability_path: str | Path | None, validity_path: str | Path | None) -> str:
    """The robustness checks' headline numbers for summary.md (empty without their JSON summaries)."""
    if not stability_path or not validity_path:
        return ""
    from competency_gaps.robustness import robustness_findings

    return robustness_findings(json.loads(Path(stability_path).read_text()), json.loads(Path(validity_path).read_text()))


def run_reduce(saliency_paths: list[str], token_paths: list[str], score_paths: list[str], n_concepts: int,
               gaps: dict[str, Any], out_dir: Path, title: str, labels_path: str | Path | None = None,
               stability_path: str | Path | None = None, validity_path: str | Path | None = None) -> None:
    """Everything the analysis depends on comes from `gaps` (its own seed included), so changing the global
    seed does not touch these tables. stability_path/validity_path (the robustness checks' JSON summaries) add
    their headline numbers to summary.md. The benchmark means p̄_b of the adjusted and shrunk chi_model come from
    `items` (the extracted items with their scores), the same items every χ is computed on. labels_path (the
    labels stage's labels.parquet) only names the concepts in summary.md; no table changes with it."""
    options = GapOptions(**gaps)
    labels = read_labels(labels_path)  # first: a bad labels file fails before the long computation
    saliency = saliency_batches(saliency_paths)
    evaluated = load_items(token_paths, score_paths)
    items = evaluated.filter("extracted").select("benchmark", "item_id", "score")
    statistics = gap_statistics(saliency, items, n_concepts, options)  # one pass over the rows, batch by batch
    per_benchmark = benchmark_table(statistics, options)
    suite, thresholds = suite_table(statistics, per_benchmark, options)
    overview = benchmark_overview(per_benchmark, evaluated)
    write_frame(per_benchmark, out_dir / "concept_benchmark.parquet")
    write_frame(suite, out_dir / "concepts.parquet")
    write_frame(overview, out_dir / "benchmarks.parquet")
    write_frame(jaccard_overlap(per_benchmark), out_dir / "overlap.parquet")
    write_json(thresholds, out_dir / "thresholds.json")
    notes = (all_skipped_note(overview) + coverage_only_note(items) + context_note(overview)
             + no_tokens_note(overview) + cut_off_note(overview))
    findings = summary_markdown(suite, per_benchmark, thresholds, labels=labels)
    # The robustness numbers close the findings, before the counts and thresholds.
    findings = before_heading(findings, "## Concepts", robustness_section(stability_path, validity_path))
    write_text(f"# {title}\n\n{notes}" + findings, out_dir / "summary.md")
    log.info("reduced %d benchmarks × %d concepts; ranking %s, shrinkage strength κ = %s",
             per_benchmark["benchmark"].n_unique(), n_concepts, thresholds["ranking"], thresholds["shrinkage_strength"])
