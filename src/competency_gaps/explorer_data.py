"""What the explorer shows, as plain JSON-able structures built from the stage tables: the concept table, the
concept map (the concept_map stage's layout, its clusters outlined and named), the heatmaps with the concepts
behind each cell, one detail record per concept and one record per item. No HTML or file layout here: `explorer_site` writes the site.

Metrics are keyed "model" (χ_model) and "bench" (χ_bench) everywhere, as in the site's toggle.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from competency_gaps.figure_data import benchmark_matrix, gold_text, pairwise_correlation, prompt_text
from competency_gaps.labels import label_terms
from competency_gaps.rankings import rank_concepts, ranking_key

METRIC_COLUMNS = {"model": "chi_model", "bench": "chi_bench"}
DRIVERS = 12
"""Concepts listed behind each heatmap cell (the largest contributions to the correlation; for the overlap, the
concepts both benchmarks cover and those only one covers)."""
_WORD = re.compile(r"[^\W_]{2,}", re.UNICODE)


def _rounded(values: Iterable[Any], digits: int = 4) -> list[float | None]:
    """Floats rounded for a compact JSON; NaN, infinities and None become null."""
    out = []
    for value in values:
        if value is None or not math.isfinite(float(value)):
            out.append(None)
        else:
            out.append(round(float(value), digits))
    return out


# ---------------------------------------------------------------------------------------------------------
# The concept table


def wide_per_benchmark(concept_benchmark: pl.DataFrame, column: str, concepts: list[int], benchmarks: list[str],
                       absent: float | None) -> list[list[Any]]:
    """One list per benchmark (in `benchmarks` order) of `column` per concept (in `concepts` order); `absent`
    where the concept has no row for that benchmark."""
    wide = (concept_benchmark.select("concept", "benchmark", column)
            .pivot(on="benchmark", index="concept", values=column))
    wide = pl.DataFrame({"concept": concepts}, schema={"concept": wide.schema["concept"]}).join(
        wide, on="concept", how="left", maintain_order="left")
    columns = []
    for benchmark in benchmarks:
        values = wide[benchmark].to_list() if benchmark in wide.columns else [None] * len(concepts)
        columns.append([absent if value is None else value for value in values])
    return columns


def concept_table(concepts: pl.DataFrame, concept_benchmark: pl.DataFrame, labels: pl.DataFrame | None,
                  benchmarks: list[str], ranking: str | None) -> dict[str, Any]:
    """Column-wise table of every concept: id, label, overall χ_model / χ_bench, the ranking score, support,
    classification, and per benchmark χ_model (null where the concept never fires there, shown "N/A"), χ_bench
    and support."""
    concepts = concepts.sort("concept")
    ids = concepts["concept"].to_list()
    label_of, source_of, detection_of = {}, {}, {}
    if labels is not None:
        for row in labels.select("concept", "label", "label_source", "detection_score").iter_rows():
            label_of[row[0]], source_of[row[0]], detection_of[row[0]] = row[1], row[2], row[3]
    ranking = ranking if ranking and ranking_key(ranking) in concepts.columns else "point"
    rank_column = ranking_key(ranking)
    # Positions in the ranking the weakest-concept lists use (1 = weakest): its scores can all be ≈ 0 with the
    # order carried by tiny differences, so the table sorts by position, not by a rounded score.
    order = rank_concepts(concepts, ranking)["concept"].to_list()
    rank_of = {concept: position + 1 for position, concept in enumerate(order)}
    support = wide_per_benchmark(concept_benchmark, "support", ids, benchmarks, 0)
    chi_model = wide_per_benchmark(concept_benchmark, "chi_model", ids, benchmarks, None)
    # A concept that never fires in a benchmark has no χ_model there (N/A), whatever the reducer stored.
    chi_model = [[None if n == 0 else v for v, n in zip(values, counts)] for values, counts in zip(chi_model, support)]
    return {
        "concept": ids,
        "label": [label_of.get(c) or "" for c in ids],
        "label_source": [source_of.get(c) or "" for c in ids],
        "detection": _rounded(detection_of.get(c) for c in ids),
        "chi_model": _rounded(concepts["chi_model"]),
        "chi_model_lo": _rounded(concepts["chi_model_lo"]),
        "chi_model_hi": _rounded(concepts["chi_model_hi"]),
        "chi_bench": _rounded(concepts["chi_bench"], 6),
        "rank": [rank_of[c] for c in ids],
        "rank_score": [None if v is None or not math.isfinite(v) else float(f"{v:.4g}") for v in concepts[rank_column]],
        "rank_column": rank_column,
        "support": concepts["support"].to_list(),
        "ess": _rounded(concepts["ess"], 2),
        "classification": concepts["classification"].to_list(),
        "passes_support_filter": concepts["passes_support_filter"].to_list(),
        "per_benchmark": {
            "model": [_rounded(values) for values in chi_model],
            "bench": [_rounded(values, 6) for values in
                      wide_per_benchmark(concept_benchmark, "chi_bench", ids, benchmarks, 0.0)],
            "support": support,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Heatmaps: correlation of a metric across benchmarks and the Jaccard overlap, with the concepts behind each cell


def correlation_drivers(values: np.ndarray, ids: list[int], r: float, n: int = DRIVERS) -> list[int]:
    """The concepts contributing most to a Pearson r between two columns (K × 2, NaN = absent): the largest
    products of standardised values, in the sign of r."""
    both = np.isfinite(values).all(axis=1)
    if both.sum() < 2 or not math.isfinite(r):
        return []
    x, y = values[both, 0], values[both, 1]
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return []
    products = ((x - x.mean()) / sx) * ((y - y.mean()) / sy) * (1.0 if r >= 0 else -1.0)
    kept = np.asarray(ids)[both]
    order = np.lexsort((kept, -products))[:n]
    return [int(kept[i]) for i in order]


def correlation_heatmap(concept_benchmark: pl.DataFrame, metric: str, benchmarks: list[str]) -> dict[str, Any]:
    """Pearson r of the metric between every pair of benchmarks over the concepts active in both, the number of
    those concepts, and the concepts driving each cell."""
    ids, matrix = benchmark_matrix(concept_benchmark, METRIC_COLUMNS[metric], benchmarks)
    r, n = pairwise_correlation(matrix)
    drivers = [[correlation_drivers(matrix[:, [i, j]], ids, r[i, j]) if i != j else []
                for j in range(len(benchmarks))] for i in range(len(benchmarks))]
    return {"r": [_rounded(row, 3) for row in r], "n": n.tolist(), "drivers": drivers}


def overlap_heatmap(concept_benchmark: pl.DataFrame, benchmarks: list[str], n: int = DRIVERS) -> dict[str, Any]:
    """Jaccard overlap of the covered concept sets of every pair of benchmarks; behind each cell the concepts both
    cover (largest smaller χ_bench first) and those only one covers (largest χ_bench first)."""
    ids, coverage = benchmark_matrix(concept_benchmark, "chi_bench", benchmarks)
    covered = np.isfinite(coverage) & (np.nan_to_num(coverage) > 0)
    ids_array = np.asarray(ids)
    size = len(benchmarks)
    jaccard: list[list[float | None]] = [[None] * size for _ in range(size)]
    shared: list[list[list[int]]] = [[[] for _ in range(size)] for _ in range(size)]
    only: list[list[list[int]]] = [[[] for _ in range(size)] for _ in range(size)]

    def top(mask: np.ndarray, key: np.ndarray) -> list[int]:
        order = np.lexsort((ids_array[mask], -key[mask]))[:n]
        return [int(c) for c in ids_array[mask][order]]

    filled = np.nan_to_num(coverage)
    for i in range(size):
        for j in range(size):
            union = (covered[:, i] | covered[:, j]).sum()
            both = covered[:, i] & covered[:, j]
            jaccard[i][j] = round(float(both.sum() / union), 4) if union else None
            if i != j:
                shared[i][j] = top(both, np.minimum(filled[:, i], filled[:, j]))
                only[i][j] = top(covered[:, i] & ~covered[:, j], filled[:, i])
    return {"jaccard": jaccard, "shared": shared, "only": only}


# ---------------------------------------------------------------------------------------------------------
# The concept map


def label_words(label: str | None) -> list[str]:
    """The words a label is made of, lower-cased: a heuristic label's quoted terms, else its words."""
    if not label:
        return []
    terms = label_terms(label) if '"' in label else [label]
    return [word.casefold() for term in terms for word in _WORD.findall(term)]


def cluster_names(labels: list[str], cluster: np.ndarray, n_words: int = 3) -> dict[int, str]:
    """Each cluster named by its most characteristic label words: the number of its concepts using the word ×
    log(clusters / clusters using it), so a word every cluster uses ("the", "a") names none."""
    counts: dict[int, Counter] = {}
    for label, c in zip(labels, cluster.tolist()):
        counts.setdefault(c, Counter()).update(set(label_words(label)))
    spread = Counter(word for counter in counts.values() for word in counter)
    n_clusters = len(counts)
    names = {}
    for c, counter in counts.items():
        scored = [(count * math.log(n_clusters / spread[word]), word) for word, count in counter.items()]
        best = sorted((item for item in scored if item[0] > 0), key=lambda item: (-item[0], item[1]))
        names[c] = " · ".join(word for _, word in best[:n_words]) or f"cluster {c}"
    return names


def hull(points_N2: np.ndarray) -> list[list[float]]:
    """Convex hull of a cluster's points, as a closed outline (empty for fewer than 3 distinct points)."""
    from scipy.spatial import ConvexHull, QhullError

    if len(np.unique(points_N2, axis=0)) < 3:
        return []
    try:
        vertices = ConvexHull(points_N2).vertices
    except QhullError:  # all points on a line
        return []
    return [[round(float(x), 4), round(float(y), 4)] for x, y in points_N2[vertices]]


def concept_map(layout: pl.DataFrame, labels: list[str]) -> dict[str, Any]:
    """Every concept a point, from the concept_map stage's layout (x, y and cluster by concept): its clusters
    outlined (convex hulls) and named by the labels (`labels[c]`: concept c's)."""
    layout = layout.sort("concept")
    xy = layout.select("x", "y").to_numpy().astype(np.float64)
    cluster = layout["cluster"].to_numpy().astype(np.int64)
    names = cluster_names(labels, cluster)
    clusters = []
    for c in sorted(names):
        members = xy[cluster == c]
        clusters.append({"id": c, "name": names[c], "size": int(members.shape[0]), "hull": hull(members),
                         "x": round(float(np.median(members[:, 0])), 4), "y": round(float(np.median(members[:, 1])), 4)})
    return {"x": _rounded(xy[:, 0]), "y": _rounded(xy[:, 1]), "cluster": cluster.tolist(), "clusters": clusters}


# ---------------------------------------------------------------------------------------------------------
# One record per concept and per item


def trimmed_context(tokens: list[str], activations: list[float], token_ids: list[int]) -> dict[str, Any]:
    """A context window without its padding (token id -1 marks positions before the sequence start)."""
    kept = [(t, a) for t, a, i in zip(tokens, activations, token_ids) if i is None or i >= 0]
    return {"tokens": [t for t, _ in kept], "acts": _rounded((a for _, a in kept), 3)}


def example_rows(contexts: pl.DataFrame, scores: pl.DataFrame, saliency: pl.DataFrame, per_side: int) -> pl.DataFrame:
    """Per concept and benchmark, the `per_side` lowest- and highest-scored items among the concept's top
    contexts in that benchmark (the items it fires on most), each with its highlighted context window.
    contexts: the labels stage's contexts with source = benchmark; scores: benchmark, item_id, score;
    saliency: benchmark, item_id, concept, saliency."""
    rows = (contexts.filter(pl.col("kind") == "top")
            .select("concept", pl.col("source").alias("benchmark"), "item_id", "activation", "tokens", "activations",
                    "token_ids")
            .join(scores.select("benchmark", "item_id", pl.col("score").cast(pl.Float64).fill_nan(None)),
                  on=["benchmark", "item_id"], how="inner")
            .filter(pl.col("score").is_not_null())
            .join(saliency, on=["benchmark", "item_id", "concept"], how="left")
            .unique(["concept", "benchmark", "item_id"], keep="first", maintain_order=True))
    keys = ["concept", "benchmark"]
    worst = (rows.sort([*keys, "score", "activation", "item_id"], descending=[False, False, False, True, False])
             .group_by(keys, maintain_order=True).head(per_side).with_columns(side=pl.lit("worst")))
    best = (rows.join(worst.select(*keys, "item_id"), on=[*keys, "item_id"], how="anti")
            .sort([*keys, "score", "activation", "item_id"], descending=[False, False, True, True, False])
            .group_by(keys, maintain_order=True).head(per_side).with_columns(side=pl.lit("best")))
    return pl.concat([worst, best]).sort("concept", "benchmark", "side", "score", descending=[False, False, True, False])


def concept_records(table: Mapping[str, Any], labels: pl.DataFrame | None, concept_benchmark: pl.DataFrame,
                    contexts: pl.DataFrame, examples: pl.DataFrame, benchmarks: list[str],
                    n_contexts: int) -> dict[int, dict[str, Any]]:
    """The detail record of every concept: its label and logit-lens tokens, its numbers per benchmark, its top
    corpus contexts and its example items per benchmark (token windows with activations)."""
    index = {b: i for i, b in enumerate(benchmarks)}
    records: dict[int, dict[str, Any]] = {}
    for position, concept in enumerate(table["concept"]):
        records[concept] = {"label": table["label"][position], "label_source": table["label_source"][position],
                            "detection": table["detection"][position], "benchmarks": [], "contexts": [],
                            "examples": [], "firing": [], "promoted": [], "suppressed": [], "live": None,
                            "n_detection": None, "max_activation": None}
    if labels is not None:
        for row in labels.iter_rows(named=True):
            record = records.get(row["concept"])
            if record is not None:
                record.update(firing=row["firing_tokens"] or [], promoted=row["promoted_tokens"] or [],
                              suppressed=row["suppressed_tokens"] or [], live=row["live"],
                              n_detection=row["n_detection"], max_activation=_rounded([row["max_activation"]], 3)[0])
    columns = ["concept", "benchmark", "chi_model", "chi_model_lo", "chi_model_hi", "chi_model_adjusted", "support",
               "ess", "chi_bench", "missing"]
    present = [c for c in columns if c in concept_benchmark.columns]
    for row in concept_benchmark.select(present).sort("concept", "benchmark").iter_rows(named=True):
        record = records.get(row["concept"])
        if record is None or row["benchmark"] not in index:
            continue
        values = _rounded([row.get("chi_model"), row.get("chi_model_lo"), row.get("chi_model_hi"),
                           row.get("chi_model_adjusted"), row.get("ess")])
        record["benchmarks"].append({"b": index[row["benchmark"]], "chi_model": values[0] if row["support"] else None,
                                     "lo": values[1], "hi": values[2], "adjusted": values[3], "ess": values[4],
                                     "support": row["support"], "chi_bench": _rounded([row["chi_bench"]], 6)[0],
                                     "missing": row["missing"]})
    corpus = (contexts.filter((pl.col("kind") == "top") & (pl.col("source") == "corpus") & (pl.col("rank") < n_contexts))
              .sort("concept", "rank"))
    for row in corpus.iter_rows(named=True):
        if row["concept"] in records:
            records[row["concept"]]["contexts"].append(
                trimmed_context(row["tokens"], row["activations"], row["token_ids"]))
    for row in examples.iter_rows(named=True):
        if row["concept"] in records and row["benchmark"] in index:
            records[row["concept"]]["examples"].append({
                "b": index[row["benchmark"]], "side": row["side"], "item": row["item_id"],
                "score": _rounded([row["score"]], 3)[0], "saliency": _rounded([row.get("saliency")], 4)[0],
                **trimmed_context(row["tokens"], row["activations"], row["token_ids"])})
    return records


def item_records(items: pl.DataFrame, scores: pl.DataFrame, top: pl.DataFrame, benchmarks: list[str]) -> list[dict[str, Any]]:
    """One record per item: benchmark, prompt (as the model saw it, without the chat template), gold answer,
    the model's response and score, and its top concepts by saliency with their share of the item's saliency
    (top: `figure_data.top_item_concepts`' columns)."""
    index = {b: i for i, b in enumerate(benchmarks)}
    scored = items.join(scores.select("benchmark", "item_id", "score", "response"), on=["benchmark", "item_id"],
                        how="left")
    top_of: dict[tuple[str, str], list[list[float]]] = {}
    for row in top.iter_rows(named=True):
        top_of.setdefault((row["benchmark"], row["item_id"]), []).append(
            [row["concept"], round(row["saliency"], 4), round(row["share"], 4)])
    records = []
    for row in scored.sort("benchmark", "item_id").iter_rows(named=True):
        if row["benchmark"] not in index:
            continue
        records.append({
            "id": row["item_id"], "b": index[row["benchmark"]], "prompt": prompt_text(row["messages"]),
            "gold": gold_text(row["gold"], row["choices"], row["gold_index"]), "response": row["response"],
            "score": _rounded([row["score"]], 3)[0], "top": top_of.get((row["benchmark"], row["item_id"]), []),
        })
    return records


# ---------------------------------------------------------------------------------------------------------
# The overview


def overview(benchmarks_table: pl.DataFrame, categories: Mapping[str, str], benchmarks: list[str],
             sae_summary: Mapping[str, Any], thresholds: Mapping[str, Any], n_concepts: int, n_live: int | None,
             model: str, layer: int) -> dict[str, Any]:
    """Model, SAE and benchmark facts shown on the overview page."""
    by_name = {row["benchmark"]: row for row in benchmarks_table.iter_rows(named=True)}
    rows = []
    for name in benchmarks:
        row = by_name.get(name, {})
        rows.append({"name": name, "category": categories.get(name, "Other"), "n_items": row.get("n_items"),
                     "n_scored": row.get("n_scored"), "accuracy": _rounded([row.get("mean_score")], 4)[0],
                     "covered": row.get("covered"), "missing_percent": _rounded([row.get("missing_percent")], 2)[0]})
    trained = "train" in (sae_summary.get("source") or {})
    sae = {key: sae_summary.get(key) for key in ("d_in", "d_sae", "layer", "hook_name", "explained_variance", "l0",
                                                  "dead_fraction", "training_tokens")}
    sae["source"] = "trained by the pipeline (sae-lens TopK)" if trained else json.dumps(sae_summary.get("source"))
    return {"model": model, "layer": layer, "sae": sae, "benchmarks": rows, "n_concepts": n_concepts,
            "n_live": n_live, "thresholds": {key: thresholds.get(key) for key in (
                "under_threshold", "over_threshold", "min_support", "ranking", "ci_level")}}
