"""The reducer reads exactly the hive-style shards it is given and says which benchmarks are coverage-only."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from competency_gaps.reduce import run_reduce
from competency_gaps.tables import ITEM_TOKENS, SALIENCY, SCORES, table_from_rows, write_parquet

GAPS = {"epsilon": 0.0, "under_percentile": 5, "over_percentile": 99, "pooling": "pooled", "min_benchmarks": 1,
        "min_support": 1, "n_bootstrap": 0, "ci_level": 0.95}


def write_benchmark(root: Path, benchmark: str, saliency: dict, scores: dict, skipped: tuple = (),
                    truncated: tuple = ()) -> tuple[str, str, str]:
    shard_dir = root / f"extract/model=m/benchmark={benchmark}/layer=3"
    rows = [{"item_id": i, "concept": c, "saliency": s, "max_activation": s, "active_tokens": 1}
            for (i, c), s in saliency.items()]
    write_parquet(pl.DataFrame(rows).to_arrow(), shard_dir / "saliency.parquet", SALIENCY)
    tokens = [{"item_id": i, "counted_tokens": 5, "total_tokens": 9, "truncated": i in truncated}
              for i in scores if i not in skipped]
    write_parquet(pl.DataFrame(tokens).to_arrow(), shard_dir / "item_tokens.parquet", ITEM_TOKENS)
    score_path = root / f"evaluate/model=m/benchmark={benchmark}/scores.parquet"
    score_rows = [{"item_id": i, "scoring": "x", "score": p} for i, p in scores.items()]
    write_parquet(table_from_rows(score_rows, SCORES), score_path, SCORES)
    return str(shard_dir / "saliency.parquet"), str(shard_dir / "item_tokens.parquet"), str(score_path)


def test_reducer_uses_only_given_shards_and_flags_coverage_only(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 2.0, ("a2", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    v = write_benchmark(tmp_path, "v", {("v1", 1): 3.0}, {"v1": None})
    write_benchmark(tmp_path, "stale", {("s1", 2): 9.0}, {"s1": 1.0})  # on disk, but not handed over
    out = tmp_path / "concepts"
    out.mkdir()
    run_reduce([a[0], v[0]], [a[1], v[1]], [a[2], v[2]], n_concepts=3, gaps=GAPS, seed=0, out_dir=out, title="t")

    table = pl.read_parquet(out / "concept_benchmark.parquet")
    assert sorted(table["benchmark"].unique()) == ["a", "v"]
    a0 = table.filter((pl.col("benchmark") == "a") & (pl.col("concept") == 0)).row(0, named=True)
    # χ_model = (2·1 + 1·0) / (2 + 1); χ_bench = 3 · K / total saliency of a = 3 · 3 / 4.
    assert a0["chi_model"] == pytest.approx(2 / 3)
    assert a0["chi_bench"] == pytest.approx(9 / 4)
    assert table.filter(pl.col("benchmark") == "v")["chi_model"].null_count() == 3
    assert table.filter(pl.col("concept") == 2)["missing"].all(), "the stale shard leaked in"
    summary = (out / "summary.md").read_text()
    assert "Coverage only" in summary and ": v." in summary
    assert json.loads((out / "thresholds.json").read_text())["n_concepts"] == 3


def test_skipped_items_count_nowhere_and_context_policy_counts_are_reported(tmp_path):
    paths = write_benchmark(tmp_path, "a", {("a1", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0, "a3": 1.0},
                            skipped=("a3",), truncated=("a2",))
    out = tmp_path / "concepts"
    out.mkdir()
    run_reduce([paths[0]], [paths[1]], [paths[2]], n_concepts=2, gaps=GAPS, seed=0, out_dir=out, title="t")
    overview = pl.read_parquet(out / "benchmarks.parquet").row(0, named=True)
    assert (overview["n_items"], overview["n_truncated"], overview["n_skipped"]) == (2, 1, 1)
    assert overview["mean_score"] == pytest.approx(0.5)  # a3 was skipped: not part of the analysis
    assert "a: 1 truncated, 1 skipped" in (out / "summary.md").read_text()
