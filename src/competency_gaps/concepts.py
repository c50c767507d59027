"""Stage 5 maths: concept × benchmark coverage (chi_bench) and saliency-weighted performance (chi_model).

Definitions follow docs/METHOD.md. Inputs are the sparse saliency rows s_i^c (> 0 only; absent pairs are 0)
and the item universe with scores p_i (null: no scorer). All functions are pure; the reducer does the I/O.

The rows are never held together: `gap_statistics` streams each benchmark's rows in batches and keeps per
concept the sufficient statistics of every table (support, Σ s, Σ s², and the same plus Σ s·p over scored
items), so memory is bounded by concepts × benchmarks, not by rows. The tables are built from those sums.

Bootstrap intervals resample items with replacement within each benchmark. Each batch's rows, as a sparse
(concepts × items) matrix, are multiplied by the resample counts W (items × n_boot) of its items and added up,
so a replicate of every concept's Σ s·p and Σ s costs sparse matmuls rather than a loop over concepts, and
needs no more than one benchmark's (concepts × n_boot) sums at a time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from competency_gaps.figure_data import concept_markdown, markdown_table
from competency_gaps.rankings import (
    RANKINGS,
    adjusted_chi_model,
    benchmark_means,
    benchmark_spread,
    mean_prior,
    rank_concepts,
    ranking_description,
    sampling_terms,
    shrinkage_strength,
    shrunk_adjusted_chi_model,
    shrunk_chi_model,
)

CLASSES = ("missing", "under", "normal", "over")
POOLINGS = ("pooled", "mean")


@dataclass(frozen=True)
class GapOptions:
    """Thresholds and options of the gap analysis (config key `gaps`, see METHOD.md)."""

    epsilon: float = 0.0
    """A concept whose suite chi_bench is <= epsilon is 'missing' (effectively untested)."""
    under_percentile: float = 5.0
    """Covered concepts with chi_bench below this percentile (of covered concepts) are 'under'-represented."""
    over_percentile: float = 99.0
    """Covered concepts with chi_bench above this percentile (of covered concepts) are 'over'-represented."""
    pooling: str = "pooled"
    """Suite chi_model: 'pooled' over all items of all benchmarks (paper) or 'mean' of per-benchmark values."""
    min_benchmarks: int = 5
    """Support filter for rankings: the concept fires on a scored item in at least this many benchmarks."""
    min_support: int = 50
    """Support filter for rankings: the concept fires on at least this many scored items in the suite."""
    n_bootstrap: int = 200
    """Bootstrap resamples of items for chi_model confidence intervals (0 disables them)."""
    ci_level: float = 0.95
    """Two-sided level of the percentile bootstrap intervals."""
    min_ci_support: int = 10
    """No interval (null bounds) when fewer scored items support the concept: a percentile bootstrap over a
    handful of items is degenerate (one item gives [p, p])."""
    seed: int = 0
    """Seed of the bootstrap (the gap analysis's own, not the global seed); each benchmark derives its own
    stream from it and its name."""
    ranking: str = "shrunk_adjusted"
    """Order of every weakest/strongest list (rankings.py): 'shrunk_adjusted' (ascending
    chi_model_shrunk_adjusted: support-aware and benchmark-adjusted), 'shrunk' (ascending chi_model_shrunk),
    'lower_bound' (weakest by the CI upper bound, strongest by the lower bound, no interval last) or 'point'
    (plain chi_model)."""
    shrinkage_strength: float | None = None
    """κ of the shrinkage (n·chi + κ·prior) / (n + κ), in prior items; None estimates it by the method of moments."""

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"gaps.epsilon must be >= 0, got {self.epsilon}")
        if not 0 <= self.under_percentile <= self.over_percentile <= 100:
            raise ValueError(
                f"gaps percentiles need 0 <= under_percentile <= over_percentile <= 100, "
                f"got {self.under_percentile} and {self.over_percentile}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"gaps.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("min_benchmarks", "min_support", "min_ci_support"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gaps.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.n_bootstrap, bool) or not isinstance(self.n_bootstrap, int) or self.n_bootstrap < 0:
            raise ValueError(f"gaps.n_bootstrap must be an integer >= 0, got {self.n_bootstrap!r}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"gaps.ci_level must be in (0, 1), got {self.ci_level}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"gaps.seed must be an integer >= 0, got {self.seed!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"gaps.ranking must be one of {RANKINGS}, got {self.ranking!r}")
        kappa = self.shrinkage_strength
        if kappa is not None and (isinstance(kappa, bool) or not isinstance(kappa, int | float)
                                  or not math.isfinite(kappa) or kappa <= 0):
            raise ValueError(f"gaps.shrinkage_strength must be null (estimate) or a number > 0, got {kappa!r}")


# ---------------------------------------------------------------------------------------------------------
# Input preparation


def check_items(items: pl.DataFrame) -> pl.DataFrame:
    """benchmark, item_id, score (Float64, NaN read as null), validated."""
    items = items.select(
        pl.col("benchmark").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("score").cast(pl.Float64).fill_nan(None),
    )
    if items.select(pl.struct("benchmark", "item_id").is_duplicated().any()).item():
        raise ValueError("items: duplicate (benchmark, item_id) rows")
    if items.select(((pl.col("score") < 0) | (pl.col("score") > 1)).any()).item():
        raise ValueError("items: scores must lie in [0, 1]")
    return items


def check_saliency_values(rows: pl.DataFrame, n_concepts: int) -> None:
    """Saliency values >= 0 and not NaN, concept indices in 0..n_concepts-1 (every consumer of the shards)."""
    if rows.select((pl.col("saliency") < 0).any() | pl.col("saliency").is_nan().any()).item():
        raise ValueError("saliency: values must be >= 0 and not NaN")
    if rows.select(((pl.col("concept") < 0) | (pl.col("concept") >= n_concepts)).any()).item():
        raise ValueError(f"saliency: concept indices must lie in 0..{n_concepts - 1}")


def sorted_sparse(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
    """A builder of sparse (rows × cols) matrices over fixed, duplicate-free index pairs: pass the values (in
    the pairs' order) and get a coalesced COO tensor. The pairs are sorted once; sorted, duplicate-free indices
    are already coalesced, and coalesce() would re-sort them for every matrix."""
    order = np.lexsort((cols, rows))
    indices = torch.from_numpy(np.stack([rows[order], cols[order]]))

    def matrix(values: np.ndarray) -> torch.Tensor:
        return torch.sparse_coo_tensor(indices, torch.from_numpy(values[order]), shape, is_coalesced=True,
                                       check_invariants=False)

    return matrix


def _ess(support: str, total: str, total_sq: str) -> pl.Expr:
    """(Σ s)² / Σ s², null without support."""
    return pl.when(pl.col(support) > 0).then(pl.col(total) ** 2 / pl.col(total_sq)).otherwise(None)


def _estimates() -> list[pl.Expr]:
    """chi_model (null, never NaN, where no scored item supports it), ESS and scored ESS."""
    return [
        pl.when(pl.col("scored_saliency") > 0)
        .then(pl.col("weighted_score") / pl.col("scored_saliency"))
        .otherwise(None)
        .alias("chi_model"),
        _ess("support", "sum_saliency", "sum_saliency_sq").alias("ess"),
        _ess("scored_support", "scored_saliency", "scored_saliency_sq").alias("scored_ess"),
    ]


def _concept_frame(n_concepts: int) -> pl.DataFrame:
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be >= 1, got {n_concepts}")
    return pl.DataFrame({"concept": np.arange(n_concepts, dtype=np.int32)})


# ---------------------------------------------------------------------------------------------------------
# Bootstrap


def _resample_counts(n_items: int, options: GapOptions, benchmark: str) -> np.ndarray:
    """(n_items, n_boot) times each item is drawn (int32: kept for the whole benchmark, 800 B an item at 200
    replicates); the stream depends on the seed and the benchmark only, so a benchmark's intervals do not change
    when other benchmarks are added."""
    rng = np.random.default_rng([options.seed, zlib.crc32(benchmark.encode())])
    counts = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=options.n_bootstrap)
    return np.ascontiguousarray(counts.T, dtype=np.int32)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator (broadcast), NaN where the denominator is 0: a replicate or run that holds none
    of the concept's supporting items."""
    out = np.full(np.broadcast_shapes(numerator.shape, denominator.shape), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nan_quantile_rows(values: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Per row, each q-quantile (linear interpolation, as numpy's default) of the non-NaN values; NaN if none.
    Vectorised because np.nanquantile loops in Python over 65k rows; the rows are sorted once for every q."""
    ordered = np.sort(values, axis=1)  # NaNs sort last
    n_valid = np.sum(~np.isnan(values), axis=1)
    last = np.maximum(n_valid - 1, 0)
    results = []
    for q in qs:
        position = q * last
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, last)
        low = np.take_along_axis(ordered, below[:, None], axis=1)[:, 0]
        high = np.take_along_axis(ordered, above[:, None], axis=1)[:, 0]
        result = low + (high - low) * (position - below)
        result[n_valid == 0] = np.nan
        results.append(result)
    return results


def _interval(ratios: np.ndarray, options: GapOptions) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - options.ci_level) / 2
    lo, hi = _nan_quantile_rows(ratios, (alpha, 1 - alpha))
    return lo, hi


def _interval_frame(concepts: np.ndarray, ratios: np.ndarray, options: GapOptions) -> pl.DataFrame:
    lo, hi = _interval(ratios, options)
    return pl.DataFrame(
        {"concept": concepts.astype(np.int32), "chi_model_lo": lo, "chi_model_hi": hi},
        schema={"concept": pl.Int32, "chi_model_lo": pl.Float64, "chi_model_hi": pl.Float64},
    ).with_columns(pl.col("chi_model_lo", "chi_model_hi").fill_nan(None))


def _with_interval(frame: pl.DataFrame, interval: pl.DataFrame | None, on: list[str],
                   options: GapOptions) -> pl.DataFrame:
    """Join the interval columns (null where chi_model is null, the scored support is below min_ci_support,
    or the bootstrap is off)."""
    if interval is None:
        return frame.with_columns(chi_model_lo=pl.lit(None, pl.Float64), chi_model_hi=pl.lit(None, pl.Float64))
    frame = frame.join(interval, on=on, how="left")
    defined = pl.col("chi_model").is_not_null() & (pl.col("scored_support") >= options.min_ci_support)
    return frame.with_columns(
        pl.when(defined).then(pl.col("chi_model_lo")).alias("chi_model_lo"),
        pl.when(defined).then(pl.col("chi_model_hi")).alias("chi_model_hi"),
    )


# ---------------------------------------------------------------------------------------------------------
# Streaming accumulation: per benchmark and concept, sums and bootstrap replicates, one batch of rows at a time


SUMS = ["support", "sum_saliency", "sum_saliency_sq", "scored_support", "scored_saliency", "scored_saliency_sq",
        "weighted_score"]

SaliencyBatches = Iterable[pl.DataFrame]
"""One benchmark's saliency rows (item_id, concept, saliency) in batches of any size. Iterated once when the rows
come in extraction's order (each item's rows together, concepts ascending), a second time otherwise (the exact
duplicate check), so pass something that can be iterated again (a list, `reduce.ShardBatches`)."""


def _concept_sums(concept: np.ndarray, saliency: np.ndarray, score: np.ndarray, n_concepts: int
                  ) -> dict[str, np.ndarray]:
    """Per concept, over these rows (saliency > 0): support, Σ s, Σ s² over all supporting items (coverage), and
    the same plus Σ s·p over the scored ones (score not NaN: chi_model and its support)."""
    scored = ~np.isnan(score)
    squared = saliency * saliency
    concept_scored, saliency_scored = concept[scored], saliency[scored]

    def per_concept(where: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(where, weights, minlength=n_concepts)

    return {
        "support": per_concept(concept),
        "sum_saliency": per_concept(concept, saliency),
        "sum_saliency_sq": per_concept(concept, squared),
        "scored_support": per_concept(concept_scored),
        "scored_saliency": per_concept(concept_scored, saliency_scored),
        "scored_saliency_sq": per_concept(concept_scored, squared[scored]),
        "weighted_score": per_concept(concept_scored, saliency_scored * score[scored]),
    }


class ExtractionOrder:
    """Proves a benchmark's rows free of duplicate (item, concept) pairs as they stream past, as long as they
    come in the order extraction writes them: each item's rows together, its concepts strictly ascending. It
    keeps one flag per item, not a key per row (the row-keyed check was the reducer's memory peak)."""

    def __init__(self, n_items: int) -> None:
        self.started = np.zeros(n_items, dtype=bool)  # items whose rows have begun
        self.last = (-1, -1)  # (item, concept) of the row before this batch
        self.holds = True
        self.n_rows = 0

    def update(self, item: np.ndarray, concept: np.ndarray) -> None:
        self.n_rows += item.size
        if not self.holds or item.size == 0:
            return
        previous_item = np.concatenate([[self.last[0]], item[:-1]])
        previous_concept = np.concatenate([[self.last[1]], concept[:-1]])
        same = item == previous_item
        starts = item[~same]  # the first row of each run of an item
        ascending = bool(np.all(concept[same] > previous_concept[same]))
        fresh = not self.started[starts].any() and np.unique(starts).size == starts.size
        self.started[starts] = True
        self.last = (int(item[-1]), int(concept[-1]))
        self.holds = ascending and fresh

    def check_duplicates(self, items: BenchmarkItems, batches: SaliencyBatches, n_concepts: int) -> None:
        """Raise on a duplicate (item, concept) row once every batch went through `update`. Rows in extraction's
        order were proven free of them while streaming; otherwise read the batches again and compare integer keys
        (8 bytes a row, this benchmark only)."""
        if self.holds:
            return
        keys = [items.index(batch) * n_concepts + batch["concept"].cast(pl.Int64).to_numpy() for batch in batches]
        keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
        if keys.size != self.n_rows:
            raise ValueError(f"saliency of {items.name}: the batches gave {keys.size} rows on a second "
                             f"reading and {self.n_rows} on the first; rows not in extraction's order (by item, "
                             "concepts ascending) must come from something that can be iterated twice")
        if np.any(keys[1:] == keys[:-1]):
            raise ValueError("saliency: duplicate (benchmark, item_id, concept) rows")


@dataclass
class BenchmarkItems:
    """One benchmark's items in `items` order: the item index of an id, scores, and each scored item's position
    among the scored ones (the row of its bootstrap resample counts)."""

    name: str
    ids: pl.Enum  # the item ids as categories: a row's category code is its item's index
    scores: np.ndarray  # (n_items,) float64, NaN when unscored
    scored_position: np.ndarray  # (n_items,) int64, -1 when unscored

    @classmethod
    def of(cls, name: str, items: pl.DataFrame) -> BenchmarkItems:
        scores = items["score"].to_numpy().astype(np.float64)  # null -> NaN
        scored = ~np.isnan(scores)
        position = np.full(scores.size, -1, dtype=np.int64)
        position[scored] = np.arange(scored.sum())
        return cls(name, pl.Enum(items["item_id"]), scores, position)

    @property
    def n_items(self) -> int:
        return self.scores.size

    def index(self, batch: pl.DataFrame) -> np.ndarray:
        """Each row's item index; a row of an item outside the universe is an error (it would make counts and
        normalisations silently wrong)."""
        codes = batch["item_id"].cast(pl.String).cast(self.ids, strict=False).to_physical()
        if codes.has_nulls():
            unknown = batch.filter(codes.is_null())
            first = {"benchmark": self.name, **unknown.row(0, named=True)}
            raise ValueError(f"saliency: rows for items missing from `items` ({unknown.height} in one batch of "
                             f"{self.name}), e.g. {first}")
        return codes.to_numpy().astype(np.int64)


def checked_rows(items: BenchmarkItems, batch: pl.DataFrame, n_concepts: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's item index, concept (int64) and saliency (float64: sums over thousands of items accumulate in
    it), checked as every reader of the shards checks them: values, concept range, known items."""
    rows = batch.select(pl.col("concept").cast(pl.Int64), pl.col("saliency").cast(pl.Float64))
    check_saliency_values(rows, n_concepts)
    return items.index(batch), rows["concept"].to_numpy(), rows["saliency"].to_numpy()


def batch_matrix(item: np.ndarray, concept: np.ndarray, saliency: np.ndarray, n_concepts: int
                 ) -> tuple[np.ndarray, torch.Tensor]:
    """The items these rows touch (sorted) and the rows as a sparse (concepts × those items) matrix: multiplied
    by per-item weights (`weights[items]`), it gives every concept's weighted saliency sum over the batch."""
    items, local = np.unique(item, return_inverse=True)
    return items, sorted_sparse(concept, local.astype(np.int64), (n_concepts, items.size))(saliency)


class _BenchmarkAccumulator:
    """One benchmark's sufficient statistics, fed a batch of rows at a time: the per-concept sums (SUMS) and,
    with the bootstrap on, every replicate's Σ_i w_i s_i p_i and Σ_i w_i s_i (w_i: how often the replicate
    draws item i) as one (concepts × 2·n_boot) array. Memory: concepts × n_boot, whatever the rows."""

    def __init__(self, items: BenchmarkItems, n_concepts: int, options: GapOptions) -> None:
        self.items, self.n_concepts = items, n_concepts
        self.sums = {name: np.zeros(n_concepts, dtype=np.int64 if name.endswith("support") else np.float64)
                     for name in SUMS}
        self.order = ExtractionOrder(items.n_items)
        self.n_boot = options.n_bootstrap
        n_scored = int((items.scored_position >= 0).sum())
        self.counts = self.scored_scores = self.replicates = None
        if self.n_boot > 0 and n_scored > 0:
            self.counts = _resample_counts(n_scored, options, items.name)  # (scored items, n_boot)
            self.scored_scores = items.scores[items.scored_position >= 0]
            self.replicates = np.zeros((n_concepts, 2 * self.n_boot))

    def add(self, batch: pl.DataFrame) -> None:
        item, concept, saliency = checked_rows(self.items, batch, self.n_concepts)
        self.order.update(item, concept)
        positive = saliency > 0  # a stored 0 means the same as an absent pair
        item, concept, saliency = item[positive], concept[positive], saliency[positive]
        score = self.items.scores[item]
        for name, values in _concept_sums(concept, saliency, score, self.n_concepts).items():
            self.sums[name] += values
        if self.replicates is not None:
            scored = ~np.isnan(score)
            self._add_replicates(item[scored], concept[scored], saliency[scored])

    def _add_replicates(self, item: np.ndarray, concept: np.ndarray, saliency: np.ndarray) -> None:
        """This batch's share of every replicate: (concepts × its scored items) sparse times their weights."""
        if item.size == 0:
            return
        drawn, matrix = batch_matrix(self.items.scored_position[item], concept, saliency, self.n_concepts)
        counts = self.counts[drawn].astype(np.float64)
        # Σ_i s_i (w_i p_i) and Σ_i s_i w_i in one sparse product: [w·p | w] per scored item of the batch.
        weights = np.concatenate([counts * self.scored_scores[drawn, None], counts], axis=1)
        self.replicates += torch.sparse.mm(matrix, torch.from_numpy(weights)).numpy()

    def replicate_ratios(self) -> np.ndarray | None:
        """(concepts × n_boot) bootstrap chi_model, NaN where a replicate holds none of the concept's scored items;
        None without bootstrap or scored items."""
        if self.replicates is None:
            return None
        return ratio(self.replicates[:, :self.n_boot], self.replicates[:, self.n_boot:])


class _SuiteReplicates:
    """The suite chi_model's bootstrap replicates, built one benchmark at a time (items are resampled within
    each benchmark): pooled Σ_b num / Σ_b den, or with pooling 'mean' the mean of the per-benchmark ratios over
    the benchmarks where the replicate is defined."""

    def __init__(self, n_concepts: int, options: GapOptions) -> None:
        self.pooled = options.pooling == "pooled"
        shape = (n_concepts, options.n_bootstrap)
        self.numerator, self.denominator = np.zeros(shape), np.zeros(shape)  # or mean's sum and count

    def add(self, benchmark: _BenchmarkAccumulator, ratios: np.ndarray) -> None:
        if self.pooled:
            self.numerator += benchmark.replicates[:, :benchmark.n_boot]
            self.denominator += benchmark.replicates[:, benchmark.n_boot:]
        else:
            self.numerator += np.nan_to_num(ratios)
            self.denominator += ~np.isnan(ratios)

    def ratios(self) -> np.ndarray:
        return ratio(self.numerator, self.denominator)


SUMS_SCHEMA = {"concept": pl.Int32, "benchmark": pl.String, "n_items": pl.Int64,
               **{name: pl.Int64 if name.endswith("support") else pl.Float64 for name in SUMS}}


def _sums_frame(benchmark: str, n_items: int, sums: dict[str, np.ndarray]) -> pl.DataFrame:
    n_concepts = sums["support"].size
    return pl.DataFrame({"concept": np.arange(n_concepts, dtype=np.int32), "benchmark": [benchmark] * n_concepts,
                         "n_items": np.full(n_concepts, n_items), **sums}, schema=SUMS_SCHEMA)


@dataclass
class GapStatistics:
    """Everything the gap tables need, accumulated from the saliency rows by `gap_statistics`. Its size is
    concepts × benchmarks, whatever the number of rows."""

    n_concepts: int
    items: pl.DataFrame
    """The checked item universe: benchmark, item_id, score."""
    sums: pl.DataFrame
    """Per benchmark of `items` and concept (K rows each): concept, benchmark, n_items and SUMS."""
    suite_sums: pl.DataFrame
    """Per concept: SUMS over the whole suite, and prior_score = Σ_b p̄_b · scored_saliency_b (the numerator of
    the pooled chi_model_prior, rankings.py)."""
    intervals: pl.DataFrame | None
    """benchmark, concept, chi_model_lo, chi_model_hi (percentile bootstrap); None when it is off."""
    suite_interval: pl.DataFrame | None
    """concept, chi_model_lo, chi_model_hi of the suite chi_model; None when the bootstrap is off."""


def _benchmark_statistics(name: str, items: pl.DataFrame, batches: SaliencyBatches, n_concepts: int,
                          options: GapOptions) -> _BenchmarkAccumulator:
    accumulator = _BenchmarkAccumulator(BenchmarkItems.of(name, items), n_concepts, options)
    for batch in batches:
        accumulator.add(batch)
    accumulator.order.check_duplicates(accumulator.items, batches, n_concepts)
    return accumulator


def reject_unknown_benchmarks(saliency: Mapping[str, SaliencyBatches], known: list[str]) -> None:
    """Rows of a benchmark with no items are rows of items missing from the universe."""
    for name in sorted(set(saliency) - set(known)):
        for batch in saliency[name]:
            if batch.height:
                first = {"benchmark": name, **batch.row(0, named=True)}
                raise ValueError(f"saliency: rows for items missing from `items` (benchmark {name} has no "
                                 f"items), e.g. {first}")


def gap_statistics(saliency: Mapping[str, SaliencyBatches], items: pl.DataFrame, n_concepts: int,
                   options: GapOptions) -> GapStatistics:
    """Stream every benchmark's saliency batches (benchmark -> batches; a benchmark of `items` without any has
    no saliency) once, keeping only per-concept sums and bootstrap replicates: one benchmark's replicates and
    the suite's (concepts × n_boot each) are the largest arrays held, and a batch is dropped once added.

    items: benchmark, item_id, score (null: no scorer). Every row must belong to an item of `items`."""
    items = check_items(items)
    concepts = _concept_frame(n_concepts)
    names = items["benchmark"].unique(maintain_order=True).to_list()
    reject_unknown_benchmarks(saliency, names)
    means = dict(benchmark_means(items).iter_rows())
    suite = {name: np.zeros(n_concepts, dtype=np.int64 if name.endswith("support") else np.float64)
             for name in SUMS}
    prior_score = np.zeros(n_concepts)
    suite_replicates = _SuiteReplicates(n_concepts, options) if options.n_bootstrap > 0 else None
    sums, intervals = [], []
    for name in names:
        own_items = items.filter(pl.col("benchmark") == name)
        benchmark = _benchmark_statistics(name, own_items, saliency.get(name, ()), n_concepts, options)
        for column, values in benchmark.sums.items():
            suite[column] += values
        if means[name] is not None:  # None: no scored item, so its scored saliency is 0 anyway
            prior_score += means[name] * benchmark.sums["scored_saliency"]
        sums.append(_sums_frame(name, own_items.height, benchmark.sums))
        ratios = benchmark.replicate_ratios()
        if ratios is not None:
            intervals.append(_interval_frame(np.arange(n_concepts), ratios, options)
                             .with_columns(benchmark=pl.lit(name, pl.String)))
            suite_replicates.add(benchmark, ratios)
        del benchmark, ratios  # its replicates go before the next benchmark's are allocated
    suite_interval = None
    if suite_replicates is not None:
        suite_interval = _interval_frame(np.arange(n_concepts), suite_replicates.ratios(), options)
    return GapStatistics(
        n_concepts=n_concepts,
        items=items,
        sums=pl.concat(sums) if sums else pl.DataFrame(schema=SUMS_SCHEMA),
        suite_sums=pl.DataFrame({"concept": concepts["concept"], **suite, "prior_score": prior_score}),
        intervals=pl.concat(intervals) if intervals else None,
        suite_interval=suite_interval,
    )


def frame_batches(saliency: pl.DataFrame) -> dict[str, SaliencyBatches]:
    """An in-memory saliency table (benchmark, item_id, concept, saliency) as one batch per benchmark."""
    saliency = saliency.with_columns(pl.col("benchmark").cast(pl.String))
    partitions = saliency.partition_by("benchmark", as_dict=True)
    return {key[0]: [frame.drop("benchmark")] for key, frame in partitions.items()}


# ---------------------------------------------------------------------------------------------------------
# Public tables


CONCEPT_BENCHMARK_COLUMNS = [
    "concept", "benchmark", "n_items", "support", "sum_saliency", "ess", "scored_support", "scored_ess",
    "chi_bench", "missing", "chi_model", "chi_model_lo", "chi_model_hi", "chi_model_adjusted",
]
SUITE_COLUMNS = [
    "concept", "chi_bench", "chi_model", "chi_model_lo", "chi_model_hi", "support", "n_benchmarks_active",
    "sum_saliency", "ess", "scored_support", "n_benchmarks_scored", "scored_ess", "classification",
    "passes_support_filter", "chi_model_adjusted", "chi_model_prior", "chi_model_shrunk", "chi_model_shrunk_adjusted",
]


def benchmark_table(statistics: GapStatistics, options: GapOptions) -> pl.DataFrame:
    """One row per (concept, benchmark), K × B rows, sorted by benchmark then concept.

    Columns: concept (Int32), benchmark, n_items (items of the benchmark), support (#items where s > 0),
    sum_saliency (Σ_i s), ess ((Σ s)² / Σ s², null without support), scored_support and scored_ess (the same
    over items with a score), chi_bench (Σ_i s · K / Σ_{i,c'} s; 0 when the concept never fires in b; null when
    b has no saliency at all), missing (the concept never fires in b), chi_model (Σ s·p / Σ s over scored
    items; null when no scored item supports it), chi_model_lo/hi (percentile bootstrap over the scored items
    of b; null when chi_model is null, scored_support < min_ci_support or n_bootstrap == 0), chi_model_adjusted
    (chi_model − p̄_b = Σ s (p − p̄_b) / Σ s, p̄_b the mean score of b's scored items; null with chi_model).
    """
    total = pl.col("sum_saliency").sum().over("benchmark")
    table = statistics.sums.with_columns(
        pl.when(total > 0).then(pl.col("sum_saliency") * statistics.n_concepts / total).otherwise(None)
        .alias("chi_bench"),
        # Defined from support so a benchmark without saliency (chi_bench null) still reads as all-missing.
        (pl.col("support") == 0).alias("missing"),
        *_estimates(),
    )
    table = _with_interval(table, statistics.intervals, ["benchmark", "concept"], options)
    table = table.join(benchmark_means(statistics.items), on="benchmark", how="left").with_columns(
        adjusted_chi_model("chi_model", "benchmark_mean"))
    return table.select(CONCEPT_BENCHMARK_COLUMNS).sort("benchmark", "concept")


def concept_benchmark_table(
    saliency: pl.DataFrame, items: pl.DataFrame, n_concepts: int, options: GapOptions
) -> pl.DataFrame:
    """`benchmark_table` of an in-memory saliency table (benchmark, item_id, concept, saliency > 0 or 0 for
    absent) and items (benchmark, item_id, score; null: no scorer)."""
    return benchmark_table(gap_statistics(frame_batches(saliency), items, n_concepts, options), options)


def _classify(chi_bench: pl.Series, options: GapOptions) -> tuple[pl.Series, float | None, float | None]:
    """missing (chi_bench null or <= epsilon); among the rest, under/over by percentiles of their chi_bench."""
    values = chi_bench.to_numpy().astype(np.float64)  # null -> NaN
    missing = ~(values > options.epsilon)
    covered = values[~missing]
    if covered.size == 0:
        return pl.Series("classification", ["missing"] * len(values)), None, None
    under = float(np.percentile(covered, options.under_percentile))
    over = float(np.percentile(covered, options.over_percentile))
    labels = np.where(missing, "missing", np.where(values < under, "under", np.where(values > over, "over", "normal")))
    return pl.Series("classification", labels.tolist()), under, over


def _with_support_aware_estimates(suite: pl.DataFrame, statistics: GapStatistics,
                                  concept_benchmark: pl.DataFrame, options: GapOptions
                                  ) -> tuple[pl.DataFrame, float | None]:
    """Prior, adjusted and shrunk chi_model (rankings.py), and the κ used."""
    if options.pooling == "pooled":
        # The pooled prior m_c = Σ_i s·p̄_b / Σ_i s over scored rows, from each benchmark's sums (it is linear in s).
        prior = statistics.suite_sums.select(
            "concept", chi_model_prior=pl.when(pl.col("scored_saliency") > 0)
            .then(pl.col("prior_score") / pl.col("scored_saliency")))
    else:
        means = benchmark_means(statistics.items)
        prior = mean_prior(concept_benchmark.with_columns(pl.col("concept").cast(pl.Int32)), means)
    suite = suite.join(prior.with_columns(pl.col("concept").cast(pl.Int32)), on="concept", how="left")
    # Prior and chi_model rest on the same scored items; keep 'null exactly where chi_model is' explicit.
    suite = suite.with_columns(pl.when(pl.col("chi_model").is_not_null()).then(pl.col("chi_model_prior"))
                               .alias("chi_model_prior"))
    terms = sampling_terms(statistics.sums, benchmark_spread(statistics.items), options.pooling)
    kappa = shrinkage_strength(suite.join(terms, on="concept", how="left"), options.shrinkage_strength)
    return suite.with_columns(adjusted_chi_model(), shrunk_chi_model(kappa), shrunk_adjusted_chi_model(kappa)), kappa


def suite_table(statistics: GapStatistics, concept_benchmark: pl.DataFrame, options: GapOptions
                ) -> tuple[pl.DataFrame, dict]:
    """One row per concept (K rows, sorted), and the thresholds used.

    Columns: concept, chi_bench (mean over benchmarks of chi_bench, benchmarks without saliency excluded),
    chi_model (pooled Σ_b Σ_i s·p / Σ_b Σ_i s over scored items, or with pooling 'mean' the mean of the non-null
    per-benchmark values), chi_model_lo/hi (bootstrap, items resampled within each benchmark; null below
    min_ci_support scored items), support (items where the concept fires, whole suite), n_benchmarks_active
    (benchmarks where it fires), sum_saliency, ess, scored_support, n_benchmarks_scored and scored_ess (the same
    over scored items only), classification (missing | under | normal | over), passes_support_filter (on the
    scored counts: coverage-only items cannot make a chi_model ranking look well supported), then (rankings.py)
    chi_model_adjusted (chi_model − chi_model_prior: below 0, weaker than its benchmarks predict),
    chi_model_prior (Σ s·p̄_b / Σ s over scored items, or with pooling 'mean' the mean p̄_b over the benchmarks
    with a chi_model), chi_model_shrunk ((n·chi_model + κ·prior) / (n + κ), n the scored ESS) and
    chi_model_shrunk_adjusted (shrunk − prior = n·(chi_model − prior) / (n + κ)); all four null where chi_model is.
    The dict holds the options, the chi_bench thresholds (null when no concept is covered) and the κ used
    (`shrinkage_strength`: the configured one or the estimate; null when no concept has a chi_model).
    """
    n_concepts = statistics.n_concepts
    per_benchmark = concept_benchmark.group_by("concept").agg(
        chi_bench=pl.col("chi_bench").mean(),
        n_benchmarks_active=(pl.col("support") > 0).sum().cast(pl.Int64),
        n_benchmarks_scored=(pl.col("scored_support") > 0).sum().cast(pl.Int64),
        mean_chi_model=pl.col("chi_model").mean(),
    )
    suite = statistics.suite_sums.drop("prior_score").join(
        per_benchmark.with_columns(pl.col("concept").cast(pl.Int32)), on="concept", how="left")
    suite = suite.with_columns(*_estimates(), pl.col("n_benchmarks_active", "n_benchmarks_scored").fill_null(0))
    if options.pooling == "mean":
        suite = suite.with_columns(chi_model=pl.col("mean_chi_model"))

    suite = _with_interval(suite.sort("concept"), statistics.suite_interval, ["concept"], options)
    suite, kappa = _with_support_aware_estimates(suite, statistics, concept_benchmark, options)

    classification, under, over = _classify(suite["chi_bench"], options)
    suite = suite.with_columns(
        classification,
        passes_support_filter=(pl.col("n_benchmarks_scored") >= options.min_benchmarks)
        & (pl.col("scored_support") >= options.min_support),
    )
    thresholds = {
        "n_concepts": n_concepts,
        "epsilon": options.epsilon,
        "under_percentile": options.under_percentile,
        "over_percentile": options.over_percentile,
        "under_threshold": under,
        "over_threshold": over,
        "pooling": options.pooling,
        "min_benchmarks": options.min_benchmarks,
        "min_support": options.min_support,
        "n_bootstrap": options.n_bootstrap,
        "ci_level": options.ci_level,
        "min_ci_support": options.min_ci_support,
        "seed": options.seed,
        "ranking": options.ranking,
        "shrinkage_strength": kappa,
    }
    return suite.select(SUITE_COLUMNS).sort("concept"), thresholds


def concept_suite_table(
    concept_benchmark: pl.DataFrame,
    saliency: pl.DataFrame,
    items: pl.DataFrame,
    n_concepts: int,
    options: GapOptions,
) -> tuple[pl.DataFrame, dict]:
    """`suite_table` of an in-memory saliency table and items (as `concept_benchmark_table`)."""
    statistics = gap_statistics(frame_batches(saliency), items, n_concepts, options)
    return suite_table(statistics, concept_benchmark, options)


def missing_percent(concept_benchmark: pl.DataFrame) -> pl.DataFrame:
    """Per benchmark: benchmark, n_items, covered (concepts that fire), missing_percent = 100·(1 − covered/K)."""
    return (
        concept_benchmark.group_by("benchmark")
        .agg(
            n_items=pl.col("n_items").first(),
            covered=(~pl.col("missing")).sum().cast(pl.Int64),
            n_concepts=pl.len(),
        )
        .with_columns(missing_percent=100.0 * (1 - pl.col("covered") / pl.col("n_concepts")))
        .select("benchmark", "n_items", "covered", "missing_percent")
        .sort("benchmark")
    )


def jaccard_overlap(concept_benchmark: pl.DataFrame) -> pl.DataFrame:
    """Every ordered pair of benchmarks (diagonal included, for heatmaps): benchmark_a, benchmark_b,
    n_intersection, n_union, jaccard = |C_a ∩ C_b| / |C_a ∪ C_b| of covered concept sets (null if both empty)."""
    names = sorted(concept_benchmark["benchmark"].unique().to_list())
    # (benchmarks × concepts) 0/1 matrix by integer codes: a pivot to K columns took seconds at 65,536 concepts.
    row = concept_benchmark["benchmark"].cast(pl.Enum(names)).to_physical().to_numpy()
    column = concept_benchmark["concept"].rank("dense").to_numpy().astype(np.int64) - 1
    covered = np.zeros((len(names), column.max(initial=-1) + 1), dtype=np.int64)
    covered[row, column] = ~concept_benchmark["missing"].to_numpy()
    intersection = covered @ covered.T
    sizes = covered.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - intersection
    pairs = [
        (a, b, int(intersection[i, j]), int(union[i, j]),
         float(intersection[i, j] / union[i, j]) if union[i, j] else None)  # both sets empty: undefined
        for i, a in enumerate(names)
        for j, b in enumerate(names)
    ]
    return pl.DataFrame(
        pairs,
        schema={"benchmark_a": pl.String, "benchmark_b": pl.String, "n_intersection": pl.Int64,
                "n_union": pl.Int64, "jaccard": pl.Float64},
        orient="row",
    )


# ---------------------------------------------------------------------------------------------------------
# Markdown summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}"


MISSING_LABEL_CHARS = 40
"""Labels are cut shorter in "What each benchmark misses", whose cells list several concepts."""


def _name(concept: int, labels: Mapping[int, str] | None, limit: int | None = None) -> str:
    """A concept in summary.md: its bare index without labels (as before labels existed), else "#id label"
    (`concept_markdown`: cut and escaped; "#id" for a concept without a label)."""
    if not labels:
        return str(int(concept))
    return concept_markdown(concept, labels) if limit is None else concept_markdown(concept, labels, limit)


def _ranking_rows(frame: pl.DataFrame, labels: Mapping[int, str] | None = None) -> list[list[str]]:
    """The plain chi_model and its interval, the shrunk and benchmark-adjusted values, and the scored counts
    they rest on."""
    return [
        [_name(r["concept"], labels), _fmt(r["chi_model"]),
         f"[{_fmt(r['chi_model_lo'])}, {_fmt(r['chi_model_hi'])}]",
         _fmt(r["chi_model_shrunk_adjusted"]), _fmt(r["chi_model_shrunk"]), _fmt(r["chi_model_adjusted"]),
         str(r["scored_support"]), str(r["n_benchmarks_scored"]), _fmt(r["scored_ess"], 1)]
        for r in frame.iter_rows(named=True)
    ]


RANKING_TITLES = {
    "shrunk_adjusted": ("lowest {n} by shrunk adjusted chi_model", "highest {n} by shrunk adjusted chi_model"),
    "shrunk": ("lowest {n} by shrunk chi_model", "highest {n} by shrunk chi_model"),
    "lower_bound": ("lowest {n} by CI upper bound", "highest {n} by CI lower bound"),
    "point": ("lowest {n} by chi_model", "highest {n} by chi_model"),
}


def _ranking_note(pool: pl.DataFrame, thresholds: dict) -> str:
    """Which ranking ordered the lists, and (lower_bound) how many concepts lack the interval it needs."""
    ranking = thresholds["ranking"]
    note = ranking_description(ranking, thresholds.get("shrinkage_strength"))
    if ranking == "lower_bound":
        without = pool.filter(pl.col("chi_model_lo").is_null()).height
        if without == pool.height:
            note += (f" **But none of the {pool.height} ranked concepts has an interval** (n_bootstrap = 0 or "
                     "too few scored items), so the lists fall back to the plain chi_model.")
        elif without:
            note += f" {without} of the {pool.height} ranked concepts have no interval."
    return note + (" shrunk adj. = chi_model_shrunk_adjusted; shrunk = chi_model_shrunk; adjusted = chi_model_adjusted "
                   "(chi_model − what its benchmarks predict).")


def _ranking_section(suite: pl.DataFrame, thresholds: dict, top_n: int,
                     labels: Mapping[int, str] | None = None) -> list[str]:
    """Weakest and strongest concepts by the configured ranking (gaps.ranking), among those passing the support
    filter (or a stated fallback); every table shows the plain chi_model too."""
    rated = suite.filter(pl.col("chi_model").is_not_null())
    if rated.height == 0:
        return ["## chi_model ranking", "", "No concept has a chi_model (no scored items): no ranking."]
    pool = rated.filter(pl.col("passes_support_filter"))
    if pool.height:
        note = (f"Among the {pool.height} concepts passing the support filter (firing on scored items in ≥ "
                f"{thresholds['min_benchmarks']} benchmarks, on ≥ {thresholds['min_support']} scored items).")
    else:
        pool = rated.filter(pl.col("scored_support") > 0)
        note = (f"**No concept passes the support filter** (≥ {thresholds['min_benchmarks']} benchmarks, ≥ "
                f"{thresholds['min_support']} scored items); falling back to all {pool.height} concepts with "
                "scored support > 0 and a chi_model. Treat these rankings as weak evidence.")
    if "min_ci_support" in thresholds:
        note += f" No interval (N/A) below {thresholds['min_ci_support']} scored supporting items."
    header = ["concept", "chi_model", f"{thresholds.get('ci_level', 0.95):.0%} CI", "shrunk adj.", "shrunk", "adjusted",
              "scored support", "scored benchmarks", "scored ESS"]
    ranking = thresholds["ranking"]
    worst = rank_concepts(pool, ranking).head(top_n)
    best = rank_concepts(pool, ranking, strongest=True).head(top_n)
    worst_title, best_title = RANKING_TITLES[ranking]
    return [
        "## chi_model ranking", "", note, "", _ranking_note(pool, thresholds), "",
        f"### Model gaps: {worst_title.format(n=worst.height)}", "",
        markdown_table(header, _ranking_rows(worst, labels)), "",
        f"### Strengths: {best_title.format(n=best.height)}", "",
        markdown_table(header, _ranking_rows(best, labels)),
    ]


def most_missing_per_benchmark(suite: pl.DataFrame, concept_benchmark: pl.DataFrame, n: int = 5) -> pl.DataFrame:
    """Per benchmark, the n concepts it never evokes that the rest of the suite exercises most (highest suite
    chi_bench among the concepts missing from it; ties by concept): what that benchmark fails to test.
    Columns: benchmark, concept, chi_bench (suite), n_benchmarks_active; sorted by benchmark, then rank."""
    missing = concept_benchmark.filter(pl.col("missing")).select("benchmark", pl.col("concept").cast(pl.Int32))
    ranked = missing.join(suite.select(pl.col("concept").cast(pl.Int32), "chi_bench", "n_benchmarks_active"),
                          on="concept").filter(pl.col("chi_bench") > 0)
    return (ranked.sort(["benchmark", "chi_bench", "concept"], descending=[False, True, False])
            .group_by("benchmark", maintain_order=True).head(n))


def _most_missing_section(suite: pl.DataFrame, concept_benchmark: pl.DataFrame, n: int,
                          labels: Mapping[int, str] | None = None) -> list[str]:
    top = most_missing_per_benchmark(suite, concept_benchmark, n)
    rows = [[benchmark, ", ".join(f"{_name(c, labels, MISSING_LABEL_CHARS)} ({_fmt(x, 2)})"
                                  for c, x in zip(group["concept"], group["chi_bench"]))]
            for (benchmark,), group in top.group_by("benchmark", maintain_order=True)]
    return [
        f"## What each benchmark misses: the {n} concepts it never evokes that the suite exercises most", "",
        "Suite chi_bench in brackets: high values are concepts other benchmarks test heavily.", "",
        markdown_table(["benchmark", "missing concepts (suite chi_bench)"], rows) if rows else "None.",
    ]


def summary_markdown(suite: pl.DataFrame, concept_benchmark: pl.DataFrame, thresholds: dict, top_n: int = 10,
                     labels: Mapping[int, str] | None = None) -> str:
    """A short human-readable report of the gap analysis, findings first: the model's weakest and strongest
    concepts, the least-covered concepts, what each benchmark misses; then counts and the thresholds used.
    Concepts are named by index, or "#id label" with `labels` (figure_data.read_labels; cut and escaped)."""
    n_concepts = suite.height
    counts = dict(suite["classification"].value_counts().iter_rows())
    n_missing = counts.get("missing", 0)
    per_benchmark = missing_percent(concept_benchmark)
    benchmark_rows = [[r["benchmark"], str(r["n_items"]), str(r["covered"]), _fmt(r["missing_percent"], 2)]
                      for r in per_benchmark.iter_rows(named=True)]
    threshold_rows = [[key, str(value)] for key, value in thresholds.items()]
    low_bench = suite.filter(pl.col("classification") != "missing").sort(["chi_bench", "concept"]).head(top_n)
    low_rows = [[_name(r["concept"], labels), _fmt(r["chi_bench"], 4), str(r["support"]),
                 str(r["n_benchmarks_active"])]
                for r in low_bench.iter_rows(named=True)]
    lines = [
        *_ranking_section(suite, thresholds, top_n, labels), "",
        f"## Benchmark gaps: lowest {low_bench.height} covered concepts by chi_bench", "",
        markdown_table(["concept", "chi_bench", "support", "benchmarks"], low_rows) if low_rows else "None covered.", "",
        *_most_missing_section(suite, concept_benchmark, 5, labels), "",
        "## Concepts", "",
        f"- {n_concepts} concepts, {per_benchmark.height} benchmarks.",
        f"- Missing from the whole suite (chi_bench ≤ ε = {thresholds['epsilon']}): {n_missing} "
        f"({100 * n_missing / max(n_concepts, 1):.1f} %).",
        "- Classification: " + ", ".join(f"{name} {counts.get(name, 0)}" for name in CLASSES) + ".",
        "",
        "## Missing concepts per benchmark", "",
        markdown_table(["benchmark", "items", "covered concepts", "missing %"], benchmark_rows), "",
        "## Thresholds", "",
        markdown_table(["setting", "value"], threshold_rows),
    ]
    return "\n".join(lines) + "\n"
