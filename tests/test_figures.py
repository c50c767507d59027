"""Figures, ranked tables and example cards: the data shaping against hand-made values, and every figure
rendered (PNG + SVG) from small synthetic reducer tables."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from competency_gaps.cli import main
from competency_gaps.figure_data import (
    benchmark_order,
    chi_model_matrix,
    clip_upper,
    cluster_order,
    LABEL_CHARS,
    concept_markdown,
    concept_name,
    markdown_escape,
    median_or_none,
    overlap_matrix,
    pairwise_correlation,
    per_benchmark_values,
    pooled_percentile,
    prompt_text,
    ranked_concepts,
    read_labels,
    select_examples,
    select_wrong_items,
    stability_spread,
    top_item_concepts,
    top_item_concepts_of_batches,
    validity_bars,
)
from competency_gaps.figures import (
    FIGURES,
    ROBUSTNESS_FIGURES,
    TABLES,
    font_family,
    plot_chi_bench_grid,
    plot_chi_bench_hist,
    plot_chi_model_grid,
    plot_chi_model_hist,
    plot_correlation_heatmap,
    plot_missing_percent,
    plot_overlap_heatmap,
    plot_stability,
    plot_validity,
    run_figures,
    run_robustness_figures,
    stability_figure,
    validity_figure,
)
from competency_gaps.reduce import run_reduce
from competency_gaps.tables import ITEMS, LABELS, SALIENCY, SCORES, table_from_rows, write_parquet

K = 40
BENCHMARKS = {"arith": "Math", "logic": "Reasoning", "facts": "Factuality", "bias": "Ethics & Bias", "probe_x": "Probe"}
GAPS = {"epsilon": 0.0, "under_percentile": 5, "over_percentile": 99, "pooling": "pooled", "min_benchmarks": 2,
        "min_support": 5, "n_bootstrap": 20, "ci_level": 0.95, "min_ci_support": 5, "seed": 0}


def write_shards(root: Path, benchmark: str, category: str, saliency: dict, scores: dict) -> dict[str, str]:
    """items, scores and saliency (+ item_tokens) of one benchmark under the pipeline's result paths."""
    items = [{"item_id": i, "benchmark": benchmark, "category": category,
              "messages": [{"role": "user", "content": f"Question {i} of {benchmark}?"}], "gold": f"gold-{i}"}
             for i in scores]
    paths = {
        "items": root / f"benchmarks/benchmark={benchmark}/items.parquet",
        "scores": root / f"evaluate/model=m/benchmark={benchmark}/scores.parquet",
        "saliency": root / f"extract/model=m/benchmark={benchmark}/layer=3/saliency.parquet",
        "tokens": root / f"extract/model=m/benchmark={benchmark}/layer=3/item_tokens.parquet",
    }
    write_parquet(table_from_rows(items, ITEMS), paths["items"], ITEMS)
    score_rows = [{"item_id": i, "scoring": "x", "score": p, "prediction": f"pred-{i}", "response": f"Response to {i}."}
                  for i, p in scores.items()]
    write_parquet(table_from_rows(score_rows, SCORES), paths["scores"], SCORES)
    rows = [{"item_id": i, "concept": c, "saliency": s, "max_activation": s, "active_tokens": 1}
            for (i, c), s in saliency.items()]
    write_parquet(table_from_rows(rows, SALIENCY), paths["saliency"], SALIENCY)
    from competency_gaps.tables import ITEM_TOKENS

    tokens = [{"item_id": i, "counted_tokens": 5, "total_tokens": 9, "read_tokens": 9, "truncated": False,
               "skipped": None} for i in scores]
    write_parquet(table_from_rows(tokens, ITEM_TOKENS), paths["tokens"], ITEM_TOKENS)
    return {key: str(path) for key, path in paths.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Five benchmarks × 30 items over K = 40 concepts (the last one never fires), reduced by the pipeline;
    'facts' is coverage only (no scores)."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    shards = {}
    for b, (benchmark, category) in enumerate(BENCHMARKS.items()):
        n_items = 30
        scores = {f"{benchmark}-{i:02d}": (None if benchmark == "facts" else float(rng.integers(0, 2)))
                  for i in range(n_items)}
        saliency = {}
        for item in scores:
            for concept in rng.choice(K - 1 - b, size=8, replace=False):  # later benchmarks cover fewer concepts
                saliency[(item, int(concept))] = float(rng.gamma(2.0, 0.5)) + 0.01
        shards[benchmark] = write_shards(root, benchmark, category, saliency, scores)
    out = root / "concepts/model=m/layer=3"
    run_reduce([s["saliency"] for s in shards.values()], [s["tokens"] for s in shards.values()],
               [s["scores"] for s in shards.values()], n_concepts=K, gaps=GAPS, out_dir=out, title="t")
    return {"root": root, "out": out, "shards": shards, "categories": BENCHMARKS}


# ---------------------------------------------------------------------------------------------------------
# Data shaping


def test_concept_name_uses_ids_until_labels_exist():
    assert concept_name(3121) == "#3121"
    assert concept_name(3121, {3121: "arithmetic carries"}) == "#3121 arithmetic carries"
    assert concept_name(7, {3121: "x"}) == "#7"


# A label that would break a Markdown table (pipe, newline) and inject HTML, code and emphasis if not escaped.
NASTY = "carry | borrow\nin `sums` <script>alert(1)</script> *x*"


def write_labels(path: Path, labels: dict[int, str | None]) -> Path:
    """A labels.parquet with the LABELS schema (null label: the concept never fired)."""
    rows = [{"concept": c, "live": label is not None, "label": label,
             "label_source": "heuristic" if label is not None else None, "detection_score": float("nan"),
             "detection_judge": "lexical", "n_detection": 0, "firing_tokens": [], "promoted_tokens": [],
             "suppressed_tokens": [], "max_activation": 1.0} for c, label in labels.items()]
    write_parquet(table_from_rows(rows, LABELS), path, LABELS)
    return path


def markdown_cells(row: str) -> list[str]:
    """The cells of a Markdown table row, split at the pipes no backslash escapes (as GFM splits them)."""
    inner = row.strip()
    assert inner.startswith("|") and inner.endswith("|"), row
    cells, cell, escaped = [], "", False
    for char in inner[1:-1]:
        if escaped:
            cell, escaped = cell + char, False
        elif char == "\\":
            cell, escaped = cell + char, True
        elif char == "|":
            cells, cell = cells + [cell.strip()], ""
        else:
            cell += char
    assert not escaped, row  # the closing pipe is escaped: the row runs on
    return cells + [cell.strip()]


def check_tables(text: str) -> int:
    """Every row of every Markdown table in `text` has as many cells as its header; returns the data rows."""
    rows, width = 0, None
    for line in text.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = markdown_cells(line)
        if width is None:
            width = len(cells)
        else:
            assert len(cells) == width, line
            rows += not set(line) <= set("|-: ")  # the delimiter row is no data row
    return rows


def test_read_labels_leaves_out_concepts_without_a_label(tmp_path):
    assert read_labels(None) == {}
    path = write_labels(tmp_path / "labels.parquet", {0: "dates", 1: None, 2: "  ", 3: NASTY})
    assert read_labels(path) == {0: "dates", 3: NASTY}
    assert read_labels(str(path)) == {0: "dates", 3: NASTY}
    pl.DataFrame({"concept": [5, 6], "label": ["x", None]}).write_csv(tmp_path / "labels.csv")
    assert read_labels(tmp_path / "labels.csv") == {5: "x"}
    pl.DataFrame({"concept": [5]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="concept and label"):
        read_labels(tmp_path / "bad.parquet")


def test_concept_markdown_escapes_and_cuts_labels():
    labels = {1: NASTY, 2: "word " * 30}
    assert concept_markdown(7, labels) == "#7" and concept_markdown(7) == "#7"
    assert concept_markdown(1, labels) == ("#1 carry \\| borrow in \\`sums\\` \\<script\\>alert(1)\\</script\\> "
                                           "\\*x\\*")
    cut = concept_markdown(2, labels)
    assert cut.endswith("…") and len(cut) == len("#2 ") + LABEL_CHARS
    assert concept_name(2, labels) == "#2 " + "word " * 30  # plain and whole by default (the CSVs)
    assert concept_name(1, labels, limit=12) == "#1 carry | bor…"  # one line, cut (figure axes)
    assert markdown_escape("a\\b & [c](d) $e$ ~f~ _g_") == "a\\\\b \\& \\[c\\](d) \\$e\\$ \\~f\\~ \\_g\\_"
    row = "| " + " | ".join(["1", concept_markdown(1, labels), "0.5"]) + " |"
    assert len(markdown_cells(row)) == 3


def test_benchmark_order_groups_by_category():
    categories = {"z_math": "Math", "a_probe": "Probe", "b_reason": "Reasoning", "a_reason": "Reasoning", "odd": "Weird"}
    assert benchmark_order(categories, categories) == ["z_math", "a_reason", "b_reason", "a_probe", "odd"]


def test_percentile_clip_and_median():
    values = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0, 100.0])}
    assert pooled_percentile(values, 50) == pytest.approx(3.0)
    assert clip_upper(values["b"], 3.5).tolist() == [3.0, 3.5, 3.5]
    assert median_or_none(np.array([])) is None
    assert median_or_none(np.array([0.2, 0.9, 0.4])) == pytest.approx(0.4)
    assert pooled_percentile({"a": np.array([])}, 95) is None


def test_per_benchmark_values_keep_positive_non_null():
    table = pl.DataFrame({"concept": [0, 1, 2, 0, 1, 2], "benchmark": ["a"] * 3 + ["b"] * 3,
                          "chi_bench": [0.0, 2.0, 1.0, 0.0, 0.0, 0.0], "chi_model": [None, 0.5, 0.25, None, None, None]})
    assert sorted(per_benchmark_values(table, "chi_bench", positive=True)["a"].tolist()) == [1.0, 2.0]
    assert per_benchmark_values(table, "chi_bench", positive=True)["b"].size == 0
    assert per_benchmark_values(table, "chi_model")["b"].size == 0


def test_cluster_order_puts_identical_benchmarks_next_to_each_other():
    # a and c cover exactly the same concepts; b and d are unlike them and each other.
    covered = {"a": {0, 1, 2, 3}, "b": {4, 5, 6}, "c": {0, 1, 2, 3}, "d": {3, 7, 8, 9}, "e": {5, 9}}
    names = sorted(covered)
    rows = [{"benchmark_a": x, "benchmark_b": y, "jaccard": len(covered[x] & covered[y]) / len(covered[x] | covered[y])}
            for x in names for y in names]
    order = cluster_order(overlap_matrix(pl.DataFrame(rows), names), names)
    assert sorted(order) == names
    assert abs(order.index("a") - order.index("c")) == 1
    assert cluster_order(np.eye(2), ["x", "y"]) == ["x", "y"]


def test_overlap_matrix_follows_the_given_order():
    overlap = pl.DataFrame({"benchmark_a": ["a", "a", "b", "b"], "benchmark_b": ["a", "b", "a", "b"],
                            "jaccard": [1.0, 0.25, 0.25, None]})
    matrix = overlap_matrix(overlap, ["b", "a"])
    assert np.isnan(matrix[0, 0]) and matrix[0, 1] == 0.25 and matrix[1, 1] == 1.0


def test_correlation_matches_numpy_on_rows_present_in_both():
    rng = np.random.default_rng(1)
    values = rng.random((60, 4))
    values[:, 1] = values[:, 0] * 0.5 + rng.random(60) * 0.2  # correlated with column 0
    values[rng.random((60, 4)) < 0.25] = np.nan
    r, n = pairwise_correlation(values, min_n=10)
    for i in range(4):
        for j in range(4):
            both = ~np.isnan(values[:, i]) & ~np.isnan(values[:, j])
            assert n[i, j] == both.sum()
            assert r[i, j] == pytest.approx(np.corrcoef(values[both, i], values[both, j])[0, 1])
    assert r[0, 1] > 0.5


def test_correlation_is_blank_below_ten_shared_concepts():
    values = np.full((30, 3), np.nan)
    values[:, 0] = np.arange(30.0)
    values[:9, 1] = np.arange(9.0) ** 2  # 9 concepts shared with column 0
    values[:10, 2] = -np.arange(10.0)  # 10 shared with column 0
    r, n = pairwise_correlation(values, min_n=10)
    assert n[0, 1] == 9 and np.isnan(r[0, 1]) and np.isnan(r[1, 0])
    assert n[0, 2] == 10 and r[0, 2] == pytest.approx(-1.0)
    assert n[1, 2] == 9 and np.isnan(r[1, 2])
    constant = np.column_stack([np.arange(12.0), np.ones(12)])
    assert np.isnan(pairwise_correlation(constant)[0][0, 1])  # no variation: undefined, not 0


def test_chi_model_matrix_has_nan_for_null():
    table = pl.DataFrame({"concept": [0, 1, 0, 1], "benchmark": ["a", "a", "b", "b"], "chi_model": [0.5, None, 0.25, 1.0]})
    matrix = chi_model_matrix(table, ["b", "a", "missing"])
    assert matrix.shape == (2, 3)
    assert matrix[0, :2].tolist() == [0.25, 0.5] and np.isnan(matrix[1, 1]) and np.isnan(matrix[:, 2]).all()


def concepts_frame(**extra) -> pl.DataFrame:
    base = {
        "concept": [0, 1, 2, 3, 4, 5, 6],
        "chi_bench": [0.0, 0.5, 1.0, 2.0, 0.1, 0.0, 3.0],
        "chi_model": [None, 0.2, 0.9, 0.2, 0.6, None, 0.1],
        "chi_model_lo": [None, 0.1, 0.8, 0.1, 0.5, None, None],
        "chi_model_hi": [None, 0.3, 1.0, 0.3, 0.7, None, None],
        "support": [0, 50, 60, 70, 80, 0, 5],
        "n_benchmarks_active": [0, 3, 3, 3, 3, 0, 1],
        "scored_support": [0, 50, 60, 70, 80, 0, 5],
        "n_benchmarks_scored": [0, 3, 3, 3, 3, 0, 1],
        "sum_saliency": [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
        "ess": [None, 10.0, 11.0, 12.0, 13.0, None, 2.0],
        "scored_ess": [None, 10.0, 11.0, 12.0, 13.0, None, 2.0],
        "classification": ["missing", "normal", "normal", "over", "under", "missing", "over"],
        "passes_support_filter": [False, True, True, True, True, False, False],
    }
    return pl.DataFrame({**base, **extra})


def test_ranked_tables_order_and_content():
    rankings = ranked_concepts(concepts_frame(), n=3, labels={2: "dates"})
    assert rankings.filtered
    # Concept 6 has the lowest chi_model but fails the support filter; ties (0.2) broken by concept id.
    assert rankings.worst["concept"].to_list() == [1, 3, 4]
    assert rankings.worst["rank"].to_list() == [1, 2, 3]
    assert rankings.best["concept"].to_list() == [2, 4, 1]
    assert rankings.best["name"][0] == "#2 dates" and rankings.best["label"][0] == "dates"
    assert rankings.worst["label"].to_list() == [None, None, None]  # no label: null, shown by id
    assert {"chi_model_lo", "chi_model_hi", "scored_support", "scored_ess", "support", "ess"} <= set(rankings.worst.columns)
    assert "chi_model_shrunk" not in rankings.worst.columns
    assert rankings.under_covered["concept"].to_list() == [4, 1, 2]  # lowest chi_bench among covered
    assert rankings.missing["concept"].to_list() == [0, 5]
    assert rankings.missing["name"].to_list() == ["#0", "#5"]


def test_ranked_tables_show_shrunk_and_adjusted_when_present_and_fall_back_without_filter():
    frame = concepts_frame(chi_model_shrunk=[None, 0.3, 0.8, 0.25, 0.55, None, 0.4],
                           chi_model_adjusted=[None, 0.1, 0.9, 0.2, 0.6, None, 0.1])
    rankings = ranked_concepts(frame, n=25)
    assert {"chi_model_shrunk", "chi_model_adjusted"} <= set(rankings.worst.columns)
    assert rankings.worst["concept"].to_list() == [1, 3, 4, 2]  # still ranked by chi_model
    fallback = ranked_concepts(frame.with_columns(passes_support_filter=pl.lit(False)), n=25)
    assert not fallback.filtered and fallback.worst["concept"].to_list() == [6, 1, 3, 4, 2]


def test_ranked_tables_follow_the_configured_ranking_when_its_column_exists():
    frame = concepts_frame(chi_model_shrunk=[None, 0.3, 0.8, 0.25, 0.55, None, 0.4])
    shrunk = ranked_concepts(frame, n=25, ranking="shrunk")
    assert shrunk.ranking == "shrunk"
    assert shrunk.worst["concept"].to_list() == [3, 1, 4, 2]
    assert shrunk.best["concept"].to_list() == [2, 4, 1, 3]
    # Without the column (an older reducer) the plain chi_model orders the lists, and says so.
    assert ranked_concepts(concepts_frame(), n=25, ranking="shrunk").ranking == "point"
    bounded = ranked_concepts(frame, n=25, ranking="lower_bound")
    assert bounded.worst["concept"].to_list() == [1, 3, 4, 2]  # by the upper end: 0.3, 0.3 (tie: chi 0.2, id), 0.7, 1.0


def test_select_examples_picks_lowest_and_highest_scored_items():
    saliency = pl.DataFrame({
        "benchmark": ["a"] * 6 + ["b"] * 2,
        "item_id": ["a1", "a2", "a3", "a4", "a5", "a1", "b1", "b2"],
        "concept": [7, 7, 7, 7, 7, 8, 7, 7],
        "saliency": [0.1, 0.9, 0.5, 0.3, 0.2, 1.0, 0.4, 0.4],
    })
    scores = pl.DataFrame({"benchmark": ["a"] * 5 + ["b"] * 2, "item_id": ["a1", "a2", "a3", "a4", "a5", "b1", "b2"],
                           "score": [0.0, 0.0, 1.0, 1.0, None, 0.5, 0.5]})
    picked = select_examples(saliency, scores, [7], per_side=1)
    a = picked.filter(pl.col("benchmark") == "a")
    # Worst: score 0, the higher saliency first (a2); best: score 1, higher saliency (a3). a5 has no score.
    assert a.filter(pl.col("side") == "worst")["item_id"].to_list() == ["a2"]
    assert a.filter(pl.col("side") == "best")["item_id"].to_list() == ["a3"]
    both = select_examples(saliency, scores, [7], per_side=2).filter(pl.col("benchmark") == "a")
    assert both.filter(pl.col("side") == "worst")["item_id"].to_list() == ["a2", "a1"]
    assert both.filter(pl.col("side") == "best")["item_id"].to_list() == ["a3", "a4"]
    assert both["rank"].to_list() == [1, 2, 1, 2]
    # Two items only: each shown once (tie on score and saliency broken by id).
    b = select_examples(saliency, scores, [7], per_side=2).filter(pl.col("benchmark") == "b")
    assert b["item_id"].to_list() == ["b1", "b2"] and b["side"].to_list() == ["worst", "worst"]
    assert select_examples(saliency, scores, [8], per_side=1)["item_id"].to_list() == ["a1"]


def test_select_wrong_items_picks_the_lowest_scores_then_item_ids():
    scores = pl.DataFrame({
        "benchmark": ["a"] * 8 + ["b"] * 3 + ["c"] * 2,
        "item_id": ["a7", "a2", "a5", "a1", "a3", "a6", "a4", "a8", "b1", "b2", "b3", "c1", "c2"],
        "score": [0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.25, None, 1.0, float("nan"), 0.0, None, None],
    })
    picked = select_wrong_items(scores, per_benchmark=5)
    # a: the four zeros by id, then the lowest partial credit (0.25 before 0.5); a1 is right, a8 unscored.
    a = picked.filter(pl.col("benchmark") == "a")
    assert a["item_id"].to_list() == ["a3", "a5", "a6", "a7", "a4"]
    assert a["rank"].to_list() == [1, 2, 3, 4, 5] and a["score"].to_list() == [0.0, 0.0, 0.0, 0.0, 0.25]
    # b: b1 is right and b2 has no score (NaN): only b3; c (coverage only) has none.
    assert picked.filter(pl.col("benchmark") == "b")["item_id"].to_list() == ["b3"]
    assert picked.filter(pl.col("benchmark") == "c").height == 0
    assert select_wrong_items(scores, per_benchmark=2).filter(pl.col("benchmark") == "a")["item_id"].to_list() == [
        "a3", "a5"]


def test_top_item_concepts_by_saliency_ties_by_concept_id():
    saliency = pl.DataFrame({
        "benchmark": ["a"] * 7 + ["b"] * 2,
        "item_id": ["x", "x", "x", "x", "x", "y", "y", "x", "x"],
        "concept": [5, 3, 9, 1, 4, 2, 7, 0, 1],
        "saliency": [2.0, 4.0, 2.0, 0.0, 1.0, 3.0, 5.0, 9.0, 1.0],
    })
    items = pl.DataFrame({"benchmark": ["a", "b", "a"], "item_id": ["x", "x", "z"]})
    top = top_item_concepts(saliency, items, n=3)
    ax = top.filter((pl.col("benchmark") == "a") & (pl.col("item_id") == "x"))
    # 4.0 (#3), then the tie at 2.0 by concept id (#5 before #9); #1 (saliency 0) never counts.
    assert ax["concept"].to_list() == [3, 5, 9] and ax["rank"].to_list() == [1, 2, 3]
    assert ax["share"].to_list() == pytest.approx([4 / 9, 2 / 9, 2 / 9])
    bx = top.filter(pl.col("benchmark") == "b")  # the same item id in another benchmark is another item
    assert bx["concept"].to_list() == [0, 1] and bx["share"].to_list() == pytest.approx([0.9, 0.1])
    assert top.filter(pl.col("item_id") == "y").height == 0  # not asked for
    assert top.filter(pl.col("item_id") == "z").height == 0  # no saliency


def test_top_item_concepts_of_batches_merges_an_item_spread_over_batches():
    saliency = pl.DataFrame({
        "benchmark": ["a"] * 6 + ["b"] * 2,
        "item_id": ["x"] * 5 + ["y"] + ["x"] * 2,
        "concept": [5, 3, 9, 1, 4, 2, 0, 1],
        "saliency": [2.0, 4.0, 2.0, 0.0, 1.0, 3.0, 9.0, 1.0],
    })
    whole = top_item_concepts(saliency, saliency.select("benchmark", "item_id"), n=2)
    # Item a/x spans all three batches; its top 2 come from different ones and its share is of its whole total.
    batches = [saliency[0:1], saliency[1:3], saliency[3:8]]
    split = top_item_concepts_of_batches(batches, n=2)
    assert split.equals(whole)
    ax = split.filter((pl.col("benchmark") == "a") & (pl.col("item_id") == "x"))
    # The tie at 2.0 for the last place goes to the lower concept id (#5, not #9), even across batches.
    assert ax["concept"].to_list() == [3, 5] and ax["share"].to_list() == pytest.approx([4 / 9, 2 / 9])
    assert top_item_concepts_of_batches([], n=2).columns == whole.columns


def test_prompt_text_keeps_system_and_last_user_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert prompt_text(messages) == "Be brief.\n\n2+2?"
    assert prompt_text(None) == ""


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _figure_calls(results: dict) -> dict:
    out = results["out"]
    cb = pl.read_parquet(out / "concept_benchmark.parquet")
    concepts = pl.read_parquet(out / "concepts.parquet")
    thresholds = json.loads((out / "thresholds.json").read_text())
    categories = results["categories"]
    return {
        "chi_bench_hist": lambda stem: plot_chi_bench_hist(concepts, stem, thresholds, "model m, layer 3"),
        "chi_bench_per_benchmark": lambda stem: plot_chi_bench_grid(cb, categories, stem, "ctx"),
        "chi_model_per_benchmark": lambda stem: plot_chi_model_grid(cb, categories, stem, "ctx"),
        "chi_model_hist": lambda stem: plot_chi_model_hist(concepts, stem, "ctx"),
        "missing_percent": lambda stem: plot_missing_percent(pl.read_parquet(out / "benchmarks.parquet"), categories,
                                                             stem, K, "ctx"),
        "jaccard_overlap": lambda stem: plot_overlap_heatmap(pl.read_parquet(out / "overlap.parquet"), categories, stem),
        "chi_model_correlation": lambda stem: plot_correlation_heatmap(cb, categories, stem, min_n=5),
    }


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_writes_png_and_svg(results, tmp_path, name):
    paths = _figure_calls(results)[name](tmp_path / name)
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.svg"]
    for path in paths:
        assert path.stat().st_size > 1000
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()
    assert not list(tmp_path.glob(".*partial"))


def test_figures_survive_degenerate_tables(tmp_path):
    """One benchmark, nothing scored, nothing covered: figures still render (with a note), no crash."""
    cb = pl.DataFrame({"concept": [0, 1], "benchmark": ["a", "a"], "chi_bench": [None, None],
                       "chi_model": [None, None], "support": [0, 0], "scored_support": [0, 0]},
                      schema_overrides={"chi_bench": pl.Float64, "chi_model": pl.Float64})
    concepts = concepts_frame().head(1)
    plot_chi_bench_grid(cb, {}, tmp_path / "g")
    plot_chi_model_grid(cb, {}, tmp_path / "m")
    plot_chi_model_hist(concepts, tmp_path / "h")
    plot_chi_bench_hist(concepts, tmp_path / "b")
    plot_correlation_heatmap(cb, {}, tmp_path / "c")
    benchmarks = pl.DataFrame({"benchmark": ["a"], "covered": [None], "missing_percent": [None]},
                              schema_overrides={"covered": pl.Int64, "missing_percent": pl.Float64})
    plot_missing_percent(benchmarks, {}, tmp_path / "p", 2)
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_non_latin_text_is_drawn_from_the_fallback_fonts(tmp_path):
    # Benchmark names (and labels, in the cross-model figure) in scripts DejaVu Sans lacks: each glyph comes from
    # a fallback font (figures.FALLBACK_FONTS) instead of a box, which matplotlib reports as a missing glyph.
    if font_family() == ["DejaVu Sans"]:
        pytest.skip("no fallback font installed (scripts/setup.sh installs fonts-droid-fallback, fonts-nanum and fonts-noto-core)")
    benchmarks = pl.DataFrame({"benchmark": ["数学", "수학", "गणित", "арифметика"], "covered": [3, 3, 2, 1],
                               "missing_percent": [25.0, 25.0, 50.0, 75.0]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_missing_percent(benchmarks, {}, tmp_path / "p", 4, "模型 m")
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing
    assert "Droid Sans Fallback" in font_family()  # the CJK fallback, first after DejaVu Sans


# ---------------------------------------------------------------------------------------------------------
# Robustness figures


def stability_table() -> tuple[pl.DataFrame, dict]:
    """Six concepts: 0-3 pass the support filter (3 has no chi_model std), 4 fails it, 5 never fires."""
    table = pl.DataFrame({
        "concept": [0, 1, 2, 3, 4, 5],
        "chi_bench": [0.5, 1.0, 2.0, 4.0, 0.1, 0.0],
        "chi_bench_std": [0.01, 0.02, 0.04, 0.09, 0.5, 0.0],
        "chi_model": [0.2, 0.4, 0.6, None, 0.9, None],
        "chi_model_std": [0.01, 0.02, 0.03, None, 0.2, None],
        "passes_support_filter": [True, True, True, True, False, False],
    })
    summary = {"n_resamples": 100, "keep_fraction": 0.8, "support_filter": {"min_benchmarks": 2, "min_support": 20},
               "paper": {"chi_bench_std": 0.025, "chi_model_std": 0.014}}
    return table, summary


def validity_table() -> tuple[pl.DataFrame, dict]:
    """Two directions, the suite row and two benchmarks each ('x' is entirely dominated in A->B)."""
    columns = ["direction", "scope", "n_heldout", "n_dominated", "mean_score_dominated", "mean_score_rest", "effect",
               "p_value", "adjusted_effect", "n_eligible_concepts", "n_weak_concepts", "weak_chi_threshold",
               "share_threshold", "n_no_saliency"]
    rows = [
        ("A->B", "suite", 40, 10, 0.2, 0.6, -0.4, 0.004, -0.15, 30, 3, 0.25, 0.3, 0),
        ("A->B", "w", 30, 4, 0.5, 0.7, -0.2, 0.2, -0.17, 30, 3, 0.25, 0.3, 0),
        ("A->B", "x", 10, 6, 0.0, 0.25, -0.25, 0.4, -0.1, 30, 3, 0.25, 0.3, 0),
        ("B->A", "suite", 40, 8, 0.375, 0.5, -0.125, 0.3, -0.05, 28, 3, 0.3, 0.2, 1),
        ("B->A", "w", 30, 8, 0.375, 0.6, -0.225, 0.1, -0.2, 28, 3, 0.3, 0.2, 1),
        ("B->A", "x", 10, 0, None, 0.2, None, None, None, 28, 3, 0.3, 0.2, 1),
    ]
    table = pl.DataFrame(rows, schema=columns, orient="row")
    summary = {"options": {"n_permutations": 1000, "weak_fraction": 0.1, "dominated_quantile": 0.75}}
    return table, summary


def test_stability_spread_keeps_concepts_passing_the_filter():
    table, _ = stability_table()
    spread, filtered = stability_spread(table)
    assert filtered
    assert spread["chi_bench_std"].tolist() == [0.01, 0.02, 0.04, 0.09]
    assert spread["chi_model_std"].tolist() == [0.01, 0.02, 0.03]  # concept 3 has none
    fallback, filtered = stability_spread(table.with_columns(passes_support_filter=pl.lit(False)))
    assert not filtered
    assert fallback["chi_bench_std"].tolist() == [0.01, 0.02, 0.04, 0.09, 0.5]  # covered: chi_bench > 0
    assert fallback["chi_model_std"].tolist() == [0.01, 0.02, 0.03, 0.2]


def test_validity_bars_carry_the_table_numbers():
    table, _ = validity_table()
    suite = validity_bars(table)
    assert [b["direction"] for b in suite] == ["A->B", "B->A"]
    ab = suite[0]
    assert ab["status"] == "tested" and (ab["n_dominated"], ab["n_rest"]) == (10, 30)
    assert (ab["mean_dominated"], ab["mean_rest"], ab["effect"], ab["adjusted_effect"], ab["p_value"]) == (
        0.2, 0.6, -0.4, -0.15, 0.004)
    x = validity_bars(table, "x")
    assert [b["status"] for b in x] == ["tested", "none dominated"]
    assert x[1]["mean_dominated"] is None and x[1]["mean_rest"] == 0.2 and x[1]["p_value"] is None
    everything = table.with_columns(n_dominated=pl.col("n_heldout"))
    assert {b["status"] for b in validity_bars(everything)} == {"all dominated"}


def test_validity_figure_draws_the_right_bars_and_results():
    table, summary = validity_table()
    fig = validity_figure(table, summary, "model m, layer 3")
    top = fig.axes[:2]
    for ax, (dominated, rest, n_dominated, n_rest, effect, adjusted, p) in zip(
            top, [(0.2, 0.6, 10, 30, "−0.400", "−0.150", "0.004"), (0.375, 0.5, 8, 32, "−0.125", "−0.050", "0.300")]):
        heights = [patch.get_height() for patch in ax.patches]
        assert heights == pytest.approx([dominated, rest])
        texts = [t.get_text() for t in ax.texts]
        assert f"{dominated:.3f}\n{n_dominated:,} items" in texts and f"{rest:.3f}\n{n_rest:,} items" in texts
        results = next(t for t in texts if t.startswith("effect"))
        assert f"effect (dominated − rest) = {effect}" in results
        assert f"benchmark-adjusted effect = {adjusted}" in results and f"permutation p = {p}" in results
    assert top[0].get_ylim() == top[1].get_ylim()  # one scale for both directions
    # Per benchmark (rows w then x from the top): A->B has both bars in both; B->A's x has only the rest bar.
    ab, ba = fig.axes[2], fig.axes[3]
    assert sorted(p.get_width() for p in ab.patches) == pytest.approx(sorted([0.5, 0.7, 0.0, 0.25]))
    assert sorted(p.get_width() for p in ba.patches) == pytest.approx(sorted([0.375, 0.6, 0.2]))
    assert any("none of 10 dominated, mean 0.20" in t.get_text() for t in ba.texts)
    assert any("4 of 30 dominated: 0.50 vs 0.70, p = 0.200" in t.get_text() for t in ab.texts)


def test_stability_figure_marks_the_mean_and_the_paper():
    table, summary = stability_table()
    fig = stability_figure(table, summary, "model m, layer 3")
    bench, model = fig.axes[:2]
    assert bench.get_xscale() == "log" and model.get_xscale() == "linear"
    for ax, mean, paper in ((bench, 0.04, 0.025), (model, 0.02, 0.014)):
        lines = {round(line.get_xdata()[0], 6) for line in ax.get_lines()}
        assert lines == {round(mean, 6), paper}
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[0].startswith(f"mean over these concepts = {mean:.3f}") and labels[1].endswith(f"= {paper:g}")
        assert sum(patch.get_height() for patch in ax.patches) == (4 if ax is bench else 3)


@pytest.mark.parametrize("name", ROBUSTNESS_FIGURES)
def test_each_robustness_figure_writes_png_and_svg(tmp_path, name):
    table, summary = {"stability": stability_table, "validity": validity_table}[name]()
    plot = {"stability": plot_stability, "validity": plot_validity}[name]
    paths = plot(table, summary, tmp_path / name, "model m, layer 3")
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.svg"]
    assert all(path.stat().st_size > 1000 for path in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in paths[1].read_text()


def test_robustness_figures_survive_degenerate_tables(tmp_path):
    """Nothing passes the filter and nothing has a spread; no direction could be tested."""
    table, summary = stability_table()
    empty = table.with_columns(chi_bench_std=pl.lit(None, pl.Float64), chi_model_std=pl.lit(None, pl.Float64),
                               passes_support_filter=pl.lit(False))
    plot_stability(empty, {}, tmp_path / "s")
    validity, _ = validity_table()
    untested = validity.filter(pl.col("scope") == "suite").with_columns(
        n_heldout=pl.lit(0, pl.Int64), n_dominated=pl.lit(0, pl.Int64), mean_score_dominated=pl.lit(None, pl.Float64),
        mean_score_rest=pl.lit(None, pl.Float64), effect=pl.lit(None, pl.Float64), p_value=pl.lit(None, pl.Float64))
    plot_validity(untested, {}, tmp_path / "v")
    plot_validity(validity.head(0), {}, tmp_path / "none")
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_robustness_figures_from_the_tables_folder(tmp_path):
    stability, stability_summary = stability_table()
    validity, validity_summary = validity_table()
    stability.write_parquet(tmp_path / "stability.parquet")
    validity.write_parquet(tmp_path / "validity.parquet")
    (tmp_path / "stability.json").write_text(json.dumps(stability_summary))
    (tmp_path / "validity.json").write_text(json.dumps(validity_summary))
    paths = run_robustness_figures(tmp_path, context="model m, layer 3")
    assert sorted(p.name for p in paths) == sorted(f"{n}.{e}" for n in ROBUSTNESS_FIGURES for e in ("png", "svg"))


def test_cli_writes_every_figure_table_and_card(results, tmp_path):
    shards, out = results["shards"], results["out"]
    target = tmp_path / "figures"
    main(["figures", "--concept-benchmark", str(out / "concept_benchmark.parquet"),
          "--concepts", str(out / "concepts.parquet"), "--benchmarks", str(out / "benchmarks.parquet"),
          "--overlap", str(out / "overlap.parquet"), "--thresholds", str(out / "thresholds.json"),
          "--items", *[s["items"] for s in shards.values()], "--scores", *[s["scores"] for s in shards.values()],
          "--saliency", *[s["saliency"] for s in shards.values()], "--out-dir", str(target),
          "--title", "model m, layer 3", "--cards", "3", "--examples", "1", "--wrong", "2", "--item-concepts", "3"])
    for name in FIGURES:
        assert (target / f"{name}.png").stat().st_size > 0 and (target / f"{name}.svg").stat().st_size > 0
    for name in TABLES:
        assert (target / name).stat().st_size > 0

    concepts = pl.read_parquet(out / "concepts.parquet")
    pool = concepts.filter(pl.col("passes_support_filter") & pl.col("chi_model").is_not_null())
    ranking = json.loads((out / "thresholds.json").read_text()).get("ranking", "point")
    # The lists follow gaps.ranking as summary.md does: a support-aware column (ties by chi_model) or the plain one.
    key = {"shrunk_adjusted": "chi_model_shrunk_adjusted", "shrunk": "chi_model_shrunk"}.get(ranking)
    order = [key, "chi_model", "concept"] if key else ["chi_model", "concept"]
    expected_worst = pool.sort(order)["concept"].head(25).to_list()
    assert pl.read_csv(target / "worst_concepts.csv")["concept"].to_list() == expected_worst
    missing = pl.read_csv(target / "missing_concepts.csv")["concept"].to_list()
    assert K - 1 in missing  # never fires anywhere

    cards = (target / "example_cards.md").read_text()
    assert cards.count("\n## ") == 3
    weakest = expected_worst[0]
    assert f"## 1. #{weakest} —" in cards
    # The first card shows, per scored benchmark, exactly the items select_examples picks from the shards.
    first_card = cards.split("\n## 2.")[0]
    for benchmark in ("arith", "logic", "bias", "probe_x"):
        saliency = pl.read_parquet(shards[benchmark]["saliency"]).with_columns(benchmark=pl.lit(benchmark))
        scores = pl.read_parquet(shards[benchmark]["scores"]).with_columns(benchmark=pl.lit(benchmark))
        pick = select_examples(saliency, scores, [weakest], per_side=1)
        assert (f"### {benchmark} (" in first_card) == (pick.height > 0)
        for row in pick.iter_rows(named=True):
            assert f"**{row['item_id']}** — score {row['score']:.3f}" in first_card
            assert f"Question {row['item_id']} of {benchmark}?" in first_card
            assert f"Response to {row['item_id']}." in first_card
    # facts has no scores: never an example, only named as coverage-only.
    assert "### facts" not in cards and "coverage-only) items of: facts" in first_card
    ranked = (target / "ranked_concepts.md").read_text()
    assert "Model gaps" in ranked and f"#{weakest}" in ranked

    # wrong_items.md: per scored benchmark, the wrong items select_wrong_items picks, with their top concepts.
    wrong = (target / "wrong_items.md").read_text()
    suite = pl.read_parquet(out / "concepts.parquet")
    for benchmark in ("arith", "logic", "bias", "probe_x"):
        scores = pl.read_parquet(shards[benchmark]["scores"]).with_columns(benchmark=pl.lit(benchmark))
        section = wrong.split(f"## {benchmark} (")[1].split("\n## ")[0]
        picked = select_wrong_items(scores.select("benchmark", "item_id", "score"), 2)
        assert section.count("\n### ") == picked.height == 2
        saliency = pl.read_parquet(shards[benchmark]["saliency"]).with_columns(benchmark=pl.lit(benchmark))
        for row in picked.iter_rows(named=True):
            assert f"### {row['rank']}. {row['item_id']} — score 0.000" in section
            card = section.split(f"### {row['rank']}. {row['item_id']}")[1].split("\n### ")[0]
            assert f"Question {row['item_id']} of {benchmark}?" in card and f"Response to {row['item_id']}." in card
            top = top_item_concepts(saliency, picked.filter(pl.col("item_id") == row["item_id"]), 3)
            for concept in top.iter_rows(named=True):
                chi = suite.filter(pl.col("concept") == concept["concept"])["chi_model"][0]
                assert (f"| {concept['rank']} | #{concept['concept']} | {concept['saliency']:.4g} | "
                        f"{100 * concept['share']:.1f} % | {chi:.3f} |") in card
    assert "## facts (Factuality) — coverage only" in wrong


def test_run_figures_names_every_concept_with_its_label(results, tmp_path):
    """With labels: "#id label" in every table and card, the label cut and escaped in the Markdown (no table
    breaks, no raw HTML), whole in the CSVs' label column; a never-firing concept keeps its bare id."""
    shards, out = results["shards"], results["out"]
    # Even concepts: a long label (cut in the Markdown, whole on a card's Label line); odd: a short one.
    labels = {c: (f"label{c} {NASTY} " + "tail " * 20 if c % 2 == 0 else f"label{c} a|b <i>") for c in range(K - 1)}
    path = write_labels(tmp_path / "labels.parquet", {**labels, K - 1: None})
    target = tmp_path / "figures"
    run_figures(str(out / "concept_benchmark.parquet"), str(out / "concepts.parquet"), str(out / "benchmarks.parquet"),
                str(out / "overlap.parquet"), str(out / "thresholds.json"), [s["items"] for s in shards.values()],
                [s["scores"] for s in shards.values()], [s["saliency"] for s in shards.values()], target,
                "model m, layer 3", labels_path=str(path), n_cards=3, per_side=1, n_wrong=2, n_item_concepts=3)

    worst = pl.read_csv(target / "worst_concepts.csv")
    assert worst["label"].to_list() == [labels[c] for c in worst["concept"]]  # whole: pipe and newline kept
    assert worst["name"].to_list() == [f"#{c} {labels[c]}" for c in worst["concept"]]
    missing = pl.read_csv(target / "missing_concepts.csv")
    assert missing.filter(pl.col("concept") == K - 1)["label"].to_list() == [None]
    for name in ("best", "under_covered"):
        frame = pl.read_csv(target / f"{name}_concepts.csv")
        assert frame["label"].to_list() == [labels[c] for c in frame["concept"]]

    ranked = (target / "ranked_concepts.md").read_text()
    assert check_tables(ranked) == sum(pl.read_csv(target / f"{n}_concepts.csv").height
                                       for n in ("worst", "best", "under_covered"))
    for c in worst["concept"]:
        assert f"| #{c} label{c} " in ranked
        assert f"| {concept_markdown(c, labels)} |" in ranked
    assert "<script>" not in ranked and "<i>" not in ranked and "\\<script\\>" in ranked
    assert f"#{K - 1}" in ranked.split("## Missing from the whole suite")[1]

    cards = (target / "example_cards.md").read_text()
    for position, c in enumerate(worst["concept"].head(3), start=1):
        assert f"## {position}. {concept_markdown(c, labels)} — χ_model" in cards
        if c % 2 == 0:  # the heading cut the label: the card gives it whole, escaped, on one line
            assert f"Label: {markdown_escape(labels[c])}\n" in cards
    assert "<script>" not in cards and "<i>" not in cards

    wrong = (target / "wrong_items.md").read_text()
    assert check_tables(wrong) > 0
    assert "<script>" not in wrong and "<i>" not in wrong
    rows = [markdown_cells(line) for line in wrong.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert rows and all(cells[1] == concept_markdown(int(cells[1].split()[0][1:]), labels) for cells in rows)

    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(ranked)
    assert "<script>" not in html and "&lt;script&gt;" in html and "carry | borrow in `sums`" in html


def test_every_figure_has_a_caption_that_renders_and_a_report_entry_in_the_rule():
    """report/<figure>.rst renders as reStructuredText without warnings (after Snakemake's Jinja pass) and the
    rule wraps every PNG in report() with that caption."""
    import jinja2
    from docutils.core import publish_parts

    repo = Path(__file__).resolve().parents[1]
    rule = (repo / "rules" / "figures.smk").read_text()
    wildcards = type("Wildcards", (), {"model": "m", "layer": "3"})()
    for name in FIGURES:
        caption = repo / "report" / f"{name}.rst"
        text = jinja2.Template(caption.read_text()).render(snakemake=type("S", (), {"wildcards": wildcards})())
        publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})
        assert "model m, layer 3" in " ".join(text.split())  # the caption names its run
        assert f'/{name}.png",\n            caption="../report/{name}.rst"' in rule
        assert f'"{name}"' in rule  # its SVG
    for name in TABLES:
        assert (name.split("_concepts")[0] if name.endswith("_concepts.csv") else name) in rule


def test_every_robustness_figure_has_a_caption_and_a_report_entry_in_the_robustness_rule():
    import jinja2
    from docutils.core import publish_parts

    repo = Path(__file__).resolve().parents[1]
    rule = (repo / "rules" / "robustness.smk").read_text()
    wildcards = type("Wildcards", (), {"model": "m", "layer": "3"})()
    for name in ROBUSTNESS_FIGURES:
        caption = repo / "report" / f"{name}.rst"
        text = jinja2.Template(caption.read_text()).render(snakemake=type("S", (), {"wildcards": wildcards})())
        publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})
        assert "model m, layer 3" in " ".join(text.split())
        assert (f'/{name}.png",\n            caption="../report/{name}.rst",\n            category="Robustness"'
                in rule)
        assert f'"{name}"' in rule  # its SVG
    assert "--figures" in rule
