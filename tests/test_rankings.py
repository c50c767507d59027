"""Support-aware concept rankings (rankings.py): benchmark-adjusted and shrunk chi_model, worked out by hand."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from competency_gaps.concepts import (
    GapOptions,
    concept_benchmark_table,
    concept_suite_table,
    frame_batches,
    gap_statistics,
    summary_markdown,
)
from competency_gaps.rankings import (
    KAPPA_MAX,
    RANKINGS,
    benchmark_means,
    benchmark_spread,
    estimate_shrinkage_strength,
    rank_concepts,
    sampling_terms,
    shrunk_chi_model,
)

SALIENCY_SCHEMA = {"benchmark": pl.String, "item_id": pl.String, "concept": pl.Int32, "saliency": pl.Float32}
ITEMS_SCHEMA = {"benchmark": pl.String, "item_id": pl.String, "score": pl.Float64}


def frames(saliency_rows, item_rows) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (pl.DataFrame(saliency_rows, schema=SALIENCY_SCHEMA, orient="row"),
            pl.DataFrame(item_rows, schema=ITEMS_SCHEMA, orient="row"))


def value(frame: pl.DataFrame, concept: int, column: str, benchmark: str | None = None):
    rows = frame.filter(pl.col("concept") == concept)
    if benchmark is not None:
        rows = rows.filter(pl.col("benchmark") == benchmark)
    return rows[column].item()


def tables(saliency, items, n_concepts, options):
    table = concept_benchmark_table(saliency, items, n_concepts, options)
    suite, thresholds = concept_suite_table(table, saliency, items, n_concepts, options)
    return table, suite, thresholds


# ------------------------------------------------------------------------------------ benchmark-adjusted

# Easy benchmark E: e1..e4 score 1, 1, 1, 0 -> p̄_E = 0.75.
# Hard benchmark H: h1..h4 score 1, 0, 0, 0 -> p̄_H = 0.25; h5 has no score (it must not move p̄_H).
# c0 fires only on H, with saliency 1 on h1..h4 (and h5): the model gets its items at H's average rate.
# c1: e1 (s=2, p=1), e4 (s=2, p=0), h1 (s=1, p=1). c2 never fires.
TWO_BENCHMARK_ITEMS = [("E", "e1", 1.0), ("E", "e2", 1.0), ("E", "e3", 1.0), ("E", "e4", 0.0),
                       ("H", "h1", 1.0), ("H", "h2", 0.0), ("H", "h3", 0.0), ("H", "h4", 0.0), ("H", "h5", None)]
TWO_BENCHMARK_SALIENCY = [("H", f"h{i}", 0, 1.0) for i in range(1, 6)] + [
    ("E", "e1", 1, 2.0), ("E", "e4", 1, 2.0), ("H", "h1", 1, 1.0)]
NO_BOOT = GapOptions(n_bootstrap=0)


def test_benchmark_means_use_scored_items_only():
    _, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS + [("U", "u1", None)])
    means = benchmark_means(items).sort("benchmark")
    assert means["benchmark"].to_list() == ["E", "H", "U"]
    assert means["benchmark_mean"].to_list() == [0.75, 0.25, None]  # U has no scored item: no mean


def test_concept_on_a_hard_benchmark_at_its_average_rate_is_adjusted_to_zero():
    table, suite, _ = tables(*frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS), 3, NO_BOOT)
    # c0: plain chi_model (1 + 0 + 0 + 0) / 4 = 0.25 looks weak, but H predicts 0.25: adjusted 0.
    assert value(suite, 0, "chi_model") == pytest.approx(0.25)
    assert value(suite, 0, "chi_model_prior") == pytest.approx(0.25)
    assert value(suite, 0, "chi_model_adjusted") == pytest.approx(0.0)
    assert value(table, 0, "chi_model_adjusted", "H") == pytest.approx(0.0)
    assert value(table, 0, "chi_model_adjusted", "E") is None  # never fires in E
    # c1 pooled: chi = (2·1 + 2·0 + 1·1) / 5 = 0.6; prior m = (2·0.75 + 2·0.75 + 1·0.25) / 5 = 0.65;
    # adjusted = Σ s (p − p̄) / Σ s = (2·0.25 + 2·(−0.75) + 1·0.75) / 5 = −0.05 = chi − m.
    assert value(suite, 1, "chi_model") == pytest.approx(0.6)
    assert value(suite, 1, "chi_model_prior") == pytest.approx(0.65)
    assert value(suite, 1, "chi_model_adjusted") == pytest.approx(-0.05)
    # Per benchmark: E chi (2 + 0) / 4 = 0.5 -> 0.5 − 0.75 = −0.25; H chi 1 -> 1 − 0.25 = 0.75.
    assert value(table, 1, "chi_model_adjusted", "E") == pytest.approx(-0.25)
    assert value(table, 1, "chi_model_adjusted", "H") == pytest.approx(0.75)
    # c2 never fires: null everywhere (never NaN, never 0).
    for column in ("chi_model_prior", "chi_model_adjusted", "chi_model_shrunk"):
        assert value(suite, 2, column) is None
    assert table.filter(pl.col("concept") == 2)["chi_model_adjusted"].null_count() == 2
    assert not suite["chi_model_adjusted"].is_nan().any() and not table["chi_model_adjusted"].is_nan().any()


def test_adjusted_with_mean_pooling_is_the_mean_of_per_benchmark_adjustments():
    _, suite, _ = tables(*frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS), 3,
                         GapOptions(n_bootstrap=0, pooling="mean"))
    # c1: chi = (0.5 + 1) / 2 = 0.75; prior = (0.75 + 0.25) / 2 = 0.5; adjusted = (−0.25 + 0.75) / 2 = 0.25.
    assert value(suite, 1, "chi_model") == pytest.approx(0.75)
    assert value(suite, 1, "chi_model_prior") == pytest.approx(0.5)
    assert value(suite, 1, "chi_model_adjusted") == pytest.approx(0.25)
    assert value(suite, 0, "chi_model_adjusted") == pytest.approx(0.0)


def test_new_columns_are_appended_after_the_existing_ones():
    table, suite, _ = tables(*frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS), 3, NO_BOOT)
    assert suite.columns[-4:] == ["chi_model_adjusted", "chi_model_prior", "chi_model_shrunk", "chi_model_shrunk_adjusted"]
    assert suite.columns[:4] == ["concept", "chi_bench", "chi_model", "chi_model_lo"]
    assert suite.columns[13] == "passes_support_filter"
    assert table.columns[-1] == "chi_model_adjusted" and table.columns[-2] == "chi_model_hi"


# ------------------------------------------------------------------------------------------ shrinkage


def shrink_frame(rows) -> pl.DataFrame:
    """Suite rows (concept, chi_model, prior m, scored ESS n), each concept on n equally salient items of one
    large benchmark whose scores vary as Bernoulli(m): the classical case, where the sampling terms are
    null_variance m(1 − m)/n, own_share 1 and item_variance m(1 − m)."""
    return with_classical_terms(pl.DataFrame(rows, schema={
        "concept": pl.Int32, "chi_model": pl.Float64, "chi_model_prior": pl.Float64, "scored_ess": pl.Float64},
        orient="row"))


def with_classical_terms(frame: pl.DataFrame) -> pl.DataFrame:
    variance = pl.col("chi_model_prior") * (1 - pl.col("chi_model_prior"))
    return frame.with_columns(null_variance=variance / pl.col("scored_ess"), own_share=pl.lit(1.0),
                              item_variance=variance)


def test_shrinkage_formula_with_a_fixed_strength():
    frame = shrink_frame([(0, 0.0, 0.5, 2.0), (1, 0.2, 0.5, 200.0), (2, None, None, None)])
    shrunk = frame.select(shrunk_chi_model(10.0))["chi_model_shrunk"].to_list()
    # (n·chi + κ·m) / (n + κ): (2·0 + 10·0.5) / 12 = 5/12; (200·0.2 + 10·0.5) / 210 = 45/210.
    assert shrunk[:2] == pytest.approx([5 / 12, 45 / 210])
    assert shrunk[2] is None


def test_fixed_strength_in_the_tables_and_thresholds():
    options = GapOptions(n_bootstrap=0, shrinkage_strength=2.0)
    _, suite, thresholds = tables(*frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS), 3, options)
    assert thresholds["shrinkage_strength"] == 2.0 and thresholds["ranking"] == "shrunk_adjusted"
    # c1: scored ESS = 5² / (4 + 4 + 1) = 25/9; shrunk = (25/9 · 0.6 + 2 · 0.65) / (25/9 + 2) = 26.7 / 43.
    assert value(suite, 1, "scored_ess") == pytest.approx(25 / 9)
    assert value(suite, 1, "chi_model_shrunk") == pytest.approx(26.7 / 43)
    assert value(suite, 0, "chi_model_shrunk") == pytest.approx(0.25)  # chi = prior: nothing to move


def test_strength_estimate_by_the_method_of_moments():
    # (chi, m, n):  A (0.1, 0.5, 4)  B (0.9, 0.5, 4)  C (0.5, 0.2, 2)  D (0.2, 0.2, 1); E has no chi_model.
    # d² = (chi − m)²: 0.16, 0.16, 0.09, 0;  σ² = m(1 − m)/n: 0.0625, 0.0625, 0.08, 0.16;  g² V = m(1 − m).
    # mean (d² − σ²)     = (0.0975 + 0.0975 + 0.01 − 0.16) / 4   = 0.01125
    # mean (g² V − σ²)   = (0.1875 + 0.1875 + 0.08 + 0) / 4       = 0.11375
    # λ = 0.01125 / 0.11375 and κ = 1/λ − 1 = 91/9 − 1 = 82/9.
    frame = shrink_frame([(0, 0.1, 0.5, 4.0), (1, 0.9, 0.5, 4.0), (2, 0.5, 0.2, 2.0), (3, 0.2, 0.2, 1.0),
                          (4, None, None, None)])
    assert estimate_shrinkage_strength(frame) == pytest.approx(82 / 9)


def test_strength_estimate_recovers_a_simulated_beta_binomial():
    """θ_c ~ Beta(κ m_c, κ (1 − m_c)) with κ = 20, chi_c = mean of 40 Bernoulli(θ_c) draws: κ̂ lands near 20."""
    rng = np.random.default_rng(0)
    m = rng.uniform(0.2, 0.8, size=4000)
    theta = rng.beta(20 * m, 20 * (1 - m))
    chi = rng.binomial(40, theta) / 40
    frame = with_classical_terms(pl.DataFrame({"concept": np.arange(4000), "chi_model": chi, "chi_model_prior": m,
                                               "scored_ess": np.full(4000, 40.0)}))
    assert estimate_shrinkage_strength(frame) == pytest.approx(20, rel=0.15)


def test_no_spread_beyond_noise_shrinks_everything_to_the_prior():
    # chi = m for every concept: mean (d² − σ²) = −mean m(1−m)/n < 0 -> κ = ∞, clamped to KAPPA_MAX.
    frame = shrink_frame([(0, 0.5, 0.5, 4.0), (1, 0.2, 0.2, 10.0), (2, 0.7, 0.7, 3.0)])
    assert estimate_shrinkage_strength(frame) == KAPPA_MAX
    # Spread exactly at the noise level: (chi − m)² = m(1 − m)/n for each concept -> λ = 0, same answer.
    frame = shrink_frame([(0, 1.0, 0.5, 1.0), (1, 0.0, 0.5, 1.0), (2, 0.25, 0.5, 4.0), (3, 0.75, 0.5, 4.0)])
    assert estimate_shrinkage_strength(frame) == KAPPA_MAX
    assert np.isfinite(KAPPA_MAX) and KAPPA_MAX >= 1e9
    shrunk = shrink_frame([(0, 0.0, 0.5, 200.0)]).select(shrunk_chi_model(KAPPA_MAX))["chi_model_shrunk"].item()
    assert shrunk == pytest.approx(0.5, abs=1e-6)


def test_strength_estimate_degenerate_cases():
    assert estimate_shrinkage_strength(shrink_frame([(0, None, None, None)])) is None  # nothing rated
    # Every concept rests on one item (n = 1): between-concept spread cannot be told from noise.
    assert estimate_shrinkage_strength(shrink_frame([(0, 1.0, 0.5, 1.0), (1, 0.0, 0.3, 1.0)])) == KAPPA_MAX
    # Benchmarks all at 0 or 1: m(1 − m) = 0 and chi = m.
    assert estimate_shrinkage_strength(shrink_frame([(0, 1.0, 1.0, 5.0), (1, 0.0, 0.0, 3.0)])) == KAPPA_MAX
    # Spread at the Bernoulli maximum (every θ is 0 or 1): λ = 1 -> no shrinkage, κ = 0.
    # (0, 0.5, 2), (1, 0.5, 2): λ = (0.25 − 0.125) / (0.25 − 0.125) = 1 -> κ = 1/1 − 1 = 0.
    frame = shrink_frame([(0, 0.0, 0.5, 2.0), (1, 1.0, 0.5, 2.0)])
    assert estimate_shrinkage_strength(frame) == 0.0
    assert frame.select(shrunk_chi_model(0.0))["chi_model_shrunk"].to_list() == [0.0, 1.0]
    # Beyond it (chi 1 where m = 0.2): λ = (0.64 − 0.08) / (0.16 − 0.08) = 7 -> κ = 1/7 − 1 < 0, clamped to 0.
    assert estimate_shrinkage_strength(shrink_frame([(0, 1.0, 0.2, 2.0), (1, 1.0, 0.2, 2.0)])) == 0.0


def test_estimated_strength_goes_into_thresholds():
    saliency, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS)
    table, suite, thresholds = tables(saliency, items, 3, NO_BOOT)
    terms = sampling_terms(gap_sums(saliency, items), benchmark_spread(items), "pooled")
    expected = estimate_shrinkage_strength(suite.join(terms, on="concept", how="left"))
    assert thresholds["shrinkage_strength"] == pytest.approx(expected)
    assert isinstance(thresholds["shrinkage_strength"], float)


def gap_sums(saliency: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    return gap_statistics(frame_batches(saliency), items, 3, NO_BOOT).sums


def test_benchmark_spread_is_the_sample_variance_of_scored_items():
    _, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS + [("U", "u1", None), ("V", "v1", 0.5)])
    spread = benchmark_spread(items).sort("benchmark")
    assert spread["n_scored"].to_list() == [4, 4, 0, 1]  # h5 and u1 have no score
    # E: 1, 1, 1, 0 -> Σ (p − 0.75)² / 3 = 0.75 / 3; H likewise; U and V have fewer than two scores.
    assert spread["score_variance"].to_list() == pytest.approx([0.25, 0.25, 0.0, 0.0])


@pytest.mark.parametrize("pooling", ["pooled", "mean"])
def test_sampling_terms_by_hand(pooling):
    # E and H: N = 4 scored items each, v = 0.25. c1: E (S 4, Q 8, n 2), H (S 1, Q 1, n 1).
    # pooled a = (4/5, 1/5); mean a = (1/2, 1/2).
    #   null_variance = Σ a² v (Q/S² − 1/N): pooled 0.64·0.25·0.25 + 0.04·0.25·0.75 = 0.0475;
    #                                        mean   0.25·0.25·0.25 + 0.25·0.25·0.75 = 0.0625
    #   own_share = Σ a (1 − n/N):           pooled 0.8·0.5 + 0.2·0.75 = 0.55;  mean 0.5·0.5 + 0.5·0.75 = 0.625
    # c0 covers all of H's scored items with equal saliency: its adjusted value is 0 whatever the scores, so
    # both its noise and its own share are 0. c2 never fires: no row.
    saliency, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS)
    terms = sampling_terms(gap_sums(saliency, items), benchmark_spread(items), pooling).sort("concept")
    assert terms["concept"].to_list() == [0, 1]
    expected = {"pooled": (0.0475, 0.55), "mean": (0.0625, 0.625)}[pooling]
    assert terms.row(1)[1:] == pytest.approx((*expected, 0.25))
    assert terms.row(0)[1:] == pytest.approx((0.0, 0.0, 0.25))


def test_strength_estimate_recovers_concept_shifts_across_mixed_benchmarks():
    """Items of an easy (0.8) and a hard (0.2) benchmark; each of 1,200 concepts owns 15 items of each and shifts
    their success rate by δ_c ~ N(0, λ·0.16), λ = 1/21 (κ = 20). A concept's prior is 0.5, so m(1 − m) = 0.25,
    but its items vary as 0.16: reading the noise off m(1 − m) would overstate it and estimate κ ≈ 55."""
    rng = np.random.default_rng(7)
    n_concepts, per_benchmark, kappa = 1200, 15, 20.0
    shift = rng.normal(0.0, np.sqrt(0.16 / (kappa + 1)), size=n_concepts)
    saliency, items = [], []
    for benchmark, rate in (("easy", 0.8), ("hard", 0.2)):
        success = np.clip(rate + np.repeat(shift, per_benchmark), 0, 1)
        scores = rng.random(success.size) < success
        for index, (concept, score) in enumerate(zip(np.repeat(np.arange(n_concepts), per_benchmark), scores)):
            items.append((benchmark, f"{benchmark}{index}", float(score)))
            saliency.append((benchmark, f"{benchmark}{index}", int(concept), 1.0))
    saliency, items = frames(saliency, items)
    _, _, thresholds = tables(saliency, items, n_concepts, NO_BOOT)
    assert thresholds["shrinkage_strength"] == pytest.approx(kappa, rel=0.25)


# ------------------------------------------------------------------------------------------- rankings

# One benchmark of 400 items, mean 0.5: items 0..199 score 1 for 0..39, else 0; items 200..399 score 1 for
# 200..359, else 0. The broad concept (index 30) fires on items 0..199 with equal saliency: chi 0.2, ESS 200.
N_ITEMS = 400
BROAD = 30


def motivating_items() -> list[tuple]:
    return [("G", f"g{i}", 1.0 if i < 40 or 200 <= i < 360 else 0.0) for i in range(N_ITEMS)]


def motivating_frame() -> pl.DataFrame:
    """The issue's case as a suite frame: 30 concepts on 2 items with chi 0, one broad concept with chi 0.2."""
    rows = [(c, 0.0, 0.5, 2.0) for c in range(30)] + [(BROAD, 0.2, 0.5, 200.0)]
    return shrink_frame(rows).with_columns(chi_model_lo=pl.lit(None, pl.Float64), chi_model_hi=pl.lit(None, pl.Float64))


def test_point_ranks_narrow_concepts_first_and_shrunk_the_broad_one():
    frame = motivating_frame().with_columns(shrunk_chi_model(10.0))
    point = rank_concepts(frame, "point")["concept"].to_list()
    assert point[:30] == list(range(30)) and point[30] == BROAD
    # shrunk: narrow (2·0 + 10·0.5) / 12 = 0.417 > broad (200·0.2 + 10·0.5) / 210 = 0.214.
    assert rank_concepts(frame, "shrunk")["concept"].to_list()[0] == BROAD
    assert rank_concepts(frame, "shrunk", strongest=True)["concept"].to_list()[-1] == BROAD


def motivating_population() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The broad concept, 30 narrow concepts at chi 0 (two items scored 0), and, as in a real run, the rest of
    the narrow concepts around the benchmark mean: 60 at 0.5 (one item 1, one 0) and 30 at 1 (two items 1).
    Narrow concepts reuse items; saliency 1 everywhere."""
    zeros = [i for i in range(N_ITEMS) if i >= 40 and not 200 <= i < 360]  # items scored 0
    ones = [i for i in range(N_ITEMS) if i < 40 or 200 <= i < 360]
    saliency = [("G", f"g{i}", BROAD, 1.0) for i in range(200)]
    pairs = ([(zeros[2 * k], zeros[2 * k + 1]) for k in range(30)] + [(ones[k], zeros[k]) for k in range(60)]
             + [(ones[2 * k], ones[2 * k + 1]) for k in range(30)])
    narrow = [c for c in range(121) if c != BROAD]  # 0..29 at chi 0, 31..90 at 0.5, 91..120 at 1
    for concept, pair in zip(narrow, pairs, strict=True):
        saliency += [("G", f"g{i}", concept, 1.0) for i in pair]
    return frames(saliency, motivating_items())


def test_motivating_case_end_to_end_with_an_estimated_strength():
    saliency, items = motivating_population()
    base = {"n_bootstrap": 0, "min_benchmarks": 1, "min_support": 1}
    _, suite, thresholds = tables(saliency, items, 121, GapOptions(**base, ranking="point"))
    assert value(suite, BROAD, "chi_model") == pytest.approx(0.2)
    assert value(suite, BROAD, "scored_ess") == pytest.approx(200)
    assert value(suite, 0, "chi_model") == 0.0 and value(suite, 0, "scored_support") == 2
    # The 120 narrow concepts scatter around 0.5 exactly as two Bernoulli(0.5) draws would: the spread is
    # noise, so κ is large and the narrow zeros shrink towards 0.5. By hand (v = 0.25 · 400/399, N = 400):
    # narrow σ² = v (1/2 − 1/N), g = 1 − 2/N, d² 0.25 for the 60 at 0 or 1 and 0 for the 60 at 0.5;
    # broad σ² = v (1/200 − 1/N), g = 1/2, d² = 0.09.
    v, n = 0.25 * 400 / 399, 400
    excess = (60 * 0.25 - 120 * v * (1 / 2 - 1 / n) + 0.09 - v * (1 / 200 - 1 / n)) / 121
    room = (120 * ((1 - 2 / n) ** 2 * v - v * (1 / 2 - 1 / n)) + 0.25 * v - v * (1 / 200 - 1 / n)) / 121
    assert thresholds["shrinkage_strength"] == pytest.approx(room / excess - 1, rel=1e-6)
    point = rank_concepts(suite.filter(pl.col("chi_model").is_not_null()), "point")["concept"].to_list()
    assert sorted(point[:30]) == list(range(30)) and point[30] == BROAD
    shrunk = rank_concepts(suite.filter(pl.col("chi_model").is_not_null()), "shrunk")["concept"].to_list()
    assert shrunk[0] == BROAD
    # And the summary's weakest list follows the configured ranking.
    _, suite, thresholds = tables(saliency, items, 121, GapOptions(**base))  # default ranking: shrunk
    weakest = summary_markdown(suite, concept_benchmark_table(saliency, items, 121, GapOptions(**base)), thresholds)
    weakest = weakest.split("### Model gaps")[1].split("###")[0]
    assert weakest.split("\n|---")[1].split("\n")[1].startswith(f"| {BROAD} | 0.200 |")


def interval_frame() -> pl.DataFrame:
    # c0 chi 0.1 [0.0, 0.6] (wide); c1 0.3 [0.25, 0.35]; c2 0.2 no interval; c3 0.5 [0.45, 0.55];
    # c4 0.4 [0.3, 0.35] (ties c1 on the upper bound, higher chi_model).
    return pl.DataFrame(
        [(0, 0.1, 0.0, 0.6), (1, 0.3, 0.25, 0.35), (2, 0.2, None, None), (3, 0.5, 0.45, 0.55), (4, 0.4, 0.3, 0.35)],
        schema={"concept": pl.Int32, "chi_model": pl.Float64, "chi_model_lo": pl.Float64,
                "chi_model_hi": pl.Float64},
        orient="row",
    )


def test_lower_bound_ranking():
    frame = interval_frame()
    # Weakest: ascending upper bound (c1/c4 tie at 0.35, broken by chi_model), no interval last.
    assert rank_concepts(frame, "lower_bound")["concept"].to_list() == [1, 4, 3, 0, 2]
    # Strongest: descending lower bound, no interval last.
    assert rank_concepts(frame, "lower_bound", strongest=True)["concept"].to_list() == [3, 4, 1, 0, 2]
    assert rank_concepts(frame, "point")["concept"].to_list() == [0, 2, 1, 4, 3]
    assert rank_concepts(frame, "point", strongest=True)["concept"].to_list() == [3, 4, 1, 2, 0]


def test_ties_break_by_concept_and_unknown_ranking_is_rejected():
    frame = shrink_frame([(2, 0.5, 0.5, 1.0), (0, 0.5, 0.5, 1.0), (1, 0.5, 0.5, 1.0)])
    assert rank_concepts(frame, "point")["concept"].to_list() == [0, 1, 2]
    assert rank_concepts(frame, "point", strongest=True)["concept"].to_list() == [0, 1, 2]
    with pytest.raises(ValueError, match="ranking"):
        rank_concepts(frame, "median")
    assert RANKINGS == ("shrunk_adjusted", "shrunk", "lower_bound", "point")


# ------------------------------------------------------------------------------------- options, summary


@pytest.mark.parametrize("bad", [{"ranking": "median"}, {"ranking": None}, {"shrinkage_strength": 0},
                                 {"shrinkage_strength": -1.0}, {"shrinkage_strength": True},
                                 {"shrinkage_strength": float("nan")}, {"shrinkage_strength": float("inf")},
                                 {"shrinkage_strength": "10"}])
def test_ranking_options_are_validated(bad):
    with pytest.raises(ValueError):
        GapOptions(**bad)


def test_ranking_option_defaults():
    options = GapOptions()
    assert (options.ranking, options.shrinkage_strength) == ("shrunk_adjusted", None)
    assert GapOptions(shrinkage_strength=5).shrinkage_strength == 5
    assert GapOptions(ranking="lower_bound").ranking == "lower_bound"


@pytest.mark.parametrize("ranking, phrase", [
    ("shrunk_adjusted", "ordered by shrunk adjusted chi_model (gaps.ranking = shrunk_adjusted"),
    ("shrunk", "ordered by shrunk chi_model (gaps.ranking = shrunk"),
    ("lower_bound", "ordered by the confidence bound (gaps.ranking = lower_bound"),
    ("point", "ordered by the plain chi_model (gaps.ranking = point"),
])
def test_summary_states_the_ranking_and_shows_every_estimate(ranking, phrase):
    saliency, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS)
    options = GapOptions(n_bootstrap=0, min_benchmarks=1, min_support=1, ranking=ranking, shrinkage_strength=2.0)
    table, suite, thresholds = tables(saliency, items, 3, options)
    text = summary_markdown(suite, table, thresholds)
    section = text.split("## chi_model ranking")[1].split("## Benchmark gaps")[0]
    assert phrase in section
    assert ("| concept | chi_model | 95% CI | shrunk adj. | shrunk | adjusted | scored support | scored benchmarks "
            "| scored ESS |" in section)
    # c1: chi 0.6, no interval, shrunk 26.7/43 = 0.621, adjusted −0.05, shrunk adjusted = shrunk − prior 0.65
    # = n·(−0.05)/(n + 2) = −0.029, 3 scored items in 2 benchmarks, ESS 25/9 ≈ 2.8.
    assert "| 1 | 0.600 | [N/A, N/A] | -0.029 | 0.621 | -0.050 | 3 | 2 | 2.8 |" in section
    assert f"| ranking | {ranking} |" in text and "| shrinkage_strength | 2.0 |" in text


def test_summary_lower_bound_without_intervals_says_so():
    saliency, items = frames(TWO_BENCHMARK_SALIENCY, TWO_BENCHMARK_ITEMS)
    options = GapOptions(n_bootstrap=0, min_benchmarks=1, min_support=1, ranking="lower_bound")
    table, suite, thresholds = tables(saliency, items, 3, options)
    section = summary_markdown(suite, table, thresholds).split("## chi_model ranking")[1]
    assert "none of the 2 ranked concepts has an interval" in section


def test_full_shrinkage_is_said_in_the_summary_sentence():
    from competency_gaps.rankings import KAPPA_MAX, ranking_description

    assert "how hard their benchmarks are" in ranking_description("shrunk", KAPPA_MAX)
    assert "how hard their benchmarks are" not in ranking_description("shrunk", 12.0)


def test_shrunk_adjusted_ranks_a_real_gap_before_hard_benchmarks_and_narrow_concepts():
    """Concept 0 sits at its hard benchmark's mean (no gap of its own); concept 1 is a well-supported gap in an
    easy benchmark; concept 2 rests on two failed items. Only shrunk_adjusted puts the real gap first."""
    from competency_gaps.rankings import shrunk_adjusted_chi_model

    frame = shrink_frame([(0, 0.1, 0.1, 50.0), (1, 0.4, 0.8, 50.0), (2, 0.0, 0.8, 2.0)])
    frame = frame.with_columns(shrunk_chi_model(10.0), shrunk_adjusted_chi_model(10.0))
    # By hand, κ = 10: shrunk (50·0.1 + 1)/60 = 0.1, (20 + 8)/60 = 0.467, 8/12 = 0.667;
    # shrunk adjusted 0, 50·(−0.4)/60 = −0.333, 2·(−0.8)/12 = −0.133.
    assert frame["chi_model_shrunk_adjusted"].to_list() == pytest.approx([0.0, -1 / 3, -2 / 15])
    assert rank_concepts(frame, "point")["concept"].to_list() == [2, 0, 1]
    assert rank_concepts(frame, "shrunk")["concept"].to_list() == [0, 1, 2]
    assert rank_concepts(frame, "shrunk_adjusted")["concept"].to_list() == [1, 2, 0]
