"""Cross-model comparison: which concepts does one model handle better than another?

Concepts belong to an SAE, so "the same concept" in two models needs a shared concept space. Two are built here:

- **Matched concepts** (any two models, whatever their widths). Both models read the same prompts, so every
  concept of either SAE has a saliency profile over the same items (s_i^c, i over the items both extracted).
  Concept a of model A and concept b of model B are matched when each is the other's most similar concept by
  cosine similarity of these profiles (mutual best match) and the similarity reaches `min_similarity`. Each keeps
  its own χ_model (its own SAE on its own model's activations, with its own model's scores: the paper's χ_model,
  untouched), and the pairs are ranked by how much the two differ.
- **Flipped SAE** (the paper's check; only for two models of the same residual width): model A's SAE reads model
  B's activations at the same layer on the same prompts, and B's scores give B a χ_model for each of A's
  concepts. Both models are then scored on one concept space, concept by concept, and the ranks compared
  (Spearman over the concepts with a χ_model in both).

Besides, the benchmarks are compared item by item (the same items, both models' scores), which needs no concepts.
Pure functions on polars frames; rendering is `figures.plot_cross_model`, I/O `run_compare` / `run_flipped`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import sparse, stats

from competency_gaps.concepts import SaliencyBatches, frame_batches
from competency_gaps.figure_data import concept_markdown, markdown_table, read_labels
from competency_gaps.reduce import load_items, saliency_batches
from competency_gaps.tables import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

ITEM_KEY = ["benchmark", "item_id"]
_MATCH_CHUNK = 512  # rows of A's concepts per similarity block: bounds memory at 512 × K_B floats
# What concepts.parquet contributes per model to the comparison tables.
CONCEPT_COLUMNS = ["concept", "chi_model", "chi_model_adjusted", "scored_support", "passes_support_filter"]
DIFFERENCES = {"chi_model": "delta", "chi_model_adjusted": "delta_adjusted"}


@dataclass(frozen=True)
class CompareOptions:
    """The `compare` config section but flipped_sae, which decides which jobs run (defaults as in the schema)."""

    top_n: int = 25
    min_similarity: float = 0.5
    by: str = "chi_model"  # the difference the tables are ordered by: chi_model or chi_model_adjusted

    def __post_init__(self) -> None:
        if self.by not in DIFFERENCES:
            raise ValueError(f"compare.by must be one of {sorted(DIFFERENCES)}, not {self.by!r}")


# ---------------------------------------------------------------------------------------------------------
# Benchmarks, item by item


def item_agreement(scores_a: pl.DataFrame, scores_b: pl.DataFrame) -> pl.DataFrame:
    """Per benchmark, and over every benchmark ("all"), on the items both models scored (columns benchmark,
    item_id, score): n_items, each model's mean score, their difference (A − B), the agreement
    mean(1 − |p_A − p_B|) (the share of items with the same verdict when scores are 0/1) and the Pearson
    correlation of the scores (null when either model's scores are constant there)."""
    both = (scores_a.select(*ITEM_KEY, score_a="score")
            .join(scores_b.select(*ITEM_KEY, score_b="score"), on=ITEM_KEY, how="inner")
            .drop_nulls(["score_a", "score_b"]))
    stats_ = dict(
        n_items=pl.len().cast(pl.Int64),
        mean_score_a=pl.col("score_a").mean(),
        mean_score_b=pl.col("score_b").mean(),
        agreement=(1 - (pl.col("score_a") - pl.col("score_b")).abs()).mean(),
        correlation=pl.corr("score_a", "score_b"),
    )
    per_benchmark = both.group_by("benchmark").agg(**stats_).sort("benchmark")
    suite = both.select(benchmark=pl.lit("all"), **stats_)
    table = pl.concat([per_benchmark, suite], how="vertical_relaxed")
    return table.with_columns(
        difference=pl.col("mean_score_a") - pl.col("mean_score_b"),
        correlation=pl.col("correlation").fill_nan(None),
    ).select("benchmark", "n_items", "mean_score_a", "mean_score_b", "difference", "agreement", "correlation")


# ---------------------------------------------------------------------------------------------------------
# Matched concepts


@dataclass
class Profiles:
    """A model's concepts as unit rows over the shared items, and which of its concepts fire at all."""

    matrix: sparse.csr_matrix
    """Concepts × shared items, s_i^c with each concept's row scaled to unit length (zero rows stay zero)."""
    live: np.ndarray
    """(K,) bool: the concept fires (saliency > 0) on some item this model extracted, shared or not."""


def saliency_profiles(saliency: pl.DataFrame | Mapping[str, SaliencyBatches], items: pl.DataFrame,
                      n_concepts: int) -> Profiles:
    """The profiles over `items` (benchmark, item_id, in their row order: the matrix's columns), read a batch of
    rows at a time (`reduce.saliency_batches`, or a frame with a benchmark column): what is held is the rows of the
    shared items as three arrays, never a frame of every row with its string ids."""
    if isinstance(saliency, pl.DataFrame):
        saliency = frame_batches(saliency)
    indexed = items.select(ITEM_KEY).with_row_index("column")
    live = np.zeros(n_concepts, dtype=bool)
    concepts, columns, values = [], [], []
    for benchmark, batches in saliency.items():
        own = indexed.filter(pl.col("benchmark") == benchmark)
        ids = pl.Enum(own["item_id"])  # a row's category code is its item's place among this benchmark's
        column_of = own["column"].cast(pl.Int32).to_numpy()
        for batch in batches:
            concept = batch["concept"].cast(pl.Int32).to_numpy()
            value = batch["saliency"].cast(pl.Float64).to_numpy()
            fires = value > 0
            live[concept[fires]] = True
            code = batch["item_id"].cast(pl.String).cast(ids, strict=False).to_physical()
            keep = fires & code.is_not_null().to_numpy()  # a row of an item outside `items` is left out
            concepts.append(concept[keep])
            columns.append(column_of[code.to_numpy()[keep].astype(np.int64)])
            values.append(value[keep])
    empty = [np.zeros(0, np.int32)]
    coordinates = (np.concatenate(concepts or empty), np.concatenate(columns or empty))
    del concepts, columns
    matrix = sparse.csr_matrix((np.concatenate(values or [np.zeros(0)]), coordinates), shape=(n_concepts, items.height))
    del values, coordinates
    # Unit rows, scaled in place: a copy of the matrix (12 B a row) would be this step's peak.
    row = np.repeat(np.arange(n_concepts), np.diff(matrix.indptr))
    norms = np.sqrt(np.bincount(row, matrix.data * matrix.data, minlength=n_concepts))
    matrix.data *= np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)[row]
    return Profiles(matrix, live)


def profile_matrix(saliency: pl.DataFrame | Mapping[str, SaliencyBatches], items: pl.DataFrame,
                   n_concepts: int) -> sparse.csr_matrix:
    """Concepts × items matrix of s_i^c over `items` (benchmark, item_id, in their row order), each concept's
    row scaled to unit length (a concept that fires on none of them stays a zero row)."""
    return saliency_profiles(saliency, items, n_concepts).matrix


def best_matches(profiles_a: sparse.csr_matrix, profiles_b: sparse.csr_matrix) -> tuple[np.ndarray, ...]:
    """For every row of A its most similar row of B and the cosine similarity, and the same from B to A
    (best_b_for_a, similarity_a, best_a_for_b, similarity_b). Computed a block of A's rows at a time, so the
    full K_A × K_B similarity matrix never exists (65,536² floats would not fit). Ties go to the lower index."""
    n_a, n_b = profiles_a.shape[0], profiles_b.shape[0]
    best_b, sim_a = np.zeros(n_a, dtype=np.int64), np.zeros(n_a)
    best_a, sim_b = np.zeros(n_b, dtype=np.int64), np.full(n_b, -np.inf)
    transposed = profiles_b.T.tocsc()
    for start in range(0, n_a, _MATCH_CHUNK):
        block = (profiles_a[start:start + _MATCH_CHUNK] @ transposed).toarray()
        best_b[start:start + block.shape[0]] = block.argmax(axis=1)
        sim_a[start:start + block.shape[0]] = block.max(axis=1)
        column_best = block.argmax(axis=0)
        column_sim = block[column_best, np.arange(n_b)]
        better = column_sim > sim_b  # strictly: an earlier block keeps a tie
        best_a[better], sim_b[better] = start + column_best[better], column_sim[better]
    return best_b, sim_a, best_a, np.maximum(sim_b, 0.0)


def match_concepts(saliency_a: pl.DataFrame | Mapping[str, SaliencyBatches],
                   saliency_b: pl.DataFrame | Mapping[str, SaliencyBatches], items: pl.DataFrame, n_concepts_a: int,
                   n_concepts_b: int, min_similarity: float) -> pl.DataFrame:
    """Pairs (concept_a, concept_b, similarity) of mutually most similar concepts, by cosine similarity of their
    saliency over `items` (the items both models extracted), with similarity ≥ min_similarity (> 0 always: two
    concepts that share no item are never a pair), most similar first."""
    return matched_pairs(profile_matrix(saliency_a, items, n_concepts_a),
                         profile_matrix(saliency_b, items, n_concepts_b), min_similarity)


def matched_pairs(profiles_a: sparse.csr_matrix, profiles_b: sparse.csr_matrix, min_similarity: float) -> pl.DataFrame:
    """`match_concepts` on the two models' profile matrices."""
    n_concepts_a = profiles_a.shape[0]
    best_b, sim_a, best_a, _ = best_matches(profiles_a, profiles_b)
    concepts_a = np.arange(n_concepts_a)
    mutual = (best_a[best_b] == concepts_a) & (sim_a > 0) & (sim_a >= min_similarity)
    return pl.DataFrame(
        {"concept_a": concepts_a[mutual], "concept_b": best_b[mutual], "similarity": sim_a[mutual]},
        schema={"concept_a": pl.Int64, "concept_b": pl.Int64, "similarity": pl.Float64},
    ).sort(["similarity", "concept_a"], descending=[True, False])


def _side(concepts: pl.DataFrame, suffix: str) -> pl.DataFrame:
    return concepts.select(CONCEPT_COLUMNS).rename({name: f"{name}_{suffix}" for name in CONCEPT_COLUMNS})


def concept_differences(pairs: pl.DataFrame, concepts_a: pl.DataFrame, concepts_b: pl.DataFrame,
                        by: str = "chi_model") -> pl.DataFrame:
    """Each pair (concept_a, concept_b, …) with both models' χ_model, benchmark-adjusted χ_model, scored support
    and support filter, delta = χ_model_A − χ_model_B and delta_adjusted = the same for the adjusted values,
    and `ranked` (both concepts pass their model's support filter and both values of `by` exist), ordered by
    |delta of `by`| (largest first) with the ranked pairs first."""
    frame = (pairs.with_columns(pl.col("concept_a", "concept_b").cast(pl.Int64))
             .join(_side(concepts_a.with_columns(pl.col("concept").cast(pl.Int64)), "a"), on="concept_a", how="left")
             .join(_side(concepts_b.with_columns(pl.col("concept").cast(pl.Int64)), "b"), on="concept_b", how="left"))
    frame = frame.with_columns(
        **{name: pl.col(f"{column}_a") - pl.col(f"{column}_b") for column, name in DIFFERENCES.items()}
    )
    key = DIFFERENCES[by]
    return frame.with_columns(
        ranked=(pl.col("passes_support_filter_a") & pl.col("passes_support_filter_b")).fill_null(False)
        & pl.col(key).is_not_null()
    ).sort([pl.col("ranked"), pl.col(key).abs(), pl.col("concept_a")], descending=[True, True, False],
           nulls_last=True)


def rank_agreement(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Spearman's rank correlation of two paired value arrays over the pairs where both are finite:
    {"spearman": rho or None (fewer than 3 pairs, or a constant side), "p_value": two-sided, "n": pairs}."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return {"spearman": None, "p_value": None, "n": n}
    result = stats.spearmanr(x[keep], y[keep])
    return {"spearman": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def _column(frame: pl.DataFrame, name: str) -> np.ndarray:
    return frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy()


def agreement_summary(differences: pl.DataFrame) -> dict[str, Any]:
    """Rank agreement of the two models' χ_model (and adjusted χ_model) over the compared concepts: over every
    pair where both exist, and over the ranked pairs (both pass the support filter)."""
    ranked = differences.filter("ranked")
    return {
        scope: {column: rank_agreement(_column(frame, f"{column}_a"), _column(frame, f"{column}_b"))
                for column in DIFFERENCES}
        for scope, frame in (("all", differences), ("ranked", ranked))
    }


# ---------------------------------------------------------------------------------------------------------
# Flipped SAE: one concept space, two models


def flipped_differences(own: pl.DataFrame, flipped: pl.DataFrame, by: str = "chi_model") -> pl.DataFrame:
    """The concepts of one SAE scored twice: `own` (its model's concepts.parquet) and `flipped` (the same SAE
    reading the other model, with the other model's scores). concept_differences on the identity pairing, with
    a for own and b for flipped."""
    concepts = own.select(pl.col("concept").cast(pl.Int64))
    pairs = concepts.select(concept_a="concept", concept_b="concept", similarity=pl.lit(1.0))
    return concept_differences(pairs, own, flipped, by=by).drop("similarity")


# ---------------------------------------------------------------------------------------------------------
# Markdown


def _number(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "N/A"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _rho(agreement: dict[str, Any]) -> str:
    if agreement["spearman"] is None:
        return f"N/A ({agreement['n']:,} concepts)"
    return f"{agreement['spearman']:.3f} (p {agreement['p_value']:.2g}, {agreement['n']:,} concepts)"


def benchmarks_markdown(agreement: pl.DataFrame, name_a: str, name_b: str) -> str:
    rows = [[row["benchmark"], f"{row['n_items']:,}", _number(row["mean_score_a"]), _number(row["mean_score_b"]),
             _number(row["difference"], signed=True), _number(row["agreement"]), _number(row["correlation"])]
            for row in agreement.iter_rows(named=True)]
    return markdown_table(["benchmark", "items scored by both", f"mean score {name_a}", f"mean score {name_b}",
                           "difference (A − B)", "agreement", "correlation"], rows)


def differences_markdown(differences: pl.DataFrame, labels_a: dict[int, str], labels_b: dict[int, str],
                         name_a: str, name_b: str, n: int, with_similarity: bool = True) -> str:
    rows = []
    for rank, row in enumerate(differences.head(n).iter_rows(named=True), start=1):
        cells = [str(rank), concept_markdown(row["concept_a"], labels_a)]
        if with_similarity:
            cells += [concept_markdown(row["concept_b"], labels_b), _number(row["similarity"], 2)]
        cells += [_number(row["chi_model_a"]), _number(row["chi_model_b"]), _number(row["delta"], signed=True),
                  _number(row["delta_adjusted"], signed=True),
                  f"{row['scored_support_a'] or 0:,} / {row['scored_support_b'] or 0:,}"]
        rows.append(cells)
    header = ["rank", f"concept of {name_a}"]
    if with_similarity:
        header += [f"matched concept of {name_b}", "similarity"]
    header += [f"χ_model {name_a}", f"χ_model {name_b}", "Δ (A − B)", "Δ adjusted", "scored support A / B"]
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------------------
# I/O


@dataclass(frozen=True)
class ModelRun:
    """One (model, layer)'s files: its saliency/item_tokens shards, scores, concepts.parquet and labels."""

    name: str
    saliency: list[str]
    tokens: list[str]
    scores: list[str]
    concepts: str
    labels: str | None
    n_concepts: int


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as temporary:
        frame.write_csv(temporary)


def _labelled(differences: pl.DataFrame, labels_a: dict[int, str], labels_b: dict[int, str]) -> pl.DataFrame:
    """The table with both concepts' labels (whole, as in the other CSVs) beside their ids."""
    return differences.with_columns(
        label_a=pl.col("concept_a").replace_strict(labels_a, default=None, return_dtype=pl.String),
        label_b=pl.col("concept_b").replace_strict(labels_b, default=None, return_dtype=pl.String),
    ).select("concept_a", "label_a", "concept_b", "label_b", pl.exclude("concept_a", "label_a", "concept_b", "label_b"))


def run_compare(run_a: ModelRun, run_b: ModelRun, options: CompareOptions, out_dir: Path,
                figures: bool = True) -> dict[str, Any]:
    """cross_model.md/.csv/.json, benchmarks.csv and (figures) cross_model.png/svg for one pair of
    (model, layer): matched concepts ranked by how much their χ_model differs, and item-level agreement."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items_a, items_b = load_items(run_a.tokens, run_a.scores), load_items(run_b.tokens, run_b.scores)
    shared = (items_a.filter("extracted").select(ITEM_KEY)
              .join(items_b.filter("extracted").select(ITEM_KEY), on=ITEM_KEY, how="inner").sort(ITEM_KEY))
    profiles_a = saliency_profiles(saliency_batches(run_a.saliency), shared, run_a.n_concepts)
    profiles_b = saliency_profiles(saliency_batches(run_b.saliency), shared, run_b.n_concepts)
    pairs = matched_pairs(profiles_a.matrix, profiles_b.matrix, options.min_similarity)
    differences = concept_differences(pairs, pl.read_parquet(run_a.concepts), pl.read_parquet(run_b.concepts),
                                      by=options.by)
    agreement = item_agreement(items_a, items_b)
    labels_a, labels_b = read_labels(run_a.labels), read_labels(run_b.labels)
    summary = {
        "model_a": run_a.name, "model_b": run_b.name,
        "shared_items": shared.height,
        "concepts": {"a": run_a.n_concepts, "b": run_b.n_concepts},
        "live": {"a": int(profiles_a.live.sum()), "b": int(profiles_b.live.sum())},  # fire on an item
        "matched_pairs": pairs.height, "ranked_pairs": int(differences["ranked"].sum()),
        "min_similarity": options.min_similarity, "ordered_by": DIFFERENCES[options.by],
        "rank_agreement": agreement_summary(differences),
        "matching": "mutual best match by cosine similarity of the concepts' saliency over the items both models "
                    "extracted; each concept keeps its own model's chi_model",
    }
    _write_csv(_labelled(differences, labels_a, labels_b), out_dir / "cross_model.csv")
    _write_csv(agreement, out_dir / "benchmarks.csv")
    write_json(summary, out_dir / "cross_model.json")
    write_text(compare_markdown(differences, agreement, summary, labels_a, labels_b, options.top_n),
               out_dir / "cross_model.md")
    if figures:
        from competency_gaps.figures import plot_cross_model

        plot_cross_model(differences.filter("ranked"), agreement, summary, labels_a, labels_b,
                         out_dir / "cross_model", n=options.top_n)
    log.info("%s vs %s: %d shared items, %d matched concept pairs (%d ranked)", run_a.name, run_b.name,
             shared.height, pairs.height, summary["ranked_pairs"])
    return summary


def compare_markdown(differences: pl.DataFrame, agreement: pl.DataFrame, summary: dict[str, Any],
                     labels_a: dict[int, str], labels_b: dict[int, str], n: int) -> str:
    a, b = summary["model_a"], summary["model_b"]
    ranked = differences.filter("ranked")
    order = "benchmark-adjusted χ_model" if summary["ordered_by"] == "delta_adjusted" else "χ_model"
    agreement_ranked = summary["rank_agreement"]["ranked"]
    return "\n".join([
        f"# Cross-model comparison: {a} vs {b}",
        "",
        "## What \"the same concept\" means here",
        "",
        f"The two models have their own SAEs, so their concepts are not the same list. A concept of {a} and one of "
        f"{b} are compared when each is the other's most similar concept by the items they fire on (cosine "
        f"similarity of their saliency over the {summary['shared_items']:,} items both models extracted, at least "
        f"{summary['min_similarity']:g}). Each keeps its own χ_model (its own SAE on its own model, with its own "
        "model's scores). A matched pair fires on the same items; whether it means the same thing is for its labels "
        "to show. With SAEs of one width, `compare.flipped_sae` scores both models on one SAE's concepts instead.",
        "",
        f"{summary['matched_pairs']:,} matched pairs; {summary['ranked_pairs']:,} pass both models' support filters. "
        f"Rank agreement of the two models' χ_model over those: Spearman {_rho(agreement_ranked['chi_model'])}; "
        f"of the benchmark-adjusted χ_model: {_rho(agreement_ranked['chi_model_adjusted'])}.",
        "",
        f"## Concepts whose {order} differs most (passing both support filters)",
        "",
        "Δ = A − B: positive where " + a + " does better. Δ adjusted subtracts what each model's benchmark means "
        "predict (χ_model_adjusted), so it is not driven by one model being better on a whole benchmark.",
        "",
        differences_markdown(ranked, labels_a, labels_b, a, b, n) if ranked.height else "No matched pair passes both support filters.",
        "",
        "## Benchmarks, item by item",
        "",
        "The same items scored by both models. Agreement: mean of 1 − |p_A − p_B| (the share of items with the same "
        "verdict when scores are 0/1); correlation: Pearson's r of the item scores.",
        "",
        benchmarks_markdown(agreement, a, b),
        "",
    ])


def run_flipped(own: str, flipped: str, labels: str | None, name_own: str, name_reader: str, options: CompareOptions,
                out_dir: Path) -> dict[str, Any]:
    """flipped.md/.csv/.json: one SAE's concepts scored on its own model (`own` concepts.parquet) and on another
    model read through it (`flipped` concepts.parquet from the flipped extraction), compared by rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    differences = flipped_differences(pl.read_parquet(own), pl.read_parquet(flipped), by=options.by)
    concept_labels = read_labels(labels)
    summary = {
        "sae_of": name_own, "reader": name_reader,
        "concepts_with_chi_model": {"own": int(differences["chi_model_a"].is_not_null().sum()),
                                    "flipped": int(differences["chi_model_b"].is_not_null().sum())},
        "ranked_concepts": int(differences["ranked"].sum()),
        "rank_agreement": agreement_summary(differences),
        "ordered_by": DIFFERENCES[options.by],
    }
    _write_csv(_labelled(differences, concept_labels, concept_labels).drop("concept_b", "label_b")
               .rename({"concept_a": "concept", "label_a": "label"}), out_dir / "flipped.csv")
    write_json(summary, out_dir / "flipped.json")
    ranked = differences.filter("ranked")
    agreement = summary["rank_agreement"]
    write_text("\n".join([
        f"# Flipped SAE: the SAE of {name_own} reading {name_reader}",
        "",
        f"One concept space (the SAE of {name_own}), two models: {name_own}'s own χ_model and {name_reader}'s, from "
        f"the same SAE reading {name_reader}'s activations at the same layer on the same prompts, with "
        f"{name_reader}'s scores.",
        "",
        f"Spearman of χ_model, concepts with a χ_model in both: {_rho(agreement['all']['chi_model'])}; passing both "
        f"support filters: {_rho(agreement['ranked']['chi_model'])}; benchmark-adjusted χ_model, passing both: "
        f"{_rho(agreement['ranked']['chi_model_adjusted'])}.",
        "",
        "## Concepts whose χ_model differs most (passing both support filters)",
        "",
        differences_markdown(ranked, concept_labels, concept_labels, name_own, name_reader, options.top_n,
                             with_similarity=False) if ranked.height else "No concept passes both support filters.",
        "",
    ]), out_dir / "flipped.md")
    log.info("flipped SAE of %s reading %s: Spearman %s", name_own, name_reader, agreement["all"]["chi_model"])
    return summary


def read_run(name: str, saliency: list[str], tokens: list[str], scores: list[str], concepts: str,
             labels: str | None, sae_dir: str) -> ModelRun:
    n_concepts = json.loads((Path(sae_dir) / "cfg.json").read_text())["d_sae"]
    return ModelRun(name, saliency, tokens, scores, concepts, labels, n_concepts)

