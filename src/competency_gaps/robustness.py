"""Robustness of the concept tables (docs/METHOD.md, "Analyses the paper reports (and what we add)").

1. Resampling stability (the paper's): R runs, each keeping a seeded random `keep_fraction` of every
   benchmark's items; per concept the suite chi_bench and chi_model are recomputed on the kept items, and
   their spread over the runs is reported (paper, Llama + Goodfire SAE: mean std 0.025 for chi_bench,
   0.014 for chi_model). A run is a 0/1 weight per item, so all runs of a benchmark are one sparse matmul
   (concepts × items) · (items × runs), as in the bootstrap of concepts.py.
2. Predictive validity (beyond the paper): the scored items of every benchmark are split in two seeded
   halves. On the training half, the weakest `weak_fraction` of concepts by pooled chi_model (among those
   with at least `min_support` supporting items there) are the "weak" concepts. On the held-out half, an
   item is *dominated* by weak concepts when the weak concepts' share of its total saliency,
   Σ_{c weak} s_i^c / Σ_c s_i^c, is in the top quartile (`dominated_quantile`) of the held-out items' shares
   (and > 0). Effect = mean score of dominated items − mean score of the others; the benchmark-adjusted
   effect = mean over dominated items of (p_i − mean score of i's benchmark in the held-out half), so a
   gap list that merely points at hard benchmarks shows no adjusted effect. The one-sided p-value (effect < 0)
   comes from permuting the dominated labels within benchmarks; it serves both effects (see
   `stratified_permutation_test`). Both directions are run (A→B and B→A).
3. `plant_gap`: scores with every item where a chosen concept fires set to 0 (for end-to-end tests).

Memory follows concepts × runs and the items, never the saliency rows: like the reducer, every analysis streams
each benchmark's rows a batch at a time (`reduce.ShardBatches`), in four passes over the shards: the check (values,
known items, no duplicate pairs; scored support and item totals on the way), the resamples (as many runs per pass
as `_CHUNK_ELEMENTS` allows: all 100 at 65,536 concepts), the half sums and the weak shares of the validity test.

Everything is pure except `run_robustness`, which reads the reducer's shards and writes the tables and
robustness.md (the stability of the model-gap concepts and the validity test's weak concepts, named by
`figure_data.concept_markdown`: "#id", or "#id label" with the labels stage's labels.parquet).
Randomness: every step draws from its own stream, seeded by (seed, benchmark name, step), so one
benchmark's draws do not change when another benchmark is added.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from competency_gaps.concepts import (
    BenchmarkItems,
    ExtractionOrder,
    GapOptions,
    SaliencyBatches,
    batch_matrix,
    check_items,
    checked_rows,
    frame_batches,
    ratio,
    reject_unknown_benchmarks,
)
from competency_gaps.figure_data import concept_markdown, markdown_table, read_labels

log = logging.getLogger(__name__)

PAPER_STD = {"chi_bench_std": 0.025, "chi_model_std": 0.014}
"""Mean per-concept std over 100 resamples dropping 20 % (paper, Llama-3.1-8B-Instruct, Goodfire SAE l19)."""

_RESAMPLE, _SPLIT, _PERMUTE = 1, 2, 3  # stream tags of the random steps
_CHUNK_ELEMENTS = 1 << 23
"""Concepts × runs per pass over the rows (64 MB a float64 array; a pass holds about a dozen): every pass re-reads
the shards, so as many runs go together as this bounds; at 65,536 concepts the default 100 resamples take one."""
_TIE = 1e-10  # a permuted effect this close to the observed one counts as "as extreme"

DIRECTIONS = (("A->B", 0, 1), ("B->A", 1, 0))  # (name, training half, held-out half)

STABILITY_COLUMNS = [
    "concept", "chi_bench", "chi_bench_mean", "chi_bench_std", "n_runs_chi_bench", "chi_model", "chi_model_mean",
    "chi_model_std", "n_runs_chi_model", "scored_support", "n_benchmarks_scored", "passes_support_filter",
]
TEST_COLUMNS = [
    "scope", "n_heldout", "n_dominated", "mean_score_dominated", "mean_score_rest", "effect", "p_value",
    "adjusted_effect",
]
VALIDITY_COLUMNS = [
    "direction", *TEST_COLUMNS, "n_eligible_concepts", "n_weak_concepts", "weak_chi_threshold", "share_threshold",
    "n_no_saliency",
]
_TEST_SCHEMA = {"scope": pl.String, "n_heldout": pl.Int64, "n_dominated": pl.Int64,
                "mean_score_dominated": pl.Float64, "mean_score_rest": pl.Float64, "effect": pl.Float64,
                "p_value": pl.Float64, "adjusted_effect": pl.Float64}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RobustnessOptions:
    """Options of the robustness analyses (config key `robustness`)."""

    n_resamples: int = 100
    """Resampling runs (the paper: 100)."""
    keep_fraction: float = 0.8
    """Share of every benchmark's items each run keeps (the paper drops 20 %); rounded to the nearest count,
    at least one item."""
    n_permutations: int = 1000
    """Permutations of the dominated labels (within benchmarks) for the validity p-values."""
    weak_fraction: float = 0.1
    """The weakest share of eligible concepts (by training-half chi_model) taken as weak: a decile."""
    dominated_quantile: float = 0.75
    """A held-out item is dominated when its weak-saliency share is at or above this quantile (top quartile)."""
    min_support: int = 5
    """A concept is eligible to be weak when it fires on at least this many scored training-half items."""
    seed: int = 0
    """Seed of the resamples, the half split and the permutations (each benchmark has its own streams)."""

    def __post_init__(self) -> None:
        for name in ("n_resamples", "n_permutations", "min_support"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"robustness.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"robustness.seed must be an integer >= 0, got {self.seed!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"robustness.keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0 < self.weak_fraction <= 1:
            raise ValueError(f"robustness.weak_fraction must be in (0, 1], got {self.weak_fraction}")
        if not 0 <= self.dominated_quantile < 1:
            raise ValueError(f"robustness.dominated_quantile must be in [0, 1), got {self.dominated_quantile}")


def _stream(seed: int, name: str, tag: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), tag, *extra])


# ---------------------------------------------------------------------------------------------------------
# Inputs, streamed


@dataclass
class _Suite:
    """Items sorted by (benchmark, item_id); every benchmark's saliency rows read anew, one batch at a time, on
    every pass, so memory follows concepts × runs and the items, never the rows."""

    n_concepts: int
    benchmarks: list[str]
    bounds: np.ndarray  # (B + 1,) benchmark b's items are bounds[b]:bounds[b + 1]
    item_benchmark: np.ndarray  # (n_items,) benchmark index
    scores: np.ndarray  # (n_items,) float64, NaN when unscored
    items: list[BenchmarkItems]  # per benchmark: its item ids (item_id order) and scores
    batches: list[SaliencyBatches]  # per benchmark: its saliency rows
    # Found while checking the rows (_prepare):
    support: np.ndarray  # (K,) int64: scored supporting items
    n_benchmarks: np.ndarray  # (K,) int64: benchmarks with a scored supporting item
    item_total: np.ndarray  # (n_items,) every item's saliency summed over its concepts

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.scores)

    def rows(self, b: int, order: ExtractionOrder | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Benchmark b's rows with saliency > 0 (a stored 0 means the same as an absent pair), per batch: item
        index within b, concept, saliency; checked as the reducer checks them. `order` sees every row."""
        for batch in self.batches[b]:
            item, concept, saliency = checked_rows(self.items[b], batch, self.n_concepts)
            if order is not None:
                order.update(item, concept)
            positive = saliency > 0
            yield item[positive], concept[positive], saliency[positive]


def _prepare(saliency: Mapping[str, SaliencyBatches], items: pl.DataFrame, n_concepts: int) -> _Suite:
    """The suite, its rows validated as the reducer validates them (values, concept range, known items, no
    duplicate pairs) in one pass before any analysis reads them."""
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be >= 1, got {n_concepts}")
    items = check_items(items).sort("benchmark", "item_id")
    if items.height == 0:
        raise ValueError("items: no items to analyse")
    names, item_benchmark = np.unique(items["benchmark"].to_numpy().astype(str), return_inverse=True)
    reject_unknown_benchmarks(saliency, names.tolist())
    parts = items.partition_by("benchmark", as_dict=True, maintain_order=True)
    k, n_items = n_concepts, items.height
    suite = _Suite(
        n_concepts=n_concepts,
        benchmarks=names.tolist(),
        bounds=np.searchsorted(item_benchmark, np.arange(len(names) + 1)),
        item_benchmark=item_benchmark,
        scores=items["score"].to_numpy().astype(np.float64),  # null -> NaN
        items=[BenchmarkItems.of(name, parts[(name,)]) for name in names],
        batches=[saliency.get(name, ()) for name in names],
        support=np.zeros(k, dtype=np.int64),
        n_benchmarks=np.zeros(k, dtype=np.int64),
        item_total=np.zeros(n_items),
    )
    for b, benchmark in enumerate(suite.items):
        order = ExtractionOrder(benchmark.n_items)
        scored, own = ~np.isnan(benchmark.scores), np.zeros(k, dtype=np.int64)
        for item, concept, saliency_values in suite.rows(b, order):
            own += np.bincount(concept[scored[item]], minlength=k)
            suite.item_total[suite.bounds[b]:suite.bounds[b + 1]] += np.bincount(item, saliency_values,
                                                                                 minlength=benchmark.n_items)
        order.check_duplicates(benchmark, suite.batches[b], n_concepts)
        suite.support += own
        suite.n_benchmarks += own > 0
    return suite


# ---------------------------------------------------------------------------------------------------------
# Resampling stability


def keep_masks(benchmark: str, n_items: int, n_resamples: int, keep_fraction: float, seed: int) -> np.ndarray:
    """(n_items, n_resamples) bool: the items of `benchmark` (in item_id order) each run keeps; every run
    keeps round(keep_fraction · n_items) of them (at least one), drawn without replacement."""
    n_keep = max(1, int(math.floor(keep_fraction * n_items + 0.5)))
    rng = _stream(seed, benchmark, _RESAMPLE)
    order = np.argsort(rng.random((n_resamples, n_items)), axis=1)
    masks = np.zeros((n_resamples, n_items), dtype=bool)
    np.put_along_axis(masks, order[:, :n_keep], True, axis=1)
    return np.ascontiguousarray(masks.T)


def _benchmark_sums(suite: _Suite, b: int, weights: np.ndarray) -> np.ndarray:
    """Benchmark b's (concepts × 3·runs) [Σ_i s_i w_i | Σ_i s_i w_i over scored items | Σ_i s_i w_i p_i], with item
    weights `weights` ((n_b, runs), in item order), a sparse product per batch of rows."""
    scores = suite.items[b].scores[:, None]
    scored = ~np.isnan(scores)
    total = np.zeros((suite.n_concepts, 3 * weights.shape[1]))
    for item, concept, saliency in suite.rows(b):
        drawn, matrix = batch_matrix(item, concept, saliency, suite.n_concepts)
        w, s = weights[drawn].astype(np.float64), scored[drawn]
        stacked = np.concatenate([w, w * s, w * np.where(s, scores[drawn], 0.0)], axis=1)
        total += torch.sparse.mm(matrix, torch.from_numpy(stacked)).numpy()
    return total


def _runs(suite: _Suite, weights: list[np.ndarray], pooling: str) -> tuple[np.ndarray, np.ndarray]:
    """Suite chi_bench and chi_model (concepts × runs, NaN where undefined) with item weights per benchmark
    ((n_b, runs), 0/1), exactly as concepts.py computes them on the weighted items."""
    k, runs = suite.n_concepts, weights[0].shape[1]
    bench_sum, bench_n = np.zeros((k, runs)), np.zeros(runs)
    numerator, denominator = np.zeros((k, runs)), np.zeros((k, runs))  # pooled sums, or mean's sum and count
    for b, w in enumerate(weights):
        product = _benchmark_sums(suite, b, w)
        sums, scored_sums, weighted = product[:, :runs], product[:, runs:2 * runs], product[:, 2 * runs:]
        total = sums.sum(axis=0)
        scale = np.zeros(runs)  # chi_bench of b is null in a run where b has no saliency (its sums are 0 there)
        np.divide(k, total, out=scale, where=total > 0)
        bench_sum += sums * scale
        bench_n += total > 0
        if pooling == "pooled":
            numerator += weighted
            denominator += scored_sums
        else:
            own = ratio(weighted, scored_sums)  # this benchmark's chi_model, for the mean over benchmarks
            numerator += np.nan_to_num(own)
            denominator += ~np.isnan(own)
    return ratio(bench_sum, bench_n[None, :]), ratio(numerator, denominator)


class _Moments:
    """Count, mean and population std per concept over runs (NaN skipped), accumulated chunk by chunk as
    sums of deviations from the full-data value: they stay small, so no cancellation."""

    def __init__(self, reference: np.ndarray) -> None:
        self.shift = np.nan_to_num(reference)
        self.n = np.zeros(len(reference), dtype=np.int64)
        self.s1 = np.zeros(len(reference))
        self.s2 = np.zeros(len(reference))

    def add(self, values: np.ndarray) -> None:
        valid = ~np.isnan(values)
        deviation = np.where(valid, values - self.shift[:, None], 0.0)
        self.n += valid.sum(axis=1)
        self.s1 += deviation.sum(axis=1)
        self.s2 += (deviation**2).sum(axis=1)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        n = np.where(self.n > 0, self.n, 1)
        mean = self.s1 / n
        std = np.sqrt(np.maximum(self.s2 / n - mean**2, 0.0))
        undefined = self.n == 0
        return np.where(undefined, np.nan, self.shift + mean), np.where(undefined, np.nan, std)


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "n": int(values.size)}


def _stability(suite: _Suite, options: RobustnessOptions, gaps: GapOptions) -> tuple[pl.DataFrame, dict]:
    k = suite.n_concepts
    # Column 0 weights every item (the values on all items, the moments' reference); the resamples follow.
    weights = [np.concatenate([np.ones((int(n), 1), dtype=bool),
                               keep_masks(name, int(n), options.n_resamples, options.keep_fraction, options.seed)],
                              axis=1)
               for name, n in zip(suite.benchmarks, np.diff(suite.bounds))]
    chunk = max(2, _CHUNK_ELEMENTS // k)
    for start in range(0, 1 + options.n_resamples, chunk):
        chi_bench, chi_model = _runs(suite, [w[:, start:start + chunk] for w in weights], gaps.pooling)
        if start == 0:
            reference_bench, reference_model = chi_bench[:, 0].copy(), chi_model[:, 0].copy()
            bench, model = _Moments(reference_bench), _Moments(reference_model)
            chi_bench, chi_model = chi_bench[:, 1:], chi_model[:, 1:]
        bench.add(chi_bench)
        model.add(chi_model)
    support, n_benchmarks = suite.support, suite.n_benchmarks
    bench_mean, bench_std = bench.mean_std()
    model_mean, model_std = model.mean_std()
    table = pl.DataFrame({
        "concept": np.arange(k, dtype=np.int32),
        "chi_bench": reference_bench, "chi_bench_mean": bench_mean, "chi_bench_std": bench_std,
        "n_runs_chi_bench": bench.n,
        "chi_model": reference_model, "chi_model_mean": model_mean, "chi_model_std": model_std,
        "n_runs_chi_model": model.n,
        "scored_support": support, "n_benchmarks_scored": n_benchmarks,
        "passes_support_filter": (n_benchmarks >= gaps.min_benchmarks) & (support >= gaps.min_support),
    }).with_columns(pl.col(pl.Float64).fill_nan(None)).select(STABILITY_COLUMNS)

    passes = table["passes_support_filter"].to_numpy()
    covered = np.nan_to_num(reference_bench) > 0
    filtered_bench, filtered_model = _stats(bench_std[passes]), _stats(model_std[passes])
    covered_bench, defined_model = _stats(bench_std[covered]), _stats(model_std)
    summary = {
        "n_concepts": k,
        "benchmarks": suite.benchmarks,
        "n_resamples": options.n_resamples,
        "keep_fraction": options.keep_fraction,
        "seed": options.seed,
        "pooling": gaps.pooling,
        "std": "population std (ddof 0) over the runs where the value is defined",
        "support_filter": {"min_benchmarks": gaps.min_benchmarks, "min_support": gaps.min_support},
        "chi_bench_std": {
            **{f"{key}_filtered": value for key, value in filtered_bench.items()},
            **{f"{key}_covered": value for key, value in covered_bench.items()},
        },
        "chi_model_std": {
            **{f"{key}_filtered": value for key, value in filtered_model.items()},
            **{f"{key}_defined": value for key, value in defined_model.items()},
        },
        "paper": dict(PAPER_STD),
    }
    return table, summary


def resampling_stability(saliency: pl.DataFrame, items: pl.DataFrame, n_concepts: int, options: RobustnessOptions,
                         gaps: GapOptions) -> tuple[pl.DataFrame, dict]:
    """One row per concept (K rows, sorted) and a JSON-ready summary.

    Columns: concept; chi_bench and chi_model on all items (as concepts.py: suite chi_bench = mean over
    benchmarks with saliency, chi_model pooled or mean per `gaps.pooling`); chi_bench_mean/std and
    chi_model_mean/std over the runs (population std, runs where the value is undefined skipped: chi_model
    when no kept scored item supports the concept; null when no run defines it); n_runs_chi_bench and
    n_runs_chi_model (runs that define it); scored_support, n_benchmarks_scored and passes_support_filter
    (the reducer's filter, from `gaps`). The summary gives mean/median/count of each std over the concepts
    passing the filter, over all covered concepts (chi_bench > 0; a missing concept is constantly 0) and over
    all concepts with a chi_model std, beside the paper's values.
    """
    return _stability(_prepare(frame_batches(saliency), items, n_concepts), options, gaps)


# ---------------------------------------------------------------------------------------------------------
# Predictive validity


def _split(n_items: int, benchmark: str, seed: int) -> np.ndarray:
    """(n_items,) 0 (half A) or 1 (half B): a seeded half (rounded down) goes to A."""
    half = np.ones(n_items, dtype=np.int8)
    half[_stream(seed, benchmark, _SPLIT).permutation(n_items)[: n_items // 2]] = 0
    return half


def _halves(suite: _Suite, seed: int) -> np.ndarray:
    """(n_items,) half of every scored item (-1: unscored, in no half)."""
    half = np.full(len(suite.scores), -1, dtype=np.int8)
    for b, name in enumerate(suite.benchmarks):
        index = np.arange(suite.bounds[b], suite.bounds[b + 1])
        index = index[suite.scored[index]]
        half[index] = _split(len(index), name, seed)
    return half


def split_halves(items: pl.DataFrame, seed: int) -> pl.DataFrame:
    """benchmark, item_id, half (0 = A, 1 = B) of every scored item: per benchmark a seeded split of its
    scored items (in item_id order), A holding the smaller half when the count is odd."""
    scored = check_items(items).filter(pl.col("score").is_not_null()).sort("benchmark", "item_id")
    parts = [frame.select("benchmark", "item_id").with_columns(half=pl.Series(_split(frame.height, key[0], seed)))
             for key, frame in scored.partition_by("benchmark", as_dict=True, maintain_order=True).items()]
    empty = pl.DataFrame(schema={"benchmark": pl.String, "item_id": pl.String, "half": pl.Int8})
    return pl.concat(parts) if parts else empty


def _test_row(scope: str, n: int, n_dominated: int, total: float, observed: float, permuted: np.ndarray,
              observed_residual: float, permuted_residual: np.ndarray) -> dict:
    """Effects from the dominated items' score sum and residual sum; the one-sided permutation p-value
    (1 + #{permuted effect <= observed}) / (1 + n_permutations), never 0. Each group's mean score is given
    whenever the group has items (so a benchmark whose held-out items are all dominated still shows their
    mean); effects and p-value only when both groups have items."""
    row = {"scope": scope, "n_heldout": n, "n_dominated": n_dominated,
           "mean_score_dominated": observed / n_dominated if n_dominated else None,
           "mean_score_rest": (total - observed) / (n - n_dominated) if n_dominated < n else None,
           "effect": None, "p_value": None, "adjusted_effect": None}
    if n_dominated == 0 or n_dominated == n:
        return row

    def effect(dominated_sum):
        return dominated_sum / n_dominated - (total - dominated_sum) / (n - n_dominated)

    observed_effect = effect(observed)
    return row | {
        "effect": observed_effect,
        "p_value": float((1 + np.sum(effect(permuted) <= observed_effect + _TIE)) / (1 + len(permuted))),
        "adjusted_effect": observed_residual / n_dominated,
    }


def stratified_permutation_test(scores: np.ndarray, dominated: np.ndarray, strata: np.ndarray, n_permutations: int,
                                seed: int, stream: int = 0) -> pl.DataFrame:
    """Does being dominated go with lower scores? One row for the whole set (scope 'suite') and one per
    stratum (benchmark), sorted by name after the suite row.

    effect = mean score of dominated − mean score of the rest; adjusted_effect = mean over the dominated of
    (score − its stratum's mean score). The p-value is one-sided (effect < 0) from `n_permutations` random
    permutations of the dominated labels within each stratum (each stratum its own seeded stream; `stream`
    separates independent tests on the same strata); a stratum's own row uses its own permutations.
    Permuting within strata keeps every stratum's dominated count, so both effects are increasing affine
    functions of the dominated items' score sum: one p-value serves both, and it is already adjusted for
    the strata (a hard stratum with many dominated items does not make it small).
    Effects and p-value are null when no item, or every item, is dominated (the mean score of the group that
    has items is still given).
    """
    scores = np.asarray(scores, dtype=np.float64)
    dominated = np.asarray(dominated, dtype=bool)
    names, codes = np.unique(np.asarray(strata).astype(str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    residuals = scores - (np.bincount(codes, scores, minlength=len(names)) / np.maximum(counts, 1))[codes]
    suite_sum, suite_residual = np.zeros(n_permutations), np.zeros(n_permutations)
    rows = []
    for k, name in enumerate(names):
        own = codes == k
        values, residual, labels = scores[own], residuals[own], dominated[own]
        permuted = _stream(seed, str(name), _PERMUTE, stream).permuted(
            np.broadcast_to(labels, (n_permutations, labels.size)), axis=1).astype(np.float64)
        permuted_sum, permuted_residual = permuted @ values, permuted @ residual
        suite_sum += permuted_sum
        suite_residual += permuted_residual
        rows.append(_test_row(str(name), int(own.sum()), int(labels.sum()), float(values.sum()),
                              float(values[labels].sum()), permuted_sum, float(residual[labels].sum()),
                              permuted_residual))
    suite = _test_row("suite", len(scores), int(dominated.sum()), float(scores.sum()), float(scores[dominated].sum()),
                      suite_sum, float(residuals[dominated].sum()), suite_residual)
    return pl.DataFrame([suite, *rows], schema=_TEST_SCHEMA, orient="row")


@dataclass
class _HalfSums:
    """Per half (0 = A, 1 = B), per concept over the half's scored items: supporting items, Σ s and Σ s·p."""

    support: np.ndarray  # (2, K) int64
    saliency: np.ndarray  # (2, K)
    weighted: np.ndarray  # (2, K)


def _half_sums(suite: _Suite, half: np.ndarray) -> _HalfSums:
    k = suite.n_concepts
    sums = _HalfSums(np.zeros((2, k), dtype=np.int64), np.zeros((2, k)), np.zeros((2, k)))
    scores = np.nan_to_num(suite.scores)
    for b in range(len(suite.benchmarks)):
        for item, concept, saliency in suite.rows(b):
            item = item + suite.bounds[b]
            for h in (0, 1):
                own = half[item] == h
                sums.support[h] += np.bincount(concept[own], minlength=k)
                sums.saliency[h] += np.bincount(concept[own], saliency[own], minlength=k)
                sums.weighted[h] += np.bincount(concept[own], saliency[own] * scores[item[own]], minlength=k)
    return sums


def _weak_concepts(sums: _HalfSums, train: int, options: RobustnessOptions) -> tuple[pl.DataFrame, int]:
    """The weak concepts of training half `train` (concept, its chi_model there; weakest first), and how many
    concepts were eligible."""
    eligible = np.flatnonzero(sums.support[train] >= options.min_support)
    chi = sums.weighted[train][eligible] / sums.saliency[train][eligible]
    n_weak = math.ceil(options.weak_fraction * len(eligible) - 1e-9) if len(eligible) else 0
    weakest = np.lexsort((eligible, chi))[:n_weak]  # by chi_model, ties by concept index
    return pl.DataFrame({"concept": eligible[weakest].astype(np.int64), "chi_model": chi[weakest]},
                        schema={"concept": pl.Int64, "chi_model": pl.Float64}), len(eligible)


def _weak_saliency(suite: _Suite, weak: list[np.ndarray]) -> np.ndarray:
    """(len(weak), n_items): every item's saliency summed over each (K,) mask's concepts, in one pass."""
    n_items = len(suite.scores)
    out = np.zeros((len(weak), n_items))
    for b in range(len(suite.benchmarks)):
        for item, concept, saliency in suite.rows(b):
            for row, mask in zip(out, weak):
                row += np.bincount(item + suite.bounds[b], np.where(mask[concept], saliency, 0.0), minlength=n_items)
    return out


def _direction(suite: _Suite, half: np.ndarray, name: str, test: int, stream: int, n_eligible: int,
               weak: pl.DataFrame, weak_saliency: np.ndarray, options: RobustnessOptions) -> pl.DataFrame:
    """The direction's validity rows: held-out half `test` against `weak`, the other half's weak concepts (of
    `n_eligible` eligible ones), whose saliency per item is `weak_saliency`."""
    scores = np.nan_to_num(suite.scores)
    total, n_weak = suite.item_total, weak.height
    candidates = half == test
    heldout = np.flatnonzero(candidates & (total > 0))
    share = weak_saliency[heldout] / total[heldout]
    threshold = float(np.quantile(share, options.dominated_quantile)) if len(heldout) and n_weak else None
    dominated = (share >= threshold) & (share > 0) if threshold is not None else np.zeros(len(heldout), bool)
    strata = np.asarray(suite.benchmarks, dtype=object)[suite.item_benchmark[heldout]].astype(str)
    result = stratified_permutation_test(scores[heldout], dominated, strata, options.n_permutations, options.seed,
                                         stream)
    return result.with_columns(
        direction=pl.lit(name),
        n_eligible_concepts=pl.lit(n_eligible, pl.Int64),
        n_weak_concepts=pl.lit(n_weak, pl.Int64),
        weak_chi_threshold=pl.lit(weak["chi_model"][-1] if n_weak else None, pl.Float64),
        share_threshold=pl.lit(threshold, pl.Float64),
        n_no_saliency=pl.lit(int(candidates.sum()) - len(heldout), pl.Int64),
    ).select(VALIDITY_COLUMNS)


DOMINANCE = ("a held-out item is dominated by weak concepts when the weak concepts' share of its total saliency "
             "is >= the dominated_quantile of the held-out items' shares, and > 0")
WEAK = ("weak concepts: the weakest ceil(weak_fraction * eligible) concepts by pooled chi_model on the training half "
        "(ties by concept index), eligible when firing on >= min_support scored training items")


def _validity(suite: _Suite, options: RobustnessOptions) -> tuple[pl.DataFrame, dict, dict[str, pl.DataFrame]]:
    """validity table, its JSON summary, and per direction its weak concepts (for robustness.md)."""
    half = _halves(suite, options.seed)
    sums = _half_sums(suite, half)
    weak, n_eligible = {}, {}
    for name, train, _ in DIRECTIONS:
        weak[name], n_eligible[name] = _weak_concepts(sums, train, options)
    masks = [np.isin(np.arange(suite.n_concepts), weak[name]["concept"].to_numpy()) for name, _, _ in DIRECTIONS]
    weak_saliency = _weak_saliency(suite, masks)
    table = pl.concat([_direction(suite, half, name, test, stream, n_eligible[name], weak[name], weak_saliency[stream],
                                  options)
                       for stream, (name, _, test) in enumerate(DIRECTIONS)])
    directions = {
        row["direction"]: {key: value for key, value in row.items() if key not in ("direction", "scope")}
        for row in table.filter(pl.col("scope") == "suite").iter_rows(named=True)
    }
    summary = {
        "options": asdict(options),
        "benchmarks": suite.benchmarks,
        "dominance": DOMINANCE,
        "weak": WEAK,
        "effect": "mean score of dominated held-out items - mean score of the other held-out items",
        "adjusted_effect": "mean over dominated held-out items of (score - its benchmark's mean held-out score)",
        "p_value": ("one-sided (effect < 0), permutations of the dominated labels within benchmarks; the same "
                    "for the adjusted effect (both are increasing in the dominated items' score sum when "
                    "every benchmark keeps its dominated count)"),
        "directions": directions,
    }
    return table, summary, weak


def predictive_validity(saliency: pl.DataFrame, items: pl.DataFrame, n_concepts: int,
                        options: RobustnessOptions) -> tuple[pl.DataFrame, dict]:
    """Do the chi_model gaps of one half of the items predict lower scores on the other half?

    Rows: per direction (A->B: weak concepts from half A, tested on half B; B->A the reverse), the suite
    row and one per benchmark (`stratified_permutation_test`'s columns), with n_eligible_concepts,
    n_weak_concepts, weak_chi_threshold (the highest training chi_model among the weak concepts),
    share_threshold (the weak-share quantile) and n_no_saliency (held-out items left out: no saliency).
    Only scored items take part. The summary holds the options, the definitions and the suite rows.
    """
    table, summary, _ = _validity(_prepare(frame_batches(saliency), items, n_concepts), options)
    return table, summary


# ---------------------------------------------------------------------------------------------------------
# Planted gap


def plant_gap(items: pl.DataFrame, saliency: pl.DataFrame, concept: int, value: float = 0.0) -> pl.DataFrame:
    """`items` (same rows, order and columns) with the score of every scored item on which `concept` fires
    (saliency > 0) set to `value`; unscored (null) items stay unscored, so coverage-only benchmarks remain so."""
    fires = (
        saliency.filter((pl.col("concept") == concept) & (pl.col("saliency") > 0))
        .select(pl.col("benchmark").cast(pl.String), pl.col("item_id").cast(pl.String))
        .unique()
        .with_columns(_fires=pl.lit(True))
    )
    planted = (
        items.with_row_index("_row")
        .join(fires, on=["benchmark", "item_id"], how="left")
        .sort("_row")
        .with_columns(
            pl.when(pl.col("_fires").fill_null(False) & pl.col("score").is_not_null())
            .then(pl.lit(value, pl.Float64))
            .otherwise(pl.col("score"))
            .cast(items.schema["score"])
            .alias("score")
        )
    )
    return planted.select(items.columns)


# ---------------------------------------------------------------------------------------------------------
# Markdown report

TOP_CONCEPTS = 25
"""robustness.md shows the stability of this many model-gap concepts, and this many weak concepts a direction."""


def _num(value: float | None, digits: int = 3) -> str:
    return "N/A" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _stability_section(stability: pl.DataFrame, summary: dict, labels: Mapping[int, str] | None,
                       top_n: int) -> list[str]:
    rated = stability.filter(pl.col("chi_model").is_not_null())
    pool = rated.filter(pl.col("passes_support_filter"))
    support = summary.get("support_filter") or {}
    if pool.height:
        who = (f"among the {pool.height:,} concepts passing the support filter (scored items in ≥ "
               f"{support.get('min_benchmarks', '?')} benchmarks, ≥ {support.get('min_support', '?')} scored items)")
    else:
        pool = rated
        who = (f"**no concept passes the support filter**: among all {pool.height:,} concepts with a χ_model "
               "(weak evidence)")
    top = pool.sort(["chi_model", "concept"]).head(top_n)
    runs, keep = summary.get("n_resamples"), summary.get("keep_fraction")
    how = (f"over {runs:,} resamples, each keeping {keep:.0%} of every benchmark's items" if runs and keep is not None
           else "over the resamples")
    bench, model = summary.get("chi_bench_std") or {}, summary.get("chi_model_std") or {}
    paper = summary.get("paper") or {}
    lines = [
        f"## Resampling stability of the model-gap concepts: the {top.height} with the lowest χ_model", "",
        f"Ordered by the plain χ_model on all items (ties by concept id), {who}; summary.md orders by gaps.ranking, "
        f"so its list can differ. std: population std of the concept's suite value {how} (runs: resamples where "
        "it is defined). Mean std over the concepts passing the filter: χ_bench "
        f"{_num(bench.get('mean_filtered'))}, χ_model {_num(model.get('mean_filtered'))} (paper: "
        f"{_num(paper.get('chi_bench_std'))}, {_num(paper.get('chi_model_std'))}).", "",
    ]
    rows = [[str(rank), concept_markdown(r["concept"], labels), _num(r["chi_model"]), _num(r["chi_model_mean"]),
             _num(r["chi_model_std"]), f"{r['n_runs_chi_model']:,}", _num(r["chi_bench"]), _num(r["chi_bench_std"]),
             f"{r['scored_support']:,}"]
            for rank, r in enumerate(top.iter_rows(named=True), start=1)]
    header = ["rank", "concept", "χ_model", "resampled mean", "χ_model std", "runs", "χ_bench", "χ_bench std",
              "scored support"]
    return lines + [markdown_table(header, rows) if rows else "No concept has a χ_model (no scored items)."]


def _validity_section(validity: pl.DataFrame, weak: Mapping[str, pl.DataFrame], labels: Mapping[int, str] | None,
                      top_n: int) -> list[str]:
    lines = ["## Predictive validity: the weak concepts", "",
             f"Per direction, the concepts the test took as weak, weakest first ({WEAK}). The test asks whether the "
             "held-out items they dominate score lower (validity.parquet, validity.png).", ""]
    suite_rows = {r["direction"]: r for r in validity.filter(pl.col("scope") == "suite").iter_rows(named=True)}
    for name, train, test in DIRECTIONS:
        row, concepts = suite_rows.get(name), weak.get(name)
        train_half, test_half = "AB"[train], "AB"[test]
        title = f"### {name.replace('->', '→')}: weak concepts from half {train_half}, tested on half {test_half}"
        if row is None or concepts is None:
            lines += [title, "", "Not run.", ""]
            continue
        lines += [title, "",
                  f"{row['n_weak_concepts']:,} weak of {row['n_eligible_concepts']:,} eligible concepts; suite effect "
                  f"{_num(row['effect'])}, benchmark-adjusted {_num(row['adjusted_effect'])}, one-sided p "
                  f"{_num(row['p_value'], 4)} ({row['n_dominated']:,} of {row['n_heldout']:,} held-out items "
                  "dominated).", ""]
        shown = concepts.head(top_n)
        rows = [[str(rank), concept_markdown(c, labels), _num(chi)]
                for rank, (c, chi) in enumerate(shown.iter_rows(), start=1)]
        if not rows:
            lines += ["No weak concepts (no concept is eligible).", ""]
            continue
        lines += [markdown_table(["rank", "concept", f"half-{train_half} χ_model"], rows), ""]
        if concepts.height > shown.height:
            lines += [f"… and {concepts.height - shown.height:,} more weak concepts.", ""]
    return lines


def robustness_findings(stability_summary: Mapping[str, Any], validity_summary: Mapping[str, Any]) -> str:
    """The robustness section of summary.md, from stability.json and validity.json: the mean resampling std
    beside the paper's, and each validity direction's effect, adjusted effect and permutation p-value."""
    bench, model = stability_summary.get("chi_bench_std") or {}, stability_summary.get("chi_model_std") or {}
    paper = stability_summary.get("paper") or PAPER_STD
    support = stability_summary.get("support_filter") or {}
    if model.get("n_filtered"):
        scope, key = (f"the {model['n_filtered']:,} concepts passing the support filter (scored items in ≥ "
                      f"{support.get('min_benchmarks', '?')} benchmarks, ≥ {support.get('min_support', '?')} scored items)",
                      "filtered")
    else:
        scope, key = "every concept with a value (none passes the support filter)", "defined"
    bench_key = "filtered" if key == "filtered" else "covered"
    runs, keep = stability_summary.get("n_resamples"), stability_summary.get("keep_fraction")
    how = f"{runs:,} runs, each keeping {keep:.0%} of every benchmark's items" if runs and keep is not None else "resamples"
    lines = ["## Robustness", "",
             f"- **Resampling** ({how}): mean per-concept std of χ_bench {_num(bench.get(f'mean_{bench_key}'))} and of "
             f"χ_model {_num(model.get(f'mean_{key}'))} (medians {_num(bench.get(f'median_{bench_key}'))} and "
             f"{_num(model.get(f'median_{key}'))}) over {scope}; the paper reports {_num(paper.get('chi_bench_std'))} and "
             f"{_num(paper.get('chi_model_std'))} (Llama-3.1-8B-Instruct, Goodfire SAE, full benchmarks)."]
    options = validity_summary.get("options") or {}
    weak = options.get("weak_fraction")
    what = (f"the weakest {weak:.0%} of concepts by χ_model on one half of the items" if weak is not None
            else "the weakest concepts on one half of the items")
    for name, row in (validity_summary.get("directions") or {}).items():
        lines.append(
            f"- **Predictive validity** {name.replace('->', '→')} ({what}; held-out items they dominate vs the rest): "
            f"effect {_num(row.get('effect'))}, benchmark-adjusted {_num(row.get('adjusted_effect'))}, one-sided "
            f"permutation p {_num(row.get('p_value'), 3)} ({row.get('n_dominated', 0):,} of {row.get('n_heldout', 0):,} "
            "held-out items dominated).")
    lines += ["", "A negative effect with p < 0.05 means the gap list predicts failures on unseen items; a large raw "
              "effect with an adjusted effect near 0 means it marks hard benchmarks rather than hard items. "
              "Details: robustness.md, stability.png and validity.png in results/robustness/.", ""]
    return "\n".join(lines)


def robustness_markdown(stability: pl.DataFrame, stability_summary: dict, validity: pl.DataFrame,
                        weak: Mapping[str, pl.DataFrame], labels: Mapping[int, str] | None = None,
                        top_n: int = TOP_CONCEPTS, context: str = "") -> str:
    """robustness.md: the resampling stability of the top_n concepts with the lowest χ_model (support filter as
    the reducer's), and per validity direction its suite result and its first top_n weak concepts (weak: direction
    -> concept, training-half chi_model, weakest first). Concepts are named by `concept_markdown`."""
    lines = [f"# Robustness{f' — {context}' if context else ''}", "",
             *_stability_section(stability, stability_summary, labels, top_n), "",
             *_validity_section(validity, weak, labels, top_n)]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------
# I/O


def run_robustness(saliency_paths: list[str], token_paths: list[str], score_paths: list[str], n_concepts: int,
                   robustness: dict[str, Any], gaps: dict[str, Any], out_dir: Path,
                   labels_path: str | Path | None = None, title: str = "") -> None:
    """Read the shards as the reducer does (extracted items only) and write stability.parquet/json,
    validity.parquet/json and robustness.md to `out_dir`. `gaps` supplies pooling and the support filter (any
    GapOptions keys); labels_path (the labels stage's labels.parquet) names the concepts in robustness.md."""
    from competency_gaps.reduce import load_items, saliency_batches
    from competency_gaps.tables import write_frame, write_json, write_text

    options = RobustnessOptions(**robustness)
    gap_options = GapOptions(**gaps)
    labels = read_labels(labels_path)  # first: a bad labels file fails before the long computation
    saliency = saliency_batches(saliency_paths)  # columns checked now; rows read batch by batch in each pass
    items = load_items(token_paths, score_paths).filter("extracted").select("benchmark", "item_id", "score")
    suite = _prepare(saliency, items, n_concepts)
    stability, stability_summary = _stability(suite, options, gap_options)
    validity, validity_summary, weak = _validity(suite, options)
    out_dir = Path(out_dir)
    write_frame(stability, out_dir / "stability.parquet")
    write_json(stability_summary, out_dir / "stability.json")
    write_frame(validity, out_dir / "validity.parquet")
    write_json(validity_summary, out_dir / "validity.json")
    write_text(robustness_markdown(stability, stability_summary, validity, weak, labels, context=title),
               out_dir / "robustness.md")
    log.info("robustness: %d concepts, %d benchmarks, %d resamples, %d permutations", n_concepts,
             len(suite.benchmarks), options.n_resamples, options.n_permutations)
