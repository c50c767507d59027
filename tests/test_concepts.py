"""Gap maths (concepts.py) on tiny matrices whose values are worked out by hand in the comments."""

from __future__ import annotations

import gc
import re
import weakref

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from competency_gaps.concepts import (
    POOLINGS,
    GapOptions,
    _resample_counts,
    benchmark_table,
    concept_benchmark_table,
    concept_suite_table,
    gap_statistics,
    jaccard_overlap,
    missing_percent,
    suite_table,
    summary_markdown,
)

K = 4
SALIENCY_SCHEMA = {"benchmark": pl.String, "item_id": pl.String, "concept": pl.Int32, "saliency": pl.Float32}
ITEMS_SCHEMA = {"benchmark": pl.String, "item_id": pl.String, "score": pl.Float64}

# Benchmark A: a1 (p=1): c0=2, c1=1 | a2 (p=0): c0=1 | a3 (p=0.5): c1=1, c2=1          total saliency 6
# Benchmark B: b1 (p=0): c0=1      | b2 (p=1): c0=1, c2=2 | b3 (p=1): no saliency row   total saliency 4
# Concept 3 never fires.
SALIENCY_ROWS = [
    ("A", "a1", 0, 2.0), ("A", "a1", 1, 1.0), ("A", "a2", 0, 1.0), ("A", "a3", 1, 1.0), ("A", "a3", 2, 1.0),
    ("B", "b1", 0, 1.0), ("B", "b2", 0, 1.0), ("B", "b2", 2, 2.0),
]
ITEM_ROWS = [("A", "a1", 1.0), ("A", "a2", 0.0), ("A", "a3", 0.5), ("B", "b1", 0.0), ("B", "b2", 1.0), ("B", "b3", 1.0)]


def frames(saliency_rows=SALIENCY_ROWS, item_rows=ITEM_ROWS) -> tuple[pl.DataFrame, pl.DataFrame]:
    saliency = pl.DataFrame(saliency_rows, schema=SALIENCY_SCHEMA, orient="row")
    items = pl.DataFrame(item_rows, schema=ITEMS_SCHEMA, orient="row")
    return saliency, items


def cell(table: pl.DataFrame, benchmark: str, concept: int, column: str):
    return table.filter((pl.col("benchmark") == benchmark) & (pl.col("concept") == concept))[column].item()


def suite_value(suite: pl.DataFrame, concept: int, column: str):
    return suite.filter(pl.col("concept") == concept)[column].item()


NO_BOOT = GapOptions(n_bootstrap=0)


@pytest.fixture
def per_benchmark() -> pl.DataFrame:
    return concept_benchmark_table(*frames(), K, NO_BOOT)


def test_table_is_dense_with_all_concepts(per_benchmark):
    assert per_benchmark.height == K * 2
    assert per_benchmark["concept"].dtype == pl.Int32
    assert per_benchmark.filter(pl.col("benchmark") == "B")["concept"].to_list() == [0, 1, 2, 3]
    # b3 has no saliency but is an item of B.
    assert cell(per_benchmark, "B", 0, "n_items") == 3


def test_chi_bench(per_benchmark):
    # A: sums c0..c3 = 3, 2, 1, 0; chi = sum · K / 6 -> 2, 4/3, 2/3, 0 (mean over concepts 1).
    assert [cell(per_benchmark, "A", c, "chi_bench") for c in range(K)] == pytest.approx([2, 4 / 3, 2 / 3, 0])
    # B: sums 2, 0, 2, 0; chi = sum · 4 / 4 -> 2, 0, 2, 0.
    assert [cell(per_benchmark, "B", c, "chi_bench") for c in range(K)] == pytest.approx([2, 0, 2, 0])
    assert cell(per_benchmark, "A", 0, "sum_saliency") == pytest.approx(3)


def test_chi_model(per_benchmark):
    # A: c0 = (2·1 + 1·0) / 3 = 2/3; c1 = (1·1 + 1·0.5) / 2 = 0.75; c2 = 0.5 (only a3).
    assert cell(per_benchmark, "A", 0, "chi_model") == pytest.approx(2 / 3)
    assert cell(per_benchmark, "A", 1, "chi_model") == pytest.approx(0.75)
    assert cell(per_benchmark, "A", 2, "chi_model") == pytest.approx(0.5)
    # B: c0 = (1·0 + 1·1) / 2 = 0.5; c2 = 2·1 / 2 = 1; c1 never fires in B -> N/A.
    assert cell(per_benchmark, "B", 0, "chi_model") == pytest.approx(0.5)
    assert cell(per_benchmark, "B", 2, "chi_model") == pytest.approx(1.0)
    assert cell(per_benchmark, "B", 1, "chi_model") is None


def test_support_and_ess(per_benchmark):
    # A c0: items a1 (2), a2 (1): support 2, ESS = 3² / (4 + 1) = 1.8; A c1: 2² / (1 + 1) = 2; A c2: 1.
    assert cell(per_benchmark, "A", 0, "support") == 2
    assert cell(per_benchmark, "A", 0, "ess") == pytest.approx(1.8)
    assert cell(per_benchmark, "A", 1, "ess") == pytest.approx(2.0)
    assert cell(per_benchmark, "A", 2, "support") == 1
    assert cell(per_benchmark, "A", 2, "ess") == pytest.approx(1.0)
    assert cell(per_benchmark, "B", 1, "support") == 0
    assert cell(per_benchmark, "B", 1, "ess") is None


def test_concept_that_never_fires(per_benchmark):
    rows = per_benchmark.filter(pl.col("concept") == 3)
    assert rows["chi_bench"].to_list() == [0.0, 0.0]
    assert rows["missing"].to_list() == [True, True]
    assert rows["chi_model"].to_list() == [None, None]
    assert rows["ess"].to_list() == [None, None]
    assert not per_benchmark["chi_model"].is_nan().any()
    assert per_benchmark.filter(~pl.col("missing"))["chi_bench"].min() > 0


def test_unscored_benchmark_has_chi_bench_but_no_chi_model():
    # C (no scorer): c0 = 1 on c1, c3 = 3 on c2; total 4 -> chi_bench c0 = 1, c3 = 3, others 0.
    saliency, items = frames(SALIENCY_ROWS + [("C", "c1", 0, 1.0), ("C", "c2", 3, 3.0)],
                             ITEM_ROWS + [("C", "c1", None), ("C", "c2", None)])
    table = concept_benchmark_table(saliency, items, K, GapOptions(n_bootstrap=20))
    assert [cell(table, "C", c, "chi_bench") for c in range(K)] == pytest.approx([1, 0, 0, 3])
    c_rows = table.filter(pl.col("benchmark") == "C")
    assert c_rows["chi_model"].null_count() == K
    assert c_rows["chi_model_lo"].null_count() == K and c_rows["chi_model_hi"].null_count() == K
    # Unscored items do not enter the pooled suite chi_model: c0 stays (2 + 1) / (3 + 2) = 0.6.
    suite, _ = concept_suite_table(table, saliency, items, K, GapOptions(n_bootstrap=0))
    assert suite_value(suite, 0, "chi_model") == pytest.approx(0.6)
    assert suite_value(suite, 3, "chi_model") is None  # fires only on unscored items
    assert suite_value(suite, 3, "classification") != "missing"


def test_benchmark_without_saliency_is_all_missing():
    saliency, items = frames(item_rows=ITEM_ROWS + [("D", "d1", 1.0)])
    table = concept_benchmark_table(saliency, items, K, NO_BOOT)
    d_rows = table.filter(pl.col("benchmark") == "D")
    assert d_rows["chi_bench"].null_count() == K
    assert d_rows["missing"].all()
    # Null chi_bench of D is excluded from the suite mean: c0 stays (2 + 2) / 2 = 2.
    suite, _ = concept_suite_table(table, saliency, items, K, NO_BOOT)
    assert suite_value(suite, 0, "chi_bench") == pytest.approx(2.0)


def test_saliency_of_unknown_item_is_rejected():
    saliency, items = frames(SALIENCY_ROWS + [("A", "zz", 0, 1.0)])
    with pytest.raises(ValueError, match="missing from `items`"):
        concept_benchmark_table(saliency, items, K, NO_BOOT)


def test_suite_values(per_benchmark):
    saliency, items = frames()
    suite, _ = concept_suite_table(per_benchmark, saliency, items, K, NO_BOOT)
    assert suite["concept"].to_list() == [0, 1, 2, 3]
    # chi_bench = mean over A, B: c0 (2 + 2)/2 = 2; c1 (4/3 + 0)/2 = 2/3; c2 (2/3 + 2)/2 = 4/3; c3 0.
    assert suite["chi_bench"].to_list() == pytest.approx([2, 2 / 3, 4 / 3, 0])
    assert suite["support"].to_list() == [4, 2, 2, 0]
    assert suite["n_benchmarks_active"].to_list() == [2, 1, 2, 0]
    # c0 saliencies 2, 1, 1, 1: ESS = 5² / 7.
    assert suite_value(suite, 0, "ess") == pytest.approx(25 / 7)
    assert suite_value(suite, 3, "ess") is None


def test_pooled_and_mean_pooling_differ(per_benchmark):
    saliency, items = frames()
    pooled, _ = concept_suite_table(per_benchmark, saliency, items, K, GapOptions(n_bootstrap=0, pooling="pooled"))
    mean, _ = concept_suite_table(per_benchmark, saliency, items, K, GapOptions(n_bootstrap=0, pooling="mean"))
    # c0 pooled: (2·1 + 1·0 + 1·0 + 1·1) / (2 + 1 + 1 + 1) = 3/5; mean: (2/3 + 1/2) / 2 = 7/12.
    assert suite_value(pooled, 0, "chi_model") == pytest.approx(0.6)
    assert suite_value(mean, 0, "chi_model") == pytest.approx(7 / 12)
    # c2 pooled: (1·0.5 + 2·1) / (1 + 2) = 5/6; mean: (0.5 + 1) / 2 = 0.75.
    assert suite_value(pooled, 2, "chi_model") == pytest.approx(5 / 6)
    assert suite_value(mean, 2, "chi_model") == pytest.approx(0.75)
    # c1 fires only in A: both read 0.75; c3 never fires: N/A in both.
    assert suite_value(pooled, 1, "chi_model") == suite_value(mean, 1, "chi_model") == pytest.approx(0.75)
    assert suite_value(pooled, 3, "chi_model") is None and suite_value(mean, 3, "chi_model") is None


def test_classification_with_known_percentiles(per_benchmark):
    saliency, items = frames()
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, K, NO_BOOT)
    # Covered chi_bench sorted: 2/3, 4/3, 2 (linear percentiles over 3 values, positions q·2).
    # 5th: 2/3 + 0.1·(2/3) = 11/15; 99th: 4/3 + 0.98·(2/3).
    assert thresholds["under_threshold"] == pytest.approx(11 / 15)
    assert thresholds["over_threshold"] == pytest.approx(4 / 3 + 0.98 * 2 / 3)
    assert suite["classification"].to_list() == ["over", "under", "normal", "missing"]
    assert thresholds["epsilon"] == 0.0 and thresholds["pooling"] == "pooled"


def test_epsilon_moves_low_concepts_to_missing(per_benchmark):
    saliency, items = frames()
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, K, GapOptions(n_bootstrap=0, epsilon=0.7))
    # c1 (2/3 <= 0.7) is now missing; covered 4/3, 2: 5th = 4/3 + 0.05·(2/3) -> c2 (4/3) is under.
    assert thresholds["under_threshold"] == pytest.approx(4 / 3 + 0.05 * 2 / 3)
    assert suite["classification"].to_list() == ["over", "missing", "under", "missing"]


def test_support_filter(per_benchmark):
    saliency, items = frames()
    options = GapOptions(n_bootstrap=0, min_benchmarks=2, min_support=3)
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, K, options)
    # Only c0 fires in 2 benchmarks on >= 3 items (c2: 2 benchmarks but 2 items).
    assert suite["passes_support_filter"].to_list() == [True, False, False, False]
    assert thresholds["min_benchmarks"] == 2 and thresholds["min_support"] == 3


def test_missing_percent(per_benchmark):
    result = missing_percent(per_benchmark)
    # A covers {0, 1, 2}: 100·(1 − 3/4) = 25; B covers {0, 2}: 50.
    assert result["benchmark"].to_list() == ["A", "B"]
    assert result["covered"].to_list() == [3, 2]
    assert result["n_items"].to_list() == [3, 3]
    assert result["missing_percent"].to_list() == pytest.approx([25.0, 50.0])


def test_jaccard(per_benchmark):
    result = jaccard_overlap(per_benchmark)
    pairs = {(r["benchmark_a"], r["benchmark_b"]): r["jaccard"] for r in result.iter_rows(named=True)}
    # {0, 1, 2} vs {0, 2}: |∩| = 2, |∪| = 3.
    assert pairs[("A", "B")] == pytest.approx(2 / 3)
    assert pairs[("B", "A")] == pytest.approx(2 / 3)
    assert pairs[("A", "A")] == pytest.approx(1.0)
    assert result.filter(pl.col("benchmark_a") == "A", pl.col("benchmark_b") == "B")["n_union"].item() == 3


# ----------------------------------------------------------------------------------------------- bootstrap


def random_frames(seed: int = 1, n_items: int = 40, n_concepts: int = 6) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two benchmarks; concept 5 fires only on items scored 1 (so its chi_model has no spread)."""
    rng = np.random.default_rng(seed)
    saliency, items = [], []
    for benchmark in ("A", "B"):
        for i in range(n_items):
            item = f"{benchmark}{i}"
            score = 1.0 if i % 4 == 0 else float(rng.random())
            items.append((benchmark, item, score))
            for concept in range(n_concepts - 1):
                if rng.random() < 0.6:
                    saliency.append((benchmark, item, concept, float(rng.random()) + 0.1))
            if score == 1.0:
                saliency.append((benchmark, item, n_concepts - 1, float(rng.random()) + 0.1))
    return frames(saliency, items)


def test_bootstrap_interval_contains_estimate():
    saliency, items = random_frames()
    options = GapOptions(n_bootstrap=200, seed=3)
    table = concept_benchmark_table(saliency, items, 6, options)
    assert table["chi_model_lo"].null_count() == 0
    assert (table["chi_model_lo"] <= table["chi_model"]).all() and (table["chi_model"] <= table["chi_model_hi"]).all()
    assert (table["chi_model_hi"] - table["chi_model_lo"]).filter(table["concept"] < 5).min() > 0
    for pooling in ("pooled", "mean"):
        suite, _ = concept_suite_table(table, saliency, items, 6, GapOptions(n_bootstrap=200, seed=3, pooling=pooling))
        assert (suite["chi_model_lo"] <= suite["chi_model"]).all()
        assert (suite["chi_model"] <= suite["chi_model_hi"]).all()
        assert (suite["chi_model_hi"] - suite["chi_model_lo"]).filter(suite["concept"] < 5).min() > 0


def test_bootstrap_is_deterministic_for_a_seed():
    saliency, items = random_frames()
    first = concept_benchmark_table(saliency, items, 6, GapOptions(n_bootstrap=50, seed=7))
    again = concept_benchmark_table(saliency, items, 6, GapOptions(n_bootstrap=50, seed=7))
    other = concept_benchmark_table(saliency, items, 6, GapOptions(n_bootstrap=50, seed=8))
    assert first.equals(again)
    assert not first["chi_model_lo"].equals(other["chi_model_lo"])


def test_bootstrap_constant_score_gives_degenerate_interval():
    saliency, items = random_frames()
    options = GapOptions(n_bootstrap=100)
    table = concept_benchmark_table(saliency, items, 6, options)
    five = table.filter(pl.col("concept") == 5)
    assert five["chi_model"].to_list() == pytest.approx([1.0, 1.0])
    assert five["chi_model_lo"].to_list() == pytest.approx([1.0, 1.0])
    assert five["chi_model_hi"].to_list() == pytest.approx([1.0, 1.0])
    suite, _ = concept_suite_table(table, saliency, items, 6, options)
    assert [suite_value(suite, 5, c) for c in ("chi_model_lo", "chi_model", "chi_model_hi")] == pytest.approx([1, 1, 1])


def test_bootstrap_matches_a_naive_loop():
    """The sparse-matmul replicates equal Σ w·s·p / Σ w·s computed item by item with the same draws."""
    saliency, items = random_frames(n_items=12)
    # min_ci_support=1: 12 items give concepts < 10 supporting items, and this checks the replicates' maths.
    options = GapOptions(n_bootstrap=40, seed=5, ci_level=0.9, min_ci_support=1)
    table = concept_benchmark_table(saliency, items, 6, options)
    a_items = items.filter(pl.col("benchmark") == "A")
    counts = _resample_counts(a_items.height, options, "A")  # (items, n_boot), items in `items` order
    dense = np.zeros((a_items.height, 6))
    index = {item: i for i, item in enumerate(a_items["item_id"])}
    for row in saliency.filter(pl.col("benchmark") == "A").iter_rows(named=True):
        dense[index[row["item_id"]], row["concept"]] = row["saliency"]
    scores = a_items["score"].to_numpy()
    ratios = (counts.T @ (dense * scores[:, None])) / (counts.T @ dense)  # (n_boot, concepts)
    expected_lo = np.nanquantile(ratios, 0.05, axis=0)
    expected_hi = np.nanquantile(ratios, 0.95, axis=0)
    a_rows = table.filter(pl.col("benchmark") == "A").sort("concept")
    assert a_rows["chi_model_lo"].to_numpy() == pytest.approx(expected_lo)
    assert a_rows["chi_model_hi"].to_numpy() == pytest.approx(expected_hi)


def test_bootstrap_disabled_gives_null_intervals(per_benchmark):
    assert per_benchmark["chi_model_lo"].null_count() == per_benchmark.height
    saliency, items = frames()
    suite, _ = concept_suite_table(per_benchmark, saliency, items, K, NO_BOOT)
    assert suite["chi_model_hi"].null_count() == K


# ------------------------------------------------------------------------------------------- options, text


@pytest.mark.parametrize(
    "bad",
    [{"pooling": "median"}, {"ci_level": 1.0}, {"under_percentile": 50, "over_percentile": 10},
     {"epsilon": -1.0}, {"n_bootstrap": -1}, {"min_support": 0}, {"min_ci_support": 0}, {"min_ci_support": 2.5},
     {"seed": -1}],
)
def test_options_are_validated(bad):
    with pytest.raises(ValueError):
        GapOptions(**bad)


def test_summary_markdown(per_benchmark):
    saliency, items = frames()
    options = GapOptions(n_bootstrap=0, min_benchmarks=2, min_support=3)
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, K, options)
    text = summary_markdown(suite, per_benchmark, thresholds, top_n=2)
    assert "4 concepts" in text
    assert "Missing from the whole suite (chi_bench ≤ ε = 0.0): 1 " in text
    assert "| A | 3 | 3 | 25.00 |" in text and "| B | 3 | 2 | 50.00 |" in text
    assert "Among the 1 concepts passing the support filter" in text
    assert "| 0 | 0.600 |" in text  # the only concept that passes
    assert "| under_threshold | " in text
    # Lowest covered chi_bench: c1 (2/3), then c2 (4/3).
    benchmark_gaps = text.split("## Benchmark gaps")[1]
    assert benchmark_gaps.index("| 1 | 0.6667") < benchmark_gaps.index("| 2 | 1.3333")


def test_summary_markdown_falls_back_when_no_concept_passes(per_benchmark):
    saliency, items = frames()
    options = GapOptions(n_bootstrap=0, ranking="point")  # min_support 50
    suite, thresholds = concept_suite_table(per_benchmark, saliency, items, K, options)
    text = summary_markdown(suite, per_benchmark, thresholds)
    assert "No concept passes the support filter" in text
    assert "falling back to all 3 concepts with scored support > 0" in text
    worst = text.split("### Model gaps")[1].split("###")[0]
    assert worst.startswith(": lowest 3 by chi_model")
    # Lowest chi_model first (gaps.ranking = point): c0 0.6, c1 0.75, c2 0.833.
    assert worst.index("| 0 | 0.600") < worst.index("| 1 | 0.750") < worst.index("| 2 | 0.833")


# ------------------------------------------------------------------------- scored support, CI support gate

# C has no scorer (coverage only): c1 fires on c1 (1) and c2 (1), c2 fires on c1 (2).
COVERAGE_ONLY_SALIENCY = SALIENCY_ROWS + [("C", "c1", 1, 1.0), ("C", "c2", 1, 1.0), ("C", "c1", 2, 2.0)]
COVERAGE_ONLY_ITEMS = ITEM_ROWS + [("C", "c1", None), ("C", "c2", None)]


def coverage_only_tables(options: GapOptions) -> tuple[pl.DataFrame, pl.DataFrame]:
    saliency, items = frames(COVERAGE_ONLY_SALIENCY, COVERAGE_ONLY_ITEMS)
    table = concept_benchmark_table(saliency, items, K, options)
    suite, _ = concept_suite_table(table, saliency, items, K, options)
    return table, suite


def test_scored_support_and_ess_ignore_unscored_items():
    table, suite = coverage_only_tables(NO_BOOT)
    # Per benchmark: C is coverage only, so nothing there is scored; A c1: a1 (1), a3 (1) -> ESS 2² / 2 = 2.
    assert cell(table, "C", 1, "support") == 2 and cell(table, "C", 1, "scored_support") == 0
    assert cell(table, "C", 1, "ess") == pytest.approx(2.0) and cell(table, "C", 1, "scored_ess") is None
    assert cell(table, "A", 1, "scored_support") == 2 and cell(table, "A", 1, "scored_ess") == pytest.approx(2.0)
    # Suite, coverage columns unchanged: c1 fires on 4 items in A and C (ESS 4² / 4 = 4).
    assert suite["support"].to_list() == [4, 4, 3, 0]
    assert suite["n_benchmarks_active"].to_list() == [2, 2, 3, 0]
    assert suite_value(suite, 1, "ess") == pytest.approx(4.0)
    # Scored: c1 only a1, a3 (A); c2 a3 (1, A) and b2 (2, B): ESS (1 + 2)² / (1 + 4) = 1.8.
    assert suite["scored_support"].to_list() == [4, 2, 2, 0]
    assert suite["n_benchmarks_scored"].to_list() == [2, 1, 2, 0]
    assert suite_value(suite, 1, "scored_ess") == pytest.approx(2.0)
    assert suite_value(suite, 2, "scored_ess") == pytest.approx(1.8)
    assert suite_value(suite, 0, "scored_ess") == pytest.approx(25 / 7)  # all of c0's items are scored
    assert suite_value(suite, 3, "scored_ess") is None


def test_support_filter_counts_only_scored_items():
    # On coverage c1 (2 benchmarks, 4 items) and c2 (3, 3) would pass; scored they have (1, 2) and (2, 2).
    _, suite = coverage_only_tables(GapOptions(n_bootstrap=0, min_benchmarks=2, min_support=3))
    assert suite["passes_support_filter"].to_list() == [True, False, False, False]


def test_summary_ranking_shows_scored_support():
    options = GapOptions(n_bootstrap=0, min_benchmarks=1, min_support=1)
    table, suite = coverage_only_tables(options)
    _, thresholds = concept_suite_table(table, *frames(COVERAGE_ONLY_SALIENCY, COVERAGE_ONLY_ITEMS), K, options)
    text = summary_markdown(suite, table, thresholds)
    ranking = text.split("## chi_model ranking")[1].split("## Benchmark gaps")[0]
    header = ("| concept | chi_model | 95% CI | shrunk adj. | shrunk | adjusted | scored support | scored benchmarks "
              "| scored ESS |")
    assert header in ranking
    # c1: chi_model 0.75, 2 scored items in 1 benchmark, scored ESS 2 (coverage would read 4 | 2 | 4.0). Its
    # prior is A's mean 0.5 (adjusted 0.25); three rated concepts spread no more than noise: κ = KAPPA_MAX, so
    # shrunk = prior and shrunk adjusted ≈ 0.
    assert "| 1 | 0.750 | [N/A, N/A] | 0.000 | 0.500 | 0.250 | 2 | 1 | 2.0 |" in ranking


def ci_support_frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    """One benchmark of 10 scored items (scores alternate 0, 1) and 5 unscored ones. c0 fires on 1 scored item,
    c1 on 9 scored items (and all 5 unscored: coverage support 14), c2 on all 10 scored items."""
    items = [("A", f"s{i}", float(i % 2)) for i in range(10)] + [("A", f"u{i}", None) for i in range(5)]
    saliency = [("A", "s0", 0, 1.0)]
    saliency += [("A", f"s{i}", 1, 1.0 + i) for i in range(9)] + [("A", f"u{i}", 1, 1.0) for i in range(5)]
    saliency += [("A", f"s{i}", 2, 1.0 + i) for i in range(10)]
    return frames(saliency, items)


def test_no_interval_below_min_ci_support():
    saliency, items = ci_support_frames()
    options = GapOptions(n_bootstrap=50)  # min_ci_support defaults to 10
    table = concept_benchmark_table(saliency, items, 3, options)
    suite, thresholds = concept_suite_table(table, saliency, items, 3, options)
    assert options.min_ci_support == 10 and thresholds["min_ci_support"] == 10
    for frame in (table, suite):
        assert frame["scored_support"].to_list() == [1, 9, 10]
        assert frame["chi_model"].null_count() == 0  # the estimate itself is always reported
        assert frame["chi_model_lo"].to_list()[:2] == [None, None]  # 1 and 9 scored items: no interval
        assert frame["chi_model_hi"].to_list()[:2] == [None, None]
        lo, chi, hi = (frame[c][2] for c in ("chi_model_lo", "chi_model", "chi_model_hi"))
        assert lo is not None and hi is not None and lo <= chi <= hi and lo < hi
    # Lowering the option restores the intervals (c0's single item gives [0, 0], the reason for the gate).
    table = concept_benchmark_table(saliency, items, 3, GapOptions(n_bootstrap=50, min_ci_support=1))
    assert table["chi_model_lo"].null_count() == 0
    assert (table["chi_model_lo"][0], table["chi_model_hi"][0]) == (0.0, 0.0)


def test_most_missing_concepts_per_benchmark_by_hand():
    """a misses concepts 1, 2, 3 (suite chi_bench 2.0, 0.5, 2.0) and b misses 0 and 4 (4 never fires anywhere):
    a's list is 1 and 3 (2.0, ties by concept) then 2; b's is 0 only (a never-firing concept is no finding)."""
    from competency_gaps.concepts import most_missing_per_benchmark

    suite = pl.DataFrame({"concept": [0, 1, 2, 3, 4], "chi_bench": [1.5, 2.0, 0.5, 2.0, 0.0],
                          "n_benchmarks_active": [1, 1, 1, 1, 0]}, schema_overrides={"concept": pl.Int32})
    missing = {"a": [False, True, True, True, True], "b": [True, False, False, False, True]}
    table = pl.DataFrame([{"benchmark": b, "concept": c, "missing": m} for b, flags in missing.items()
                          for c, m in enumerate(flags)])
    top = most_missing_per_benchmark(suite, table, n=2)
    assert top.select("benchmark", "concept").rows() == [("a", 1), ("a", 3), ("b", 0)]
    assert most_missing_per_benchmark(suite, table, n=5).filter(pl.col("benchmark") == "a")["concept"].to_list() == [1, 3, 2]


def test_summary_leads_with_the_findings():
    options = GapOptions(n_bootstrap=0, min_benchmarks=1, min_support=1)
    table, suite = coverage_only_tables(options)
    _, thresholds = concept_suite_table(table, *frames(COVERAGE_ONLY_SALIENCY, COVERAGE_ONLY_ITEMS), K, options)
    text = summary_markdown(suite, table, thresholds)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## chi_model ranking" and headings[1].startswith("## Benchmark gaps")
    assert headings[2].startswith("## What each benchmark misses") and headings[-1] == "## Thresholds"


# ------------------------------------------------------------------------- labels in the summary

NASTY = "carry | borrow\nin `sums` <script>alert(1)</script>"


def table_widths(text: str) -> list[list[int]]:
    """Per Markdown table in `text`, the cell count of every row (pipes a backslash escapes do not split)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(len(re.split(r"(?<!\\)\|", line.strip())) - 2)
        elif current:
            tables, current = tables + [current], []
    return tables


def test_summary_names_concepts_with_their_labels(tmp_path):
    from competency_gaps.figure_data import concept_markdown, read_labels
    from competency_gaps.tables import LABELS, table_from_rows, write_parquet

    # Concept 3 never fires: a null label, shown by id alone.
    rows = [{"concept": c, "live": c < 3, "label": label, "label_source": "heuristic" if label else None,
             "detection_score": float("nan"), "n_detection": 0}
            for c, label in enumerate([f"zero {NASTY}", "one | x", "two " + "long " * 20, None])]
    write_parquet(table_from_rows(rows, LABELS), tmp_path / "labels.parquet", LABELS)
    labels = read_labels(tmp_path / "labels.parquet")
    assert sorted(labels) == [0, 1, 2]
    options = GapOptions(n_bootstrap=0, min_benchmarks=1, min_support=1)
    per_benchmark = concept_benchmark_table(*frames(), K, options)
    suite, thresholds = concept_suite_table(per_benchmark, *frames(), K, options)
    text = summary_markdown(suite, per_benchmark, thresholds, labels=labels)
    plain = summary_markdown(suite, per_benchmark, thresholds)

    ranking = text.split("## chi_model ranking")[1].split("## Benchmark gaps")[0]
    for c in (0, 1, 2):  # all three rated concepts, weakest and strongest lists
        assert ranking.count(f"| {concept_markdown(c, labels)} | ") == 2
    assert f"| #0 zero carry \\| borrow in \\`sums\\` \\<script\\>alert(1)\\</script\\> | " in ranking
    benchmark_gaps = text.split("## Benchmark gaps")[1].split("## What each")[0]
    assert f"| #1 one \\| x | 0.6667 |" in benchmark_gaps  # the lowest covered chi_bench: c1
    assert "| #2 two long long" in benchmark_gaps and "…" in benchmark_gaps  # a long label is cut
    misses = text.split("## What each benchmark misses")[1].split("## Concepts")[0]
    assert "| B | #1 one \\| x (" in misses  # B never evokes c1
    assert "<script>" not in text and "\n in" not in text
    assert table_widths(text) == table_widths(plain)  # labels add no cell, break no row
    assert all(len(set(widths)) == 1 for widths in table_widths(text))
    assert "| 0 | " in plain and "zero" not in plain  # without labels: ids only


# ------------------------------------------------------------------------- streaming: batches, order, duplicates


def by_benchmark(saliency: pl.DataFrame, n_batches: int = 1) -> dict[str, list[pl.DataFrame]]:
    """Each benchmark's rows (item_id, concept, saliency) cut into n_batches consecutive batches of unequal size."""
    out = {}
    for (benchmark,), frame in saliency.partition_by("benchmark", as_dict=True).items():
        rows = frame.drop("benchmark")
        cuts = sorted({round(rows.height * (k / n_batches) ** 2) for k in range(n_batches + 1)})
        out[benchmark] = [rows.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    return out


def streamed_tables(batches: dict, items: pl.DataFrame, n_concepts: int, options: GapOptions):
    statistics = gap_statistics(batches, items, n_concepts, options)
    table = benchmark_table(statistics, options)
    return table, *suite_table(statistics, table, options)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_rows_in_several_batches_give_the_tables_of_one(pooling):
    saliency, items = random_frames()
    options = GapOptions(n_bootstrap=50, seed=2, min_ci_support=1, pooling=pooling)
    table, suite, thresholds = streamed_tables(by_benchmark(saliency), items, 6, options)
    assert table.equals(concept_benchmark_table(saliency, items, 6, options))  # the in-memory entry point
    assert table["chi_model_lo"].null_count() == 0
    for n_batches in (3, 7):
        table_n, suite_n, thresholds_n = streamed_tables(by_benchmark(saliency, n_batches), items, 6, options)
        # Sums are added batch by batch: equal up to the order of floating-point additions.
        assert_frame_equal(table_n, table, check_exact=False, rel_tol=1e-12)
        assert_frame_equal(suite_n, suite, check_exact=False, rel_tol=1e-12)
        assert thresholds_n == pytest.approx(thresholds)


def test_rows_out_of_extraction_order_give_the_same_tables():
    """Rows shuffled (items interleaved, concepts out of order): the order check fails, the keyed second pass
    finds no duplicate, and the sums do not depend on the order."""
    saliency, items = random_frames()
    options = GapOptions(n_bootstrap=30, min_ci_support=1)
    shuffled = saliency.sample(fraction=1.0, shuffle=True, seed=0)
    ordered = streamed_tables(by_benchmark(saliency, 2), items, 6, options)
    for got, expected in zip(streamed_tables(by_benchmark(shuffled, 2), items, 6, options)[:2], ordered[:2]):
        assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-12)


@pytest.mark.parametrize("duplicate", [
    [("A", "a1", 0, 5.0)],  # item a1 again after the other items: a later run of the same item
    [("A", "a3", 2, 5.0)],  # right after a3's own row of concept 2: same run, concept not ascending
    [("A", "a2", 0, 0.0)],  # a stored 0 is a row too
])
@pytest.mark.parametrize("n_batches", [1, 3])
def test_duplicate_rows_are_rejected_in_any_batch(duplicate, n_batches):
    rows = SALIENCY_ROWS[:5] + duplicate + SALIENCY_ROWS[5:]
    saliency, items = frames(rows)
    with pytest.raises(ValueError, match="duplicate"):
        gap_statistics(by_benchmark(saliency, n_batches), items, K, NO_BOOT)


def test_extraction_order_is_read_once_and_any_other_order_twice():
    saliency, items = frames()
    one_pass = {name: iter(batches) for name, batches in by_benchmark(saliency, 2).items()}
    gap_statistics(one_pass, items, K, NO_BOOT)  # a one-shot iterator suffices in extraction's order
    unordered = {name: iter(batches[::-1]) for name, batches in by_benchmark(saliency, 2).items()}
    with pytest.raises(ValueError, match="iterated twice"):
        gap_statistics(unordered, items, K, NO_BOOT)


def test_batches_are_released_as_the_stream_goes():
    """The accumulation keeps no row: when a batch is read, every batch before the one just added is freed
    (the one just added may live until the loop moves on)."""
    saliency, items = random_frames(n_items=30)
    alive_when_read = []

    def batches(rows: pl.DataFrame, size: int = 17):
        earlier = []
        for start in range(0, rows.height, size):
            gc.collect()
            alive_when_read.append(sum(ref() is not None for ref in earlier[:-1]))
            batch = rows.slice(start, size)  # a new frame, referenced only by whoever keeps it
            earlier.append(weakref.ref(batch))
            yield batch

    streams = {name: batches(frame.drop("benchmark"))
               for (name,), frame in saliency.partition_by("benchmark", as_dict=True).items()}
    gap_statistics(streams, items, 6, GapOptions(n_bootstrap=10))
    assert len(alive_when_read) > 4 and set(alive_when_read) == {0}


def test_rows_of_a_benchmark_without_items_are_rejected():
    saliency, items = frames(SALIENCY_ROWS + [("Z", "z1", 0, 1.0)])
    with pytest.raises(ValueError, match="missing from `items`"):
        gap_statistics(by_benchmark(saliency), items, K, NO_BOOT)
