"""Robustness analyses: resampling stability of χ_bench/χ_model, predictive validity of the χ_model gaps on
held-out items (with a stratified permutation test), and the planted-gap helper. Hand-checked tiny cases."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from competency_gaps.cli import main
from competency_gaps.concepts import GapOptions, concept_benchmark_table, concept_suite_table
from competency_gaps.robustness import (
    RobustnessOptions,
    keep_masks,
    plant_gap,
    predictive_validity,
    resampling_stability,
    split_halves,
    stratified_permutation_test,
)
from competency_gaps.tables import ITEM_TOKENS, SALIENCY, SCORES, table_from_rows, write_parquet

NO_FILTER = GapOptions(min_benchmarks=1, min_support=1, n_bootstrap=0)


def frames(saliency: dict, scores: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """saliency: {(benchmark, item, concept): s}; scores: {(benchmark, item): p or None}."""
    sal = pl.DataFrame(
        [(b, i, c, s) for (b, i, c), s in saliency.items()],
        schema={"benchmark": pl.String, "item_id": pl.String, "concept": pl.Int32, "saliency": pl.Float32},
        orient="row",
    )
    items = pl.DataFrame([(b, i, p) for (b, i), p in scores.items()],
                         schema={"benchmark": pl.String, "item_id": pl.String, "score": pl.Float64}, orient="row")
    return sal, items


def synthetic(n_benchmarks: int = 3, n_items: int = 120, n_concepts: int = 40, active: int = 6, seed: int = 0,
              p_correct: float = 0.7, planted: int | None = None, planted_rate: float = 0.3,
              unscored: tuple[str, ...] = ()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Random sparse saliency (`active` concepts per item, drawn from those other than `planted`), Bernoulli
    scores independent of it; `planted` (a concept) additionally fires strongly on a random share of items."""
    rng = np.random.default_rng(seed)
    pool = np.array([c for c in range(n_concepts) if c != planted])
    benchmarks, ids, concepts, values, item_b, item_ids, scores = [], [], [], [], [], [], []
    for b in range(n_benchmarks):
        name = f"b{b}"
        for i in range(n_items):
            item = f"{name}-{i:04d}"
            chosen = rng.choice(pool, active, replace=False)
            if planted is not None and rng.random() < planted_rate:
                chosen = np.append(chosen, planted)
            benchmarks += [name] * len(chosen)
            ids += [item] * len(chosen)
            concepts.append(chosen)
            values.append(np.where(chosen == planted, 3.0, rng.uniform(0.1, 1.0, len(chosen))))
            item_b.append(name)
            item_ids.append(item)
            scores.append(None if name in unscored else float(rng.random() < p_correct))
    sal = pl.DataFrame({"benchmark": benchmarks, "item_id": ids, "concept": np.concatenate(concepts).astype(np.int32),
                        "saliency": np.concatenate(values).astype(np.float32)})
    items = pl.DataFrame({"benchmark": item_b, "item_id": item_ids, "score": scores},
                         schema={"benchmark": pl.String, "item_id": pl.String, "score": pl.Float64})
    return sal, items


def assert_same_table(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Same columns and rows; floats equal up to summation order."""
    assert got.columns == expected.columns and got.height == expected.height
    for column in expected.columns:
        if expected[column].dtype.is_float():
            assert np.allclose(got[column].to_numpy(), expected[column].to_numpy(), equal_nan=True), column
        else:
            assert got[column].equals(expected[column]), column


def row(table: pl.DataFrame, **where) -> dict:
    for key, value in where.items():
        table = table.filter(pl.col(key) == value)
    assert table.height == 1, where
    return table.row(0, named=True)


# ---------------------------------------------------------------------------------------------------------
# Resampling stability


def test_keep_masks_keep_a_fixed_share_of_every_benchmark():
    for n, fraction, kept in [(560, 0.8, 448), (5, 0.8, 4), (1, 0.8, 1), (2, 0.5, 1), (7, 1.0, 7)]:
        masks = keep_masks("b", n, 30, fraction, seed=0)
        assert masks.shape == (n, 30) and masks.dtype == bool
        assert (masks.sum(axis=0) == kept).all(), (n, fraction)
    masks = keep_masks("b", 50, 20, 0.8, seed=0)
    assert (masks == keep_masks("b", 50, 20, 0.8, seed=0)).all()  # seeded
    assert not (masks == keep_masks("c", 50, 20, 0.8, seed=0)).all()  # own stream per benchmark
    assert not (masks == keep_masks("b", 50, 20, 0.8, seed=1)).all()
    assert len({tuple(column) for column in masks.T}) > 1  # runs differ


@pytest.mark.parametrize("pooling", ["pooled", "mean"])
def test_one_full_resample_reproduces_the_plain_values_with_zero_std(pooling):
    sal, items = synthetic(n_items=30, unscored=("b2",))
    items = pl.concat([items, pl.DataFrame({"benchmark": ["b0"], "item_id": ["silent"], "score": [1.0]})])
    gaps = GapOptions(min_benchmarks=1, min_support=1, n_bootstrap=0, pooling=pooling)
    plain, _ = concept_suite_table(concept_benchmark_table(sal, items, 40, gaps), sal, items, 40, gaps)
    table, summary = resampling_stability(sal, items, 40, RobustnessOptions(n_resamples=1, keep_fraction=1.0), gaps)
    joined = table.join(plain, on="concept", suffix="_plain")
    assert joined.height == 40
    for column in ("chi_bench", "chi_model"):
        for ours in (column, f"{column}_mean"):
            ours_values, plain = (joined[name].to_numpy().astype(float) for name in (ours, f"{column}_plain"))
            assert np.allclose(ours_values, plain, equal_nan=True, rtol=1e-12), ours
    defined = joined.filter(pl.col("chi_model_plain").is_not_null())
    assert defined.height and (defined["chi_model_std"] == 0).all() and (defined["n_runs_chi_model"] == 1).all()
    undefined = joined.filter(pl.col("chi_model_plain").is_null())
    assert undefined["chi_model_std"].null_count() == undefined.height and (undefined["n_runs_chi_model"] == 0).all()
    assert (table["chi_bench_std"] == 0).all() and (table["n_runs_chi_bench"] == 1).all()
    assert (joined["scored_support"] == joined["scored_support_plain"]).all()
    assert (joined["passes_support_filter"] == joined["passes_support_filter_plain"]).all()
    assert summary["chi_model_std"]["mean_defined"] == 0 and summary["n_resamples"] == 1


def test_two_items_one_kept_per_run_std_by_hand():
    # One benchmark, items a (p=1) and b (p=0), keep 50 %: every run keeps exactly one of them.
    # Concept 0 fires on a (s=1) and b (s=3); concept 1 only on a (s=1); concept 2 only on b (s=1). K = 3.
    # Kept a: sums (1, 1, 0), total 2 -> χ_bench = s·3/2 = (1.5, 1.5, 0); χ_model = (1, 1, N/A).
    # Kept b: sums (3, 0, 1), total 4 -> χ_bench = s·3/4 = (2.25, 0, 0.75); χ_model = (0, N/A, 0).
    # With f = share of runs keeping a, a two-valued variable {u, v} has (population) std |u − v|·√(f(1 − f)).
    sal, items = frames({("x", "a", 0): 1.0, ("x", "b", 0): 3.0, ("x", "a", 1): 1.0, ("x", "b", 2): 1.0},
                        {("x", "a"): 1.0, ("x", "b"): 0.0})
    runs = 10
    options = RobustnessOptions(n_resamples=runs, keep_fraction=0.5, seed=0)
    table, _ = resampling_stability(sal, items, 3, options, NO_FILTER)
    kept_a = int(keep_masks("x", 2, runs, 0.5, seed=0)[0].sum())  # items in item_id order: a, b
    assert kept_a == 4  # pinned for seed 0 (regression value: the draw is part of the output)
    f = kept_a / runs
    spread = np.sqrt(f * (1 - f))
    c0, c1, c2 = (row(table, concept=c) for c in range(3))
    assert c0["chi_bench_std"] == pytest.approx(0.75 * spread)
    assert c1["chi_bench_std"] == pytest.approx(1.5 * spread)
    assert c2["chi_bench_std"] == pytest.approx(0.75 * spread)
    assert c0["chi_bench_mean"] == pytest.approx(1.5 * f + 2.25 * (1 - f))
    assert c0["chi_model_std"] == pytest.approx(spread) and c0["chi_model_mean"] == pytest.approx(f)
    assert c0["n_runs_chi_model"] == runs and c0["n_runs_chi_bench"] == runs
    # A concept on one item is defined exactly in the runs that keep that item; it is then constant.
    assert (c1["n_runs_chi_model"], c1["chi_model_std"], c1["chi_model_mean"]) == (kept_a, 0.0, 1.0)
    assert (c2["n_runs_chi_model"], c2["chi_model_std"], c2["chi_model_mean"]) == (runs - kept_a, 0.0, 0.0)
    # Full-data values: sums (4, 1, 1), total 6 -> χ_bench (2, 0.5, 0.5); χ_model of concept 0 = 1/4.
    assert (c0["chi_bench"], c1["chi_bench"], c0["chi_model"]) == pytest.approx((2.0, 0.5, 0.25))


def test_concept_on_exactly_one_item_is_defined_in_the_runs_that_keep_it():
    # Five scored items i0..i4 and an unscored one u; keep 80 % of 6 = 5: each run drops exactly one item.
    # Concept j fires only on item ij, so it is defined in R − (runs dropping ij) runs, and with u's kept
    # runs the counts add up to 5·R. Concept 5 fires only on u (unscored): never a χ_model, never a std.
    ids = ["i0", "i1", "i2", "i3", "i4"]
    saliency = {("x", item, j): 1.0 for j, item in enumerate(ids)} | {("x", "u", 5): 1.0}
    sal, items = frames(saliency, {("x", item): 1.0 for item in ids} | {("x", "u"): None})
    runs = 20
    table, _ = resampling_stability(sal, items, 6, RobustnessOptions(n_resamples=runs, keep_fraction=0.8), NO_FILTER)
    counts = [row(table, concept=j)["n_runs_chi_model"] for j in range(5)]
    kept = keep_masks("x", 6, runs, 0.8, seed=0)  # item_id order: i0..i4, u; 6 items -> 5 kept per run
    assert counts == kept[:5].sum(axis=1).tolist()
    assert counts == [18, 17, 15, 16, 18]  # pinned for seed 0 (regression value)
    assert sum(counts) + int(kept[5].sum()) == 5 * runs
    unscored = row(table, concept=5)
    assert unscored["n_runs_chi_model"] == 0 and unscored["chi_model_std"] is None
    assert unscored["n_runs_chi_bench"] == runs  # χ_bench (0 when dropped) is defined in every run


def test_resampling_is_deterministic_and_summarised():
    sal, items = synthetic(n_items=60)
    gaps = GapOptions(min_benchmarks=2, min_support=28, n_bootstrap=0)
    options = RobustnessOptions(n_resamples=15, seed=3)
    first, summary = resampling_stability(sal, items, 40, options, gaps)
    second, again = resampling_stability(sal, items, 40, options, gaps)
    assert first.equals(second) and summary == again
    other, _ = resampling_stability(sal, items, 40, RobustnessOptions(n_resamples=15, seed=4), gaps)
    assert not np.allclose(first["chi_model_std"].to_numpy(), other["chi_model_std"].to_numpy())
    assert (first["chi_model_std"] > 0).all() and (first["n_runs_chi_model"] == 15).all()
    passing = first.filter("passes_support_filter")
    assert 0 < passing.height < 40
    assert summary["chi_model_std"]["mean_filtered"] == pytest.approx(passing["chi_model_std"].mean())
    assert summary["chi_model_std"]["n_filtered"] == passing.height
    assert summary["chi_bench_std"]["mean_covered"] == pytest.approx(first["chi_bench_std"].mean())
    assert summary["paper"] == {"chi_bench_std": 0.025, "chi_model_std": 0.014}
    json.dumps(summary)  # JSON-ready


def test_resamples_split_over_several_passes_give_the_same_table(monkeypatch):
    # Wide SAEs take the runs a chunk per pass over the rows; the first chunk also holds the all-items column.
    from competency_gaps import robustness

    sal, items = synthetic(n_items=60)
    gaps = GapOptions(min_benchmarks=2, min_support=28, n_bootstrap=0)
    options = RobustnessOptions(n_resamples=15, seed=3)
    one_pass, summary = resampling_stability(sal, items, 40, options, gaps)
    monkeypatch.setattr(robustness, "_CHUNK_ELEMENTS", 40 * 4)  # 4 columns a pass: 16 columns in 4 passes
    passes, again = resampling_stability(sal, items, 40, options, gaps)
    assert_same_table(passes, one_pass)
    assert summary["chi_model_std"]["mean_filtered"] == pytest.approx(again["chi_model_std"]["mean_filtered"])


@pytest.mark.parametrize("bad", [{"keep_fraction": 0.0}, {"keep_fraction": 1.2}, {"n_resamples": 0},
                                 {"n_permutations": 0}, {"weak_fraction": 0.0}, {"dominated_quantile": 1.0},
                                 {"min_support": 0}, {"seed": -1}, {"n_resamples": True}])
def test_options_are_validated(bad):
    with pytest.raises(ValueError):
        RobustnessOptions(**bad)


# ---------------------------------------------------------------------------------------------------------
# Predictive validity


def test_split_halves_cover_each_scored_item_once():
    sal, items = synthetic(n_items=41, unscored=("b2",))
    halves = split_halves(items, seed=0)
    assert halves.height == 82 and set(halves["benchmark"]) == {"b0", "b1"}  # unscored items take no half
    counts = halves.group_by("benchmark", "half").len().sort("benchmark", "half")
    assert counts["len"].to_list() == [20, 21, 20, 21]
    assert halves.equals(split_halves(items, seed=0))
    assert not halves.equals(split_halves(items, seed=1))


def test_permutation_p_value_enumerated_by_hand():
    # Stratum x: scores (0, 1, 1), the 0 dominated; stratum y: scores (0, 0, 1, 1), one 0 dominated.
    # Labels are permuted within strata: 3 · 4 = 12 equally likely labelings. Effect = mean(dominated) −
    # mean(rest) grows with the dominated scores' sum S: observed S = 0 (effect 0 − 4/5 = −0.8), reached by
    # x's 0 (1 way) and either of y's 0s (2 ways): p = 2/12 = 1/6.
    # Adjusted: residuals against the stratum mean, x (−2/3, 1/3, 1/3), y (−1/2, −1/2, 1/2, 1/2); observed mean
    # residual of the dominated (−2/3 − 1/2)/2 = −7/12, again reached only in those 2 labelings (p = 1/6: one
    # p-value serves both effects). Within x alone: effect 0 − 1 = −1, adjusted −2/3, p = 1/3; within y:
    # effect 0 − 2/3, adjusted −1/2, p = 2/4.
    scores = np.array([0, 1, 1, 0, 0, 1, 1], dtype=float)
    dominated = np.array([1, 0, 0, 1, 0, 0, 0], dtype=bool)
    strata = np.array(["x"] * 3 + ["y"] * 4)
    exact = []
    for dx, dy in itertools.product(range(3), range(3, 7)):  # brute force, as a check on the hand count
        labels = np.zeros(7, bool)
        labels[[dx, dy]] = True
        exact.append(scores[labels].mean() - scores[~labels].mean())
    assert np.mean(np.array(exact) <= -0.8 + 1e-12) == pytest.approx(1 / 6)
    assert "adjusted_p_value" not in stratified_permutation_test(scores, dominated, strata, 10, 0).columns

    result = stratified_permutation_test(scores, dominated, strata, n_permutations=20000, seed=0)
    suite, x, y = (row(result, scope=s) for s in ("suite", "x", "y"))
    assert (suite["n_heldout"], suite["n_dominated"]) == (7, 2)
    assert suite["effect"] == pytest.approx(-0.8) and suite["adjusted_effect"] == pytest.approx(-7 / 12)
    assert suite["mean_score_dominated"] == 0 and suite["mean_score_rest"] == pytest.approx(0.8)
    assert suite["p_value"] == pytest.approx(1 / 6, abs=0.015)
    assert (x["effect"], x["adjusted_effect"]) == pytest.approx((-1.0, -2 / 3))
    assert (y["effect"], y["adjusted_effect"]) == pytest.approx((-2 / 3, -1 / 2))
    assert x["p_value"] == pytest.approx(1 / 3, abs=0.015) and y["p_value"] == pytest.approx(1 / 2, abs=0.015)
    again = stratified_permutation_test(scores, dominated, strata, n_permutations=20000, seed=0)
    assert result.equals(again)
    # Never 0: the observed labelling counts as one permutation, p >= 1 / (n + 1).
    tiny = stratified_permutation_test(scores, dominated, strata, n_permutations=3, seed=0)
    assert row(tiny, scope="suite")["p_value"] >= 0.25


def test_a_stratum_entirely_or_never_dominated_keeps_its_group_mean_but_has_no_test():
    # x: every item dominated (scores 0, 1, 0); y: none (1, 1, 0, 1); the suite compares them.
    scores = np.array([0, 1, 0, 1, 1, 0, 1], dtype=float)
    dominated = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    result = stratified_permutation_test(scores, dominated, np.array(["x"] * 3 + ["y"] * 4), 50, 0)
    x, y, suite = row(result, scope="x"), row(result, scope="y"), row(result, scope="suite")
    assert x["mean_score_dominated"] == pytest.approx(1 / 3) and x["mean_score_rest"] is None
    assert y["mean_score_dominated"] is None and y["mean_score_rest"] == pytest.approx(3 / 4)
    for stratum in (x, y):
        assert stratum["effect"] is None and stratum["adjusted_effect"] is None and stratum["p_value"] is None
    # Permuting within strata cannot move any label: every permutation is the observed one, p = 1.
    assert suite["effect"] == pytest.approx(1 / 3 - 3 / 4) and suite["adjusted_effect"] == pytest.approx(0.0)
    assert suite["p_value"] == 1.0


def test_planted_gap_helper_zeroes_exactly_the_items_where_the_concept_fires():
    sal, items = frames(
        {("x", "a", 7): 0.5, ("x", "b", 7): 0.0, ("x", "b", 1): 2.0, ("y", "c", 7): 1.0, ("y", "d", 7): 0.2,
         ("y", "e", 1): 1.0},
        {("x", "a"): 1.0, ("x", "b"): 1.0, ("y", "c"): 0.5, ("y", "d"): None, ("y", "e"): 1.0},
    )
    planted = plant_gap(items, sal, concept=7)
    assert planted.columns == items.columns and planted.height == items.height
    got = {(r["benchmark"], r["item_id"]): r["score"] for r in planted.iter_rows(named=True)}
    # a, c fire (-> 0); b's stored 0 is no firing; d is coverage-only and stays unscored; e has no concept 7.
    assert got == {("x", "a"): 0.0, ("x", "b"): 1.0, ("y", "c"): 0.0, ("y", "d"): None, ("y", "e"): 1.0}
    suite, _ = concept_suite_table(concept_benchmark_table(sal, planted, 8, NO_FILTER), sal, planted, 8, NO_FILTER)
    assert row(suite, concept=7)["chi_model"] == 0.0


def test_validity_finds_a_planted_gap():
    sal, items = synthetic(n_items=120, n_concepts=60, active=8, planted=0, p_correct=0.75, seed=1)
    items = plant_gap(items, sal, concept=0)
    table, summary = predictive_validity(sal, items, 60, RobustnessOptions(n_permutations=500, seed=0))
    for direction in ("A->B", "B->A"):
        suite = row(table, direction=direction, scope="suite")
        assert suite["n_weak_concepts"] == int(np.ceil(0.1 * suite["n_eligible_concepts"]))
        assert suite["weak_chi_threshold"] >= 0
        assert suite["effect"] < -0.4 and suite["adjusted_effect"] < -0.2
        assert suite["p_value"] <= 2 / 501
        assert 0.2 < suite["n_dominated"] / suite["n_heldout"] < 0.35  # top quartile of the weak share
        assert summary["directions"][direction]["effect"] == pytest.approx(suite["effect"])
    assert set(table["scope"]) == {"suite", "b0", "b1", "b2"}
    json.dumps(summary)


def test_validity_on_random_data_finds_nothing():
    # Scores independent of saliency: effects scatter around 0 (standard error ≈ 0.07 here) and the p-values
    # are about uniform. 20 data sets × 2 directions; the bounds are ~3.5 standard errors wide.
    effects, adjusted, p_values = [], [], []
    for seed in range(20):
        sal, items = synthetic(n_items=150, n_concepts=60, active=8, seed=100 + seed)
        table, _ = predictive_validity(sal, items, 60, RobustnessOptions(n_permutations=300, seed=seed))
        suite = table.filter(pl.col("scope") == "suite")
        effects += suite["effect"].to_list()
        adjusted += suite["adjusted_effect"].to_list()
        p_values += suite["p_value"].to_list()
    assert max(np.abs(effects)) < 0.25 and max(np.abs(adjusted)) < 0.25
    assert abs(np.mean(effects)) < 0.04 and abs(np.mean(adjusted)) < 0.04
    assert 0.3 < np.median(p_values) < 0.7 and np.mean(np.array(p_values) < 0.05) <= 0.15


def test_validity_is_deterministic_for_a_seed():
    sal, items = synthetic(n_items=80, n_concepts=50, active=6, seed=5)
    options = RobustnessOptions(n_permutations=200, seed=2)
    first, summary = predictive_validity(sal, items, 50, options)
    second, again = predictive_validity(sal, items, 50, options)
    assert first.equals(second) and summary == again
    other, _ = predictive_validity(sal, items, 50, RobustnessOptions(n_permutations=200, seed=3))
    assert not first.equals(other)


# ---------------------------------------------------------------------------------------------------------
# I/O entry point through the CLI


def write_shards(root: Path, sal: pl.DataFrame, items: pl.DataFrame) -> tuple[list[str], list[str], list[str]]:
    paths = ([], [], [])
    for benchmark in sorted(items["benchmark"].unique()):
        shard = root / f"extract/model=m/benchmark={benchmark}/layer=3"
        rows = sal.filter(pl.col("benchmark") == benchmark)
        saliency_rows = [{"item_id": r["item_id"], "concept": r["concept"], "saliency": r["saliency"],
                          "max_activation": r["saliency"], "active_tokens": 1} for r in rows.iter_rows(named=True)]
        own = items.filter(pl.col("benchmark") == benchmark)
        tokens = [{"item_id": i, "counted_tokens": 5, "total_tokens": 5, "read_tokens": 5, "truncated": False,
                   "skipped": None} for i in own["item_id"]]
        scores = [{"item_id": r["item_id"], "scoring": "x", "score": r["score"]} for r in own.iter_rows(named=True)]
        score_path = root / f"evaluate/model=m/benchmark={benchmark}/scores.parquet"
        write_parquet(table_from_rows(saliency_rows, SALIENCY), shard / "saliency.parquet", SALIENCY)
        write_parquet(table_from_rows(tokens, ITEM_TOKENS), shard / "item_tokens.parquet", ITEM_TOKENS)
        write_parquet(table_from_rows(scores, SCORES), score_path, SCORES)
        for kind, path in zip(paths, (shard / "saliency.parquet", shard / "item_tokens.parquet", score_path)):
            kind.append(str(path))
    return paths


def cli_runner(root: Path, sal: pl.DataFrame, items: pl.DataFrame, n_concepts: int, config: dict):
    """Shards of (sal, items) and an SAE folder under `root`; returns a function running the stage's CLI on them
    into a folder (extra arguments appended)."""
    saliency, tokens, scores = write_shards(root, sal, items)
    sae_dir = root / "sae"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text(json.dumps({"d_sae": n_concepts}))
    spec = json.dumps({"version": 1, "config": config})

    def run(out: Path, *extra: str) -> None:
        main(["robustness", "--spec", spec, "--sae-dir", str(sae_dir), "--saliency", *saliency, "--tokens", *tokens,
              "--scores", *scores, "--out-dir", str(out), *extra])

    return run


def test_cli_writes_the_tables_and_summaries(tmp_path):
    sal, items = synthetic(n_items=50, n_concepts=30, active=5)
    run = cli_runner(tmp_path, sal, items, 30, {
        "robustness": {"n_resamples": 5, "n_permutations": 50, "seed": 0},
        "gaps": {"pooling": "pooled", "min_benchmarks": 2, "min_support": 10}})
    out = tmp_path / "robustness"
    run(out, "--figures", "--title", "model m, layer 3")
    for name in ("stability", "validity"):  # the figures beside their tables
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / f"{name}.svg").read_text()
    stability = pl.read_parquet(out / "stability.parquet")
    assert stability.height == 30 and stability["concept"].to_list() == list(range(30))
    assert json.loads((out / "stability.json").read_text())["n_resamples"] == 5
    validity = pl.read_parquet(out / "validity.parquet")
    assert set(validity["direction"]) == {"A->B", "B->A"}
    summary = json.loads((out / "validity.json").read_text())
    assert summary["options"]["n_permutations"] == 50 and "dominance" in summary
    expected, _ = resampling_stability(sal, items, 30, RobustnessOptions(n_resamples=5, n_permutations=50),
                                       GapOptions(min_benchmarks=2, min_support=10))
    assert np.allclose(stability["chi_model_std"].to_numpy(), expected["chi_model_std"].to_numpy(), equal_nan=True)


def test_cli_reads_the_shards_batch_by_batch_to_the_same_tables(tmp_path, monkeypatch):
    # The stage streams every shard (reduce.ShardBatches) on each pass instead of holding its rows: batches of
    # 7 rows, several per item and crossing items, give the tables of one batch per shard.
    from competency_gaps import reduce

    sal, items = synthetic(n_items=40, n_concepts=30, active=5, seed=4)
    run = cli_runner(tmp_path, sal, items, 30, {
        "robustness": {"n_resamples": 20, "n_permutations": 50, "min_support": 2},
        "gaps": {"pooling": "pooled", "min_benchmarks": 2, "min_support": 5}})

    def tables(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
        run(out)
        return pl.read_parquet(out / "stability.parquet"), pl.read_parquet(out / "validity.parquet")

    whole = tables(tmp_path / "whole")
    heights = []
    original = reduce.ShardBatches.__iter__

    def recorded(self):
        for batch in original(self):
            heights.append(batch.height)
            yield batch

    monkeypatch.setattr(reduce, "BATCH_ROWS", 7)
    monkeypatch.setattr(reduce.ShardBatches, "__iter__", recorded)
    batched = tables(tmp_path / "batched")
    assert max(heights) == 7 and len(heights) > 3 * sal.height // 7  # every pass re-reads the shards in batches
    for expected, got in zip(whole, batched):
        assert_same_table(got, expected)
    assert whole[1]["n_weak_concepts"].min() > 0  # the validity test ran


def test_rows_in_any_order_and_batches_give_the_same_tables_and_duplicates_are_found_across_batches():
    from competency_gaps.robustness import _prepare, _stability, _validity

    sal, items = synthetic(n_items=30, n_concepts=25, active=4, seed=6)
    options = RobustnessOptions(n_resamples=10, n_permutations=40, min_support=2)
    expected_stability, _ = resampling_stability(sal, items, 25, options, NO_FILTER)
    expected_validity, _ = predictive_validity(sal, items, 25, options)

    def batches(frame: pl.DataFrame, size: int) -> dict[str, list[pl.DataFrame]]:
        shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)  # not extraction's order
        return {name: [part.slice(start, size).drop("benchmark") for start in range(0, part.height, size)]
                for (name,), part in shuffled.partition_by("benchmark", as_dict=True).items()}

    suite = _prepare(batches(sal, 5), items, 25)
    stability, _ = _stability(suite, options, NO_FILTER)
    validity, _, _ = _validity(suite, options)
    assert_same_table(stability, expected_stability)
    assert_same_table(validity, expected_validity)
    first = sal.head(1)
    doubled = pl.concat([sal, first])  # the copy lands in another batch than the original
    with pytest.raises(ValueError, match="duplicate"):
        _prepare(batches(doubled, 5), items, 25)


NASTY = "carry | borrow\nin `sums` <script>alert(1)</script>"


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """The data rows (cells split at the pipes no backslash escapes) of every Markdown table in `text`, keyed
    by the heading above it."""
    tables, heading, rows = {}, None, []
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line
        elif line.startswith("|"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif rows:
            assert all(len(row) == len(rows[0]) for row in rows), rows  # no label breaks a row
            tables[heading], rows = rows[2:], []  # header and delimiter rows dropped
    return tables


def weak_by_hand(sal: pl.DataFrame, items: pl.DataFrame, train: int, options: RobustnessOptions) -> list[int]:
    """The validity test's weak concepts of the direction trained on half `train`, weakest first."""
    half = split_halves(items, options.seed).filter(pl.col("half") == train)
    rows = sal.join(half, on=["benchmark", "item_id"]).join(items, on=["benchmark", "item_id"])
    chi = rows.group_by("concept").agg(n=pl.len(), chi=(pl.col("saliency") * pl.col("score")).sum()
                                       / pl.col("saliency").sum())
    eligible = chi.filter(pl.col("n") >= options.min_support).sort("chi", "concept")
    return eligible["concept"].head(math.ceil(options.weak_fraction * eligible.height - 1e-9)).to_list()


def test_robustness_markdown_names_the_concepts_with_their_labels(tmp_path):
    from competency_gaps.figure_data import concept_markdown
    from competency_gaps.robustness import run_robustness
    from competency_gaps.tables import LABELS

    sal, items = synthetic(n_items=60, n_concepts=30, active=5)
    saliency, tokens, scores = write_shards(tmp_path, sal, items)
    labels = {c: f"c{c} {NASTY}" + (" long" * 20 if c % 2 else "") for c in range(29)}  # 29: never fired
    rows = [{"concept": c, "live": c in labels, "label": labels.get(c), "n_detection": 0} for c in range(30)]
    write_parquet(table_from_rows(rows, LABELS), tmp_path / "labels.parquet", LABELS)
    options = {"n_resamples": 5, "n_permutations": 50, "seed": 0, "weak_fraction": 0.2}
    gaps = {"min_benchmarks": 2, "min_support": 10}
    run_robustness(saliency, tokens, scores, 30, options, gaps, tmp_path / "labelled",
                   labels_path=str(tmp_path / "labels.parquet"), title="model m, layer 3")
    run_robustness(saliency, tokens, scores, 30, options, gaps, tmp_path / "plain")

    text = (tmp_path / "labelled" / "robustness.md").read_text()
    assert text.startswith("# Robustness — model m, layer 3\n")
    assert "<script>" not in text and "\\<script\\>" in text
    tables = markdown_tables(text)
    stability = pl.read_parquet(tmp_path / "labelled" / "stability.parquet")
    top = stability.filter(pl.col("passes_support_filter") & pl.col("chi_model").is_not_null()).sort(
        "chi_model", "concept").head(25)
    (stability_rows,) = [rows for heading, rows in tables.items() if "Resampling stability" in heading]
    assert [row[1] for row in stability_rows] == [concept_markdown(c, labels) for c in top["concept"]]
    assert stability_rows[0][1].startswith(f"#{top['concept'][0]} c{top['concept'][0]} carry \\| borrow in")
    assert stability_rows[0][4] == f"{top['chi_model_std'][0]:.3f}"
    validity = pl.read_parquet(tmp_path / "labelled" / "validity.parquet").filter(pl.col("scope") == "suite")
    robustness = RobustnessOptions(**options)
    for direction, train in (("A→B", 0), ("B→A", 1)):
        (weak_rows,) = [rows for heading, rows in tables.items() if heading.startswith(f"### {direction}")]
        weak = weak_by_hand(sal, items, train, robustness)
        assert len(weak) == validity["n_weak_concepts"][train] > 0
        assert [row[1] for row in weak_rows] == [concept_markdown(c, labels) for c in weak]

    plain = (tmp_path / "plain" / "robustness.md").read_text()  # without labels: ids only, same tables
    assert "carry" not in plain and f"| 1 | #{top['concept'][0]} | " in plain
    assert [len(rows) for rows in markdown_tables(plain).values()] == [len(rows) for rows in tables.values()]


def test_coverage_only_suite_has_no_chi_model_spread_and_no_validity_test():
    sal, items = synthetic(n_benchmarks=2, n_items=20, n_concepts=10, active=3, unscored=("b0", "b1"))
    table, summary = resampling_stability(sal, items, 10, RobustnessOptions(n_resamples=4), NO_FILTER)
    assert table["chi_model_std"].null_count() == 10 and (table["n_runs_chi_model"] == 0).all()
    assert table["chi_bench_std"].null_count() == 0 and summary["chi_model_std"]["n_defined"] == 0
    assert summary["chi_model_std"]["mean_defined"] is None
    validity, _ = predictive_validity(sal, items, 10, RobustnessOptions(n_permutations=10))
    assert validity["scope"].to_list() == ["suite", "suite"] and validity["n_heldout"].to_list() == [0, 0]
    assert validity["effect"].null_count() == 2 and validity["n_weak_concepts"].to_list() == [0, 0]


@pytest.mark.parametrize("bad, message", [
    ({("x", "a", 0): -1.0}, ">= 0"),
    ({("x", "a", 9): 1.0}, "concept indices"),
    ({("x", "zz", 0): 1.0}, "missing from `items`"),
])
def test_saliency_is_validated_as_the_reducer_does(bad, message):
    sal, items = frames(bad, {("x", "a"): 1.0})
    with pytest.raises(ValueError, match=message):
        resampling_stability(sal, items, 3, RobustnessOptions(n_resamples=1), NO_FILTER)
    doubled = pl.concat([frames({("x", "a", 0): 1.0}, {})[0]] * 2)
    with pytest.raises(ValueError, match="duplicate"):
        predictive_validity(doubled, items, 3, RobustnessOptions())
