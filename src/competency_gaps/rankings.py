"""Support-aware rankings of concepts by chi_model: benchmark-adjusted and empirically shrunk estimates.

The plain chi_model of a concept that fires on two items is 0 whenever the model fails both, so a point-estimate
ranking fills its bottom with narrow concepts, and a concept that lives in a hard benchmark looks weak merely for
that. Two estimators answer this (pure functions on polars frames; concepts.py wires them into the tables):

Benchmark prior and adjustment. p̄_b is benchmark b's mean score over its scored items. A concept's prior is
what its items' benchmarks predict, and its adjusted chi_model is how far it sits from that:

    m_c          = Σ_i s_i^c p̄_{b(i)} / Σ_i s_i^c                 (scored items i)
    adjusted_c   = Σ_i s_i^c (p_i − p̄_{b(i)}) / Σ_i s_i^c  =  chi_model_c − m_c

0 reads "as good as its benchmarks predict", negative "weaker than its benchmarks". Per benchmark m = p̄_b.
With pooling 'mean', chi_model_c is the mean of the per-benchmark values, and m_c (adjusted_c) the mean of p̄_b
(of the per-benchmark adjustments) over the same benchmarks, so adjusted = chi_model − m holds there too.

Empirical-Bayes shrinkage (beta-binomial). Treat chi_c as the mean of n_c Bernoulli-like draws (n_c: the scored
effective sample size (Σ s)² / Σ s², which is exactly the count that gives a weighted mean of equal-variance
draws its variance) with success rate θ_c, and θ_c ~ Beta(κ m_c, κ (1 − m_c)): mean m_c, variance
τ_c² = m_c (1 − m_c) / (κ + 1). The posterior mean of θ_c is

    shrunk_c = (n_c chi_c + κ m_c) / (n_c + κ)

so a concept moves towards its prior in proportion to κ / (n_c + κ): two items barely move it off m_c, an ESS of
hundreds leaves it near its own chi_c. κ ("prior items") is a config value or is estimated from the spread of the
adjusted values beyond their sampling noise; see `estimate_shrinkage_strength` and `sampling_terms`. That noise is
worked out from the items' own benchmarks (each benchmark's score variance, and the share of a concept's items in
the benchmark mean it is compared with), not from m_c (1 − m_c): a concept spanning a benchmark at 5 % and one at
90 % has m_c (1 − m_c) near its maximum while its items vary far less, and a concept covering most of a benchmark
can hardly differ from that benchmark's mean. Reading the noise off m_c overstated it enough on a mixed suite to
hide every concept-level difference (κ̂ = ∞).

Both at once (the default ranking). The shrunk value minus the prior is the posterior estimate of how much
weaker or stronger than its benchmarks predict the concept is:

    shrunk_adjusted_c = shrunk_c − m_c = n_c (chi_c − m_c) / (n_c + κ)

Ranking by shrunk_c alone brings benchmark difficulty back: with κ large, every concept sits near its prior and
the concepts of the hardest benchmark come first. shrunk_adjusted is 0 for "as its benchmarks predict" and
pulls narrow concepts towards 0, so neither a hard benchmark nor two failed items put a concept on the list.
"""

from __future__ import annotations

import polars as pl

RANKINGS = ("shrunk_adjusted", "shrunk", "lower_bound", "point")
"""gaps.ranking: ascending chi_model_shrunk_adjusted (default: support-aware and benchmark-adjusted);
chi_model_shrunk; confidence bounds (weakest by the upper bound, strongest by the lower bound, concepts without
an interval last); the plain chi_model (the paper)."""

KAPPA_MAX = 1e12
"""κ used when the data show no between-concept spread beyond sampling noise (the estimate is +∞): every shrunk
value is then its prior to ~1e-10. Finite so that thresholds.json stays valid JSON."""


# ---------------------------------------------------------------------------------------------------------
# Benchmark prior and adjustment


def benchmark_means(items: pl.DataFrame) -> pl.DataFrame:
    """p̄_b = mean of p_i over the scored items of b (unscored items ignored).

    items: benchmark, score (null: no scorer). Returns benchmark, benchmark_mean (Float64; null when b has no
    scored item), one row per benchmark of `items`.
    """
    return items.group_by("benchmark").agg(benchmark_mean=pl.col("score").cast(pl.Float64).fill_nan(None).mean())


def mean_prior(concept_benchmark: pl.DataFrame, means: pl.DataFrame) -> pl.DataFrame:
    """m_c = mean of p̄_b over the benchmarks where chi_model^(c,b) is defined (the prior for pooling 'mean').

    concept_benchmark: concept, benchmark, chi_model. Returns concept, chi_model_prior for the concepts with
    some per-benchmark chi_model.
    """
    rated = concept_benchmark.filter(pl.col("chi_model").is_not_null()).join(means, on="benchmark", how="left")
    return rated.group_by("concept").agg(chi_model_prior=pl.col("benchmark_mean").mean())


def adjusted_chi_model(chi: str = "chi_model", prior: str = "chi_model_prior") -> pl.Expr:
    """chi_model_adjusted = chi − prior = Σ s (p − p̄_b) / Σ s; null where either is null."""
    return (pl.col(chi) - pl.col(prior)).alias("chi_model_adjusted")


# ---------------------------------------------------------------------------------------------------------
# Shrinkage


def shrunk_chi_model(kappa: float | None) -> pl.Expr:
    """chi_model_shrunk = (n chi + κ m) / (n + κ) from columns chi_model, chi_model_prior, scored_ess (n).

    Null where chi_model is null, or when κ is None (no concept to estimate it from). κ = 0 gives chi_model.
    """
    if kappa is None:
        return pl.lit(None, pl.Float64).alias("chi_model_shrunk")
    n, chi, prior = pl.col("scored_ess"), pl.col("chi_model"), pl.col("chi_model_prior")
    return ((n * chi + kappa * prior) / (n + kappa)).alias("chi_model_shrunk")


def shrunk_adjusted_chi_model(kappa: float | None) -> pl.Expr:
    """chi_model_shrunk_adjusted = n (chi − m) / (n + κ) = chi_model_shrunk − chi_model_prior, from columns
    chi_model, chi_model_prior, scored_ess (n). Null where chi_model is null or κ is None."""
    if kappa is None:
        return pl.lit(None, pl.Float64).alias("chi_model_shrunk_adjusted")
    n = pl.col("scored_ess")
    return (n * (pl.col("chi_model") - pl.col("chi_model_prior")) / (n + kappa)).alias("chi_model_shrunk_adjusted")


def benchmark_spread(items: pl.DataFrame) -> pl.DataFrame:
    """Per benchmark of `items` (benchmark, score; null: no scorer): n_scored and score_variance (the sample
    variance of its scored items' scores, 0 with fewer than two)."""
    score = pl.col("score").cast(pl.Float64).fill_nan(None)
    return items.group_by("benchmark").agg(
        n_scored=score.count().cast(pl.Int64),
        score_variance=score.var(ddof=1).fill_null(0.0),
    )


def sampling_terms(sums: pl.DataFrame, spread: pl.DataFrame, pooling: str) -> pl.DataFrame:
    """Per concept, what the κ estimate needs to tell concept-level spread from sampling noise.

    sums: concept, benchmark, scored_support (n_cb), scored_saliency (S_cb), scored_saliency_sq (Q_cb);
    spread: `benchmark_spread` (N_b, v_b). The adjusted value is Σ_b a_cb (chi_cb − p̄_b) over the benchmarks
    where the concept has a chi_model, a_cb = S_cb / Σ S (pooling 'pooled') or 1 / B_c (pooling 'mean'). Returns
    concept and
    - null_variance = Σ_b a_cb² v_b (Q_cb / S_cb² − 1 / N_b): its variance when every item of b scores
      independently around p̄_b with variance v_b (p̄_b is estimated from the same items, hence the − 1 / N_b);
    - own_share = Σ_b a_cb (1 − n_cb / N_b): the share of a shift of the concept's items that shows in the
      adjusted value (the rest moves p̄_b with it);
    - item_variance = Σ_b a_cb v_b: the score variance of the concept's items, the scale of its possible shift.
    """
    rated = sums.filter(pl.col("scored_saliency") > 0).join(spread, on="benchmark", how="left")
    if pooling == "pooled":
        weight = pl.col("scored_saliency") / pl.col("scored_saliency").sum().over("concept")
    else:
        weight = 1.0 / pl.len().over("concept")
    n_items, variance = pl.col("n_scored"), pl.col("score_variance")
    return rated.with_columns(weight=weight).group_by("concept").agg(
        null_variance=(pl.col("weight") ** 2 * variance
                       * (pl.col("scored_saliency_sq") / pl.col("scored_saliency") ** 2 - 1.0 / n_items)).sum(),
        own_share=(pl.col("weight") * (1.0 - pl.col("scored_support") / n_items)).sum(),
        item_variance=(pl.col("weight") * variance).sum(),
    )


def estimate_shrinkage_strength(frame: pl.DataFrame) -> float | None:
    """κ̂ by the method of moments over the concepts with chi_model, chi_model_prior and the `sampling_terms`.

    Let a concept's shift (the true difference from its prior) have variance λ V_c, V_c its item_variance and
    λ = 1 / (κ + 1) (the beta-binomial's τ² / m(1 − m)). The adjusted value d_c = chi_c − m_c shows own_share g_c
    of that shift, over sampling noise of variance σ_c² (null_variance) shrunk by 1 − λ as the shift takes its
    part of the items' variance:
        E[d_c²] = λ g_c² V_c + (1 − λ) σ_c²,   so   λ̂ = mean (d² − σ²) / mean (g² V − σ²),   κ̂ = 1 / λ̂ − 1.
    For a concept on a few items of one large benchmark (g = 1, σ² = V / n) this is the classical
    E[(chi − m)²] = τ² (1 − 1/n) + m(1 − m) / n. Degenerate cases:
    - no concept with chi_model: None (nothing to shrink);
    - mean (d² − σ²) ≤ 0 (the spread around the priors is no more than sampling noise), or mean (g² V − σ²) ≤ 0
      (no concept could show a shift above its noise: every concept on one item, or every benchmark's scores
      all equal): κ = ∞, i.e. KAPPA_MAX, and every shrunk value is its prior;
    - λ̂ ≥ 1 (spread as large as the items' variance allows): κ = 0, no shrinkage.
    """
    rated = frame.filter(pl.all_horizontal(pl.col("chi_model", "chi_model_prior", "null_variance", "own_share",
                                                   "item_variance").is_not_null()))
    if rated.height == 0:
        return None
    noise = pl.col("null_variance")
    moments = rated.select(
        excess=((pl.col("chi_model") - pl.col("chi_model_prior")) ** 2 - noise).mean(),
        room=(pl.col("own_share") ** 2 * pl.col("item_variance") - noise).mean(),
    ).row(0, named=True)
    if not moments["room"] > 0 or not moments["excess"] > 0:
        return KAPPA_MAX
    concept_share = moments["excess"] / moments["room"]  # λ̂: the share of the items' variance that is the concept's
    return float(min(max(1.0 / concept_share - 1.0, 0.0), KAPPA_MAX))


def shrinkage_strength(frame: pl.DataFrame, fixed: float | None) -> float | None:
    """κ to use: the configured one (gaps.shrinkage_strength) or, when it is None, the estimate."""
    return float(fixed) if fixed is not None else estimate_shrinkage_strength(frame)


# ---------------------------------------------------------------------------------------------------------
# Rankings


def ranking_key(ranking: str, strongest: bool = False) -> str:
    """The column a ranking orders by: chi_model_shrunk, chi_model, or for lower_bound chi_model_hi when looking
    for the weakest concepts (confidently low) and chi_model_lo for the strongest (confidently high)."""
    if ranking not in RANKINGS:
        raise ValueError(f"gaps.ranking must be one of {RANKINGS}, got {ranking!r}")
    if ranking == "shrunk_adjusted":
        return "chi_model_shrunk_adjusted"
    if ranking == "shrunk":
        return "chi_model_shrunk"
    if ranking == "lower_bound":
        return "chi_model_lo" if strongest else "chi_model_hi"
    return "chi_model"


def rank_concepts(frame: pl.DataFrame, ranking: str, strongest: bool = False) -> pl.DataFrame:
    """`frame` sorted weakest-first (ascending key) or, with strongest, strongest-first (descending key).

    Rows where the key is null (e.g. no interval under lower_bound) come last; ties break by the plain
    chi_model (same direction), then by concept index.
    """
    key = ranking_key(ranking, strongest)
    columns = [key] if key == "chi_model" else [key, "chi_model"]
    return frame.sort([*columns, "concept"], descending=[strongest] * len(columns) + [False], nulls_last=True)


def ranking_description(ranking: str, kappa: float | None) -> str:
    """One sentence for the summary: which ranking ordered the lists, and what it means."""
    ranking_key(ranking)  # validates
    if ranking == "shrunk_adjusted":
        strength = "not available" if kappa is None else f"{kappa:.4g}"
        text = (f"Lists ordered by shrunk adjusted chi_model (gaps.ranking = shrunk_adjusted, κ = {strength} prior "
                "items): n·(chi_model − prior) / (n + κ), n the scored ESS, prior what the concept's benchmarks "
                "predict — how much weaker (negative) or stronger than its benchmarks a concept is, pulled towards 0 "
                "when it rests on few items.")
        if kappa is not None and kappa >= KAPPA_MAX:
            text += (" **The concepts' chi_model varies no more than sampling noise around what their benchmarks "
                     "predict (κ at its maximum): every value is ≈ 0 and the order follows the ESS-weighted deviation "
                     "n·(chi_model − prior) alone; no concept is detectably weaker than its benchmarks, so treat "
                     "these lists as weak evidence.**")
        return text
    if ranking == "shrunk":
        strength = "not available" if kappa is None else f"{kappa:.4g}"
        text = (f"Lists ordered by shrunk chi_model (gaps.ranking = shrunk, κ = {strength} prior items): "
                "(n·chi_model + κ·prior) / (n + κ), n the scored ESS, prior what the concept's benchmarks predict, "
                "so narrow concepts move towards their benchmarks' mean.")
        if kappa is not None and kappa >= KAPPA_MAX:
            # Full shrinkage: the data show no concept-specific spread, so the list only reflects benchmark difficulty.
            text += (" **The concepts' chi_model varies no more than sampling noise around what their benchmarks "
                     "predict (κ at its maximum): every shrunk value is its prior, so this list ranks concepts by how "
                     "hard their benchmarks are, not by a weakness of their own (see chi_model_adjusted).**")
        return text
    if ranking == "lower_bound":
        return ("Lists ordered by the confidence bound (gaps.ranking = lower_bound): weakest by the interval's "
                "upper end, strongest by its lower end; concepts without an interval come last.")
    return ("Lists ordered by the plain chi_model (gaps.ranking = point, the paper's ranking): "
            "narrow concepts with extreme point estimates can crowd the ends.")
