"""Stage 6: the paper's figures, ranked concept tables and example cards for one (model, layer).

Rendering only: the numbers come from the reducer's tables, shaped by the pure functions of
`figure_data`. Every figure is written as PNG and SVG (Agg backend, no pyplot state). Benchmarks are
grouped and coloured by category with the fixed Okabe–Ito colour-blind-safe palette `CATEGORY_COLOURS`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from competency_gaps.figure_data import (  # noqa: E402
    CATEGORIES,
    MIN_PAIR_CONCEPTS,
    OPTIONAL_CHI_MODEL_COLUMNS,
    Rankings,
    benchmark_order,
    category_of,
    chi_model_matrix,
    clip_upper,
    cluster_order,
    concept_name,
    covered_chi_bench,
    gold_text,
    median_or_none,
    overlap_matrix,
    pairwise_correlation,
    per_benchmark_values,
    pooled_percentile,
    prompt_text,
    rated_chi_model,
    ranked_concepts,
    select_examples,
)
from competency_gaps.reduce import benchmark_of  # noqa: E402
from competency_gaps.tables import atomic_path, write_text  # noqa: E402

log = logging.getLogger(__name__)

# Okabe & Ito (2008) colour-blind-safe palette, one fixed colour per benchmark category.
CATEGORY_COLOURS = {
    "Math": "#0072B2",  # blue
    "Reasoning": "#E69F00",  # orange
    "Factuality": "#009E73",  # bluish green
    "Ethics & Bias": "#CC79A7",  # reddish purple
    "Probe": "#56B4E9",  # sky blue
    "Other": "#7F7F7F",  # grey
}
NEUTRAL = "#3B4B5C"  # suite-wide histograms (no benchmark)
ACCENT = "#D55E00"  # vermillion: medians and thresholds
BLANK = "#E0E0E0"  # heatmap cells without a value

CHI_BENCH = r"$\chi_{\mathrm{bench}}$"
CHI_MODEL = r"$\chi_{\mathrm{model}}$"

# File stems of the figures (each written as .png and .svg); the rule names exactly these.
FIGURES = (
    "chi_bench_hist",
    "chi_bench_per_benchmark",
    "chi_model_per_benchmark",
    "chi_model_hist",
    "missing_percent",
    "jaccard_overlap",
    "chi_model_correlation",
)
TABLES = ("ranked_concepts.md", "worst_concepts.csv", "best_concepts.csv", "under_covered_concepts.csv",
          "missing_concepts.csv", "example_cards.md")

STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "competency-gaps",  # reproducible SVG ids
    # svg.fonttype stays "path": glyphs as outlines, so the SVG looks the same without DejaVu/mathtext fonts.
}
METADATA = {"png": {"Software": None}, "svg": {"Date": None}}
PROMPT_CHARS = 1500
RESPONSE_CHARS = 800


def _styled(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper


def _save(fig: Figure, stem: Path) -> list[Path]:
    """Write stem.png (150 dpi) and stem.svg atomically; return both paths."""
    paths = []
    for fmt in ("png", "svg"):
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format=fmt, dpi=150, metadata=METADATA[fmt])
        paths.append(path)
    return paths


def _title(fig: Figure, what: str, context: str) -> None:
    fig.suptitle(f"{what}\n{context}" if context else what)


def _colour(benchmark: str, categories: Mapping[str, str]) -> str:
    return CATEGORY_COLOURS[category_of(categories.get(benchmark))]


def _category_legend(fig: Figure, benchmarks: list[str], categories: Mapping[str, str],
                     loc: str = "outside lower center") -> None:
    """Legend of the categories present; grids put it on the right (their shared x label is at the bottom)."""
    present = {category_of(categories.get(b)) for b in benchmarks}
    handles = [Patch(facecolor=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES if c in present]
    if handles:
        fig.legend(handles=handles, loc=loc, ncols=1 if "right" in loc else len(handles), frameon=False,
                   title="Benchmark category", title_fontsize=8)


def _count_axis(ax, log: bool) -> None:
    """Concept counts: plain integers on a log axis (1, 10, 100), not 10^0."""
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _outside_legend(fig: Figure, ax) -> None:
    """The axes' legend below the plot, where it can hide no bar or line."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=1, frameon=False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n_panels: int, context_lines: int = 2) -> tuple[Figure, np.ndarray]:
    """At most 4 panels a row, rows filled evenly (5 panels: 3 + 2, 7: 4 + 3)."""
    nrows = max(1, math.ceil(n_panels / 4))
    ncols = max(1, math.ceil(n_panels / nrows))
    fig = Figure(figsize=(2.9 * ncols + 0.8, 2.2 * nrows + 0.4 * context_lines + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, axes


# ---------------------------------------------------------------------------------------------------------
# Figures


@_styled
def plot_chi_bench_hist(concepts: pl.DataFrame, stem: Path, thresholds: Mapping | None = None,
                        context: str = "") -> list[Path]:
    """1. Suite χ_bench of the covered concepts: 50 bins, log y; the under/over thresholds marked."""
    values = covered_chi_bench(concepts)
    n_missing = concepts.filter(pl.col("classification") == "missing").height
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    if values.size:
        ax.hist(values, bins=50, color=NEUTRAL, edgecolor="white", linewidth=0.3, label=f"{values.size:,} covered concepts")
        _count_axis(ax, log=True)
        thresholds = thresholds or {}
        for key, pct_key, style in (("under_threshold", "under_percentile", ":"), ("over_threshold", "over_percentile", "--")):
            if thresholds.get(key) is not None:
                kind = "under" if key.startswith("under") else "over"
                ax.axvline(thresholds[key], color=ACCENT, linestyle=style, linewidth=1.2,
                           label=f"{kind}-represented threshold ({thresholds[pct_key]:g}th percentile of covered "
                                 f"concepts) = {thresholds[key]:.3g}")
        _outside_legend(fig, ax)
    else:
        _no_data(ax, "no covered concept")
    ax.set_xlabel(f"suite {CHI_BENCH} (mean over benchmarks of the concept's normalised saliency; mean over concepts = 1)")
    ax.set_ylabel("concepts (log scale)")
    _title(fig, f"Benchmark coverage {CHI_BENCH} of the {values.size:,} covered concepts\n"
                f"({n_missing:,} of {concepts.height:,} concepts never fire on any item and are left out)", context)
    return _save(fig, stem)


@_styled
def plot_chi_bench_grid(concept_benchmark: pl.DataFrame, categories: Mapping[str, str], stem: Path,
                        context: str = "", percentile: float = 95.0) -> list[Path]:
    """2. Per benchmark, χ_bench of the concepts that fire there (> 0), clipped at the pooled percentile."""
    values = per_benchmark_values(concept_benchmark, "chi_bench", positive=True)
    names = benchmark_order(values, categories)
    upper = pooled_percentile(values, percentile)
    fig, axes = _grid(len(names))
    for ax, benchmark in zip(axes.flat, names):
        data = values[benchmark]
        ax.set_title(f"{benchmark}\n{data.size:,} concepts fire", color="black")
        if data.size and upper:
            ax.hist(clip_upper(data, upper), bins=40, range=(0, upper), color=_colour(benchmark, categories),
                    edgecolor="white", linewidth=0.3)
            _count_axis(ax, log=True)
            ax.set_xlim(0, upper)
        else:
            _no_data(ax, "no concept fires")
    clip = f"{upper:.3g}" if upper is not None else "n/a"
    fig.supxlabel(f"{CHI_BENCH}$^{{(c,b)}}$ (values above the pooled {percentile:g}th percentile = {clip} "
                  "are counted in the last bin)")
    fig.supylabel("concepts (log scale)")
    _title(fig, f"Coverage {CHI_BENCH} per benchmark: concepts that fire on at least one item", context)
    _category_legend(fig, names, categories, loc="outside right upper")
    return _save(fig, stem)


@_styled
def plot_chi_model_grid(concept_benchmark: pl.DataFrame, categories: Mapping[str, str], stem: Path,
                        context: str = "", benchmarks: pl.DataFrame | None = None) -> list[Path]:
    """3. Per benchmark, χ_model of the concepts that fire on a scored item, median marked; with `benchmarks`
    (the reducer's overview) each panel also names the benchmark's mean score."""
    values = per_benchmark_values(concept_benchmark, "chi_model")
    mean_scores = ({r["benchmark"]: r.get("mean_score") for r in benchmarks.iter_rows(named=True)}
                   if benchmarks is not None and "mean_score" in benchmarks.columns else {})
    names = benchmark_order(values, categories)
    fig, axes = _grid(len(names))
    for ax, benchmark in zip(axes.flat, names):
        data = values[benchmark]
        median = median_or_none(data)
        if median is None:
            ax.set_title(f"{benchmark}\ncoverage only")
            _no_data(ax, "no scored items:\nχ_model N/A")
            continue
        score = mean_scores.get(benchmark)
        heading = f"{benchmark} (mean score {score:.2f})" if score is not None else benchmark
        ax.set_title(f"{heading}\n{data.size:,} concepts, median {median:.3f}")
        ax.hist(data, bins=40, range=(0, 1), color=_colour(benchmark, categories), edgecolor="white", linewidth=0.3)
        ax.axvline(median, color=ACCENT, linestyle="--", linewidth=1.2)
        ax.set_xlim(0, 1)
        _count_axis(ax, log=False)
    fig.supxlabel(f"{CHI_MODEL}$^{{(c,b)}}$ (saliency-weighted mean score of the items where the concept fires); "
                  "dashed line: median")
    fig.supylabel("concepts")
    _title(fig, f"Model performance {CHI_MODEL} per benchmark", context)
    _category_legend(fig, names, categories, loc="outside right upper")
    return _save(fig, stem)


@_styled
def plot_chi_model_hist(concepts: pl.DataFrame, stem: Path, context: str = "") -> list[Path]:
    """4. Suite χ_model of every concept that has one, median marked."""
    values = rated_chi_model(concepts)
    median = median_or_none(values)
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    if median is not None:
        ax.hist(values, bins=50, range=(0, 1), color=NEUTRAL, edgecolor="white", linewidth=0.3,
                label=f"{values.size:,} concepts with a score")
        ax.axvline(median, color=ACCENT, linestyle="--", linewidth=1.5, label=f"median = {median:.3f}")
        _outside_legend(fig, ax)
        ax.set_xlim(0, 1)
        _count_axis(ax, log=False)
    else:
        _no_data(ax, "no concept fires on a scored item")
    ax.set_xlabel(f"suite {CHI_MODEL} (saliency-weighted mean score over all scored items where the concept fires)")
    ax.set_ylabel("concepts")
    _title(fig, f"Model performance {CHI_MODEL} over the {values.size:,} concepts that fire on a scored item", context)
    return _save(fig, stem)


@_styled
def plot_missing_percent(benchmarks: pl.DataFrame, categories: Mapping[str, str], stem: Path, n_concepts: int,
                         context: str = "") -> list[Path]:
    """5. Missing % per benchmark (horizontal bars by category), annotated with the concepts covered."""
    rows = {r["benchmark"]: r for r in benchmarks.iter_rows(named=True)}
    names = benchmark_order(rows, categories)
    fig = Figure(figsize=(8.0, 1.2 + 0.42 * max(len(names), 1) + 0.9), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(names))[::-1]  # first benchmark at the top
    for y, benchmark in zip(positions, names):
        row = rows[benchmark]
        pct, covered = row.get("missing_percent"), row.get("covered")
        if pct is None:
            ax.text(1, y, "no extracted items", va="center", fontsize=8, color="#555555")
            continue
        ax.barh(y, pct, color=_colour(benchmark, categories), height=0.7)
        ax.text(pct + 1, y, f"{pct:.1f} %  ({covered:,} of {n_concepts:,} covered)", va="center", fontsize=8)
    ax.set_yticks(positions, names)
    ax.set_xlim(0, 135)
    ax.set_xticks(np.arange(0, 101, 20))
    ax.spines["bottom"].set_bounds(0, 100)  # room on the right for the annotations, axis only to 100 %
    ax.set_xlabel("concepts missing from the benchmark (%): never fire on any of its items")
    _title(fig, "Missing concepts per benchmark", context)
    _category_legend(fig, names, categories)
    return _save(fig, stem)


def _text_colour(rgba) -> str:
    r, g, b = to_rgb(rgba)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _heatmap(fig: Figure, ax, matrix: np.ndarray, names: list[str], categories: Mapping[str, str], cmap: str,
             vmin: float, vmax: float, label: str, annotate: Callable[[int, int], str]) -> None:
    colourmap = matplotlib.colormaps[cmap].with_extremes(bad=BLANK)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colourmap, vmin=vmin, vmax=vmax)
    n = len(names)
    fontsize = 8 if n <= 8 else 7 if n <= 12 else 6
    for i in range(n):
        for j in range(n):
            text = annotate(i, j)
            if not text:
                continue
            value = matrix[i, j]
            colour = "#444444" if not np.isfinite(value) else _text_colour(colourmap((value - vmin) / (vmax - vmin)))
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=colour)
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        tick.set_bbox({"facecolor": _colour(tick.get_text(), categories), "alpha": 0.35, "edgecolor": "none",
                       "pad": 1.5})
    ax.spines[:].set_visible(False)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)


@_styled
def plot_overlap_heatmap(overlap: pl.DataFrame, categories: Mapping[str, str], stem: Path,
                         context: str = "") -> list[Path]:
    """6. Jaccard overlap of covered concept sets, benchmarks in hierarchical-clustering order, annotated."""
    names = sorted(set(overlap["benchmark_a"].to_list()))
    names = cluster_order(overlap_matrix(overlap, names), names)
    matrix = overlap_matrix(overlap, names)
    side = 1.6 + 0.62 * max(len(names), 1)
    fig = Figure(figsize=(side + 1.6, side + 1.0), layout="constrained")
    ax = fig.subplots()
    _heatmap(fig, ax, matrix, names, categories, "viridis", 0.0, 1.0,
             "Jaccard |C_a ∩ C_b| / |C_a ∪ C_b| of covered concepts",
             lambda i, j: f"{matrix[i, j]:.2f}" if np.isfinite(matrix[i, j]) else "")
    _title(fig, "Overlap of the concepts benchmarks cover (Jaccard),\nordered by hierarchical clustering", context)
    _category_legend(fig, names, categories)
    return _save(fig, stem)


@_styled
def plot_correlation_heatmap(concept_benchmark: pl.DataFrame, categories: Mapping[str, str], stem: Path,
                             context: str = "", min_n: int = MIN_PAIR_CONCEPTS) -> list[Path]:
    """7. Pearson r of per-concept χ_model between benchmarks over concepts rated in both; blank if n < min_n."""
    names = benchmark_order(concept_benchmark["benchmark"].unique().to_list(), categories)
    r, n = pairwise_correlation(chi_model_matrix(concept_benchmark, names), min_n)
    side = 1.6 + 0.8 * max(len(names), 1)
    fig = Figure(figsize=(side + 1.6, side + 1.0), layout="constrained")
    ax = fig.subplots()

    def annotate(i: int, j: int) -> str:
        if np.isfinite(r[i, j]):
            return f"{r[i, j]:.2f}\nn={n[i, j]:,}"
        return f"n={n[i, j]:,}"

    _heatmap(fig, ax, r, names, categories, "RdBu_r", -1.0, 1.0, f"Pearson r of per-concept {CHI_MODEL}", annotate)
    _title(fig, f"Cross-benchmark correlation of per-concept {CHI_MODEL}\n(n: concepts with a {CHI_MODEL} in both; "
                f"grey: n < {min_n} or no variation)", context)
    _category_legend(fig, names, categories)
    return _save(fig, stem)


# ---------------------------------------------------------------------------------------------------------
# Ranked tables and example cards (Markdown / CSV)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "N/A"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


OPTIONAL_HEADERS = {"chi_model_shrunk": "shrunk", "chi_model_adjusted": "adjusted", "chi_model_prior": "prior"}


def _model_rows(frame: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    optional = [c for c in OPTIONAL_CHI_MODEL_COLUMNS if c in frame.columns]
    header = ["rank", "concept", "χ_model", "CI", *[OPTIONAL_HEADERS.get(c, c) for c in optional], "scored support",
              "benchmarks scored", "scored ESS", "support", "ESS"]
    rows = [[str(r["rank"]), r["name"], _fmt(r["chi_model"]), f"[{_fmt(r['chi_model_lo'])}, {_fmt(r['chi_model_hi'])}]",
             *[_fmt(r[c]) for c in optional], _fmt(r["scored_support"]), _fmt(r["n_benchmarks_scored"]),
             _fmt(r["scored_ess"], 1), _fmt(r["support"]), _fmt(r["ess"], 1)]
            for r in frame.iter_rows(named=True)]
    return header, rows


ORDER_NOTES = {
    "point": "Ordered by the plain χ_model (the paper's ranking; ties by concept id).",
    "shrunk": "Ordered by shrunk χ_model (gaps.ranking = shrunk), ties by χ_model, as in summary.md.",
    "lower_bound": ("Ordered by the confidence bound (gaps.ranking = lower_bound): weakest by the interval's upper "
                    "end, strongest by its lower end; concepts without an interval last, as in summary.md."),
}


ORDER_HEADINGS = {
    "point": ("lowest χ_model", "highest χ_model"),
    "shrunk": ("lowest shrunk χ_model", "highest shrunk χ_model"),
    "lower_bound": ("lowest χ_model upper bound", "highest χ_model lower bound"),
}


def ranked_markdown(rankings: Rankings, thresholds: Mapping, context: str = "", max_missing_ids: int = 500) -> str:
    ci = f"{thresholds.get('ci_level', 0.95):.0%}"
    if rankings.filtered:
        note = (f"Among concepts passing the support filter (firing on scored items in ≥ "
                f"{thresholds.get('min_benchmarks', '?')} benchmarks and on ≥ {thresholds.get('min_support', '?')} "
                "scored items).")
    else:
        note = ("**No concept passes the support filter**: ranked among all concepts with a χ_model instead. "
                "Treat these rankings as weak evidence.")
    note += f" CI: {ci} percentile bootstrap over items (N/A below {thresholds.get('min_ci_support', '?')} scored items)."
    note += " " + ORDER_NOTES[rankings.ranking]
    if any(c in rankings.worst.columns for c in OPTIONAL_CHI_MODEL_COLUMNS):
        note += (" prior: what the concept's benchmarks predict (their mean scores, saliency-weighted); adjusted: "
                 "χ_model − prior; shrunk: (n·χ_model + κ·prior) / (n + κ), n the scored ESS"
                 + (f", κ = {thresholds['shrinkage_strength']:.4g}" if thresholds.get("shrinkage_strength") else "")
                 + ".")
    header, worst = _model_rows(rankings.worst)
    _, best = _model_rows(rankings.best)
    under = [[str(r["rank"]), r["name"], _fmt(r["chi_bench"], 4), r["classification"], _fmt(r["support"]),
              _fmt(r["n_benchmarks_active"]), _fmt(r["ess"], 1), _fmt(r["chi_model"])]
             for r in rankings.under_covered.iter_rows(named=True)]
    missing = rankings.missing["name"].to_list()
    shown = ", ".join(missing[:max_missing_ids])
    if len(missing) > max_missing_ids:
        shown += f", … and {len(missing) - max_missing_ids:,} more (missing_concepts.csv lists all)"
    plural = "concept" if len(missing) == 1 else "concepts"
    lines = [
        f"# Ranked concepts{f' — {context}' if context else ''}", "",
        f"## Model gaps: the {rankings.worst.height} concepts with the {ORDER_HEADINGS[rankings.ranking][0]}", "",
        note, "",
        _markdown_table(header, worst) if worst else "No concept has a χ_model.", "",
        f"## Strengths: the {rankings.best.height} concepts with the {ORDER_HEADINGS[rankings.ranking][1]}", "",
        _markdown_table(header, best) if best else "No concept has a χ_model.", "",
        f"## Benchmark gaps: the {rankings.under_covered.height} covered concepts with the lowest χ_bench", "",
        _markdown_table(["rank", "concept", "χ_bench", "class", "support", "benchmarks active", "ESS", "χ_model"], under)
        if under else "No covered concept.", "",
        f"## Missing from the whole suite: {len(missing):,} {plural} (never fire on any item)", "",
        shown or "None.",
    ]
    return "\n".join(lines) + "\n"


def write_ranked_tables(concepts: pl.DataFrame, out_dir: Path, thresholds: Mapping | None = None,
                        labels: Mapping[int, str] | None = None, n: int = 25, context: str = "") -> Rankings:
    """ranked_concepts.md and worst/best/under_covered/missing_concepts.csv."""
    rankings = ranked_concepts(concepts, n, labels, (thresholds or {}).get("ranking", "point"))
    for name, frame in (("worst", rankings.worst), ("best", rankings.best),
                        ("under_covered", rankings.under_covered), ("missing", rankings.missing)):
        with atomic_path(out_dir / f"{name}_concepts.csv") as temporary:
            frame.write_csv(temporary)
    write_text(ranked_markdown(rankings, thresholds or {}, context), out_dir / "ranked_concepts.md")
    return rankings


def _items(count: int) -> str:
    return f"{count:,} scored item{'' if count == 1 else 's'}"


def _fenced(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[:limit].rstrip() + f" […{len(text) - limit:,} more characters]"
    longest = max((len(run) for run in text.split("\n") if set(run.strip()) == {"`"}), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _inline(text: str | None, limit: int = 80) -> str:
    if text is None:
        return "—"
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "`" + text.replace("`", "'") + "`"


def example_cards_markdown(weakest: pl.DataFrame, examples: pl.DataFrame, concept_benchmark: pl.DataFrame,
                           item_text: pl.DataFrame, categories: Mapping[str, str], per_side: int,
                           labels: Mapping[int, str] | None = None, context: str = "") -> str:
    """Cards for `weakest` (rows of the worst ranking, in order): per benchmark, the examples picked by
    `select_examples`, with prompt and response. item_text: benchmark, item_id, prompt, gold, prediction, response."""
    text = {(r["benchmark"], r["item_id"]): r for r in item_text.iter_rows(named=True)}
    lines = [
        f"# Example cards: the {weakest.height} weakest concepts{f' — {context}' if context else ''}", "",
        f"For each concept at the top of the model-gap list (ranked_concepts.md), per benchmark where it fires on a scored "
        f"item: the {per_side} lowest-scored and the {per_side} highest-scored of those items (ties: the higher "
        "saliency first; an item is shown once). Saliency s_i^c is the concept's mean activation over the item's "
        f"counted tokens. Prompts are shown without the chat template, cut at {PROMPT_CHARS:,} characters; "
        f"responses at {RESPONSE_CHARS:,}.", "",
    ]
    if weakest.height == 0:
        return "\n".join(lines + ["No concept has a χ_model: no cards."]) + "\n"
    for position, concept in enumerate(weakest.iter_rows(named=True), start=1):
        c = concept["concept"]
        lines += [
            f"## {position}. {concept_name(c, labels)} — χ_model {_fmt(concept['chi_model'])} "
            f"[{_fmt(concept['chi_model_lo'])}, {_fmt(concept['chi_model_hi'])}]"
            + "".join(f", {OPTIONAL_HEADERS[k]} {_fmt(concept[k])}" for k in ("chi_model_shrunk", "chi_model_adjusted")
                      if k in concept), "",
            f"Fires on {_items(concept['scored_support'])} in {_fmt(concept['n_benchmarks_scored'])} "
            f"benchmark{'' if concept['n_benchmarks_scored'] == 1 else 's'} (scored ESS {_fmt(concept['scored_ess'], 1)}); suite χ_bench {_fmt(concept['chi_bench'])}.", "",
        ]
        per_benchmark = concept_benchmark.filter(pl.col("concept") == c)
        unscored = per_benchmark.filter((pl.col("support") > 0) & (pl.col("scored_support") == 0))
        if unscored.height:
            lines += ["Also fires on unscored (coverage-only) items of: " + ", ".join(
                f"{r['benchmark']} ({r['support']:,})" for r in unscored.sort("benchmark").iter_rows(named=True)) + ".", ""]
        mine = examples.filter(pl.col("concept") == c)
        for benchmark in benchmark_order(mine["benchmark"].unique().to_list(), categories):
            stats = per_benchmark.filter(pl.col("benchmark") == benchmark).row(0, named=True)
            lines += [f"### {benchmark} ({category_of(categories.get(benchmark))}) — χ_model^(c,b) "
                      f"{_fmt(stats['chi_model'])}, fires on {_items(stats['scored_support'])}", ""]
            for side, heading in (("worst", "Lowest-scored"), ("best", "Highest-scored")):
                picked = mine.filter((pl.col("benchmark") == benchmark) & (pl.col("side") == side))
                if picked.height == 0:
                    continue
                lines += [f"#### {heading}", ""]
                for row in picked.iter_rows(named=True):
                    item = text.get((benchmark, row["item_id"]), {})
                    lines += [f"**{row['item_id']}** — score {_fmt(row['score'])} · saliency {row['saliency']:.4g} · "
                              f"gold {_inline(item.get('gold'))} · prediction {_inline(item.get('prediction'))}", "",
                              "Prompt:", "", _fenced(item.get("prompt") or "(item text not found)", PROMPT_CHARS), ""]
                    if item.get("response"):
                        lines += ["Response:", "", _fenced(item["response"], RESPONSE_CHARS), ""]
    return "\n".join(lines) + "\n"


def _read_keyed(paths: list[str], columns: list[str]) -> pl.DataFrame:
    frames = [pl.read_parquet(p, columns=columns, hive_partitioning=False).with_columns(benchmark=pl.lit(benchmark_of(p)))
              for p in paths]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def write_example_cards(rankings: Rankings, concept_benchmark: pl.DataFrame, saliency_paths: list[str],
                        score_paths: list[str], item_paths: list[str], categories: Mapping[str, str], path: Path,
                        n_concepts: int = 10, per_side: int = 2, labels: Mapping[int, str] | None = None,
                        context: str = "") -> pl.DataFrame:
    """example_cards.md for the n_concepts weakest concepts; returns the picked examples."""
    weakest = rankings.worst.head(n_concepts)
    ids = weakest["concept"].to_list()
    saliency = pl.concat(
        [pl.scan_parquet(p, hive_partitioning=False).filter(pl.col("concept").is_in(ids))
         .select("item_id", pl.col("concept").cast(pl.Int64), "saliency").with_columns(benchmark=pl.lit(benchmark_of(p)))
         .collect() for p in saliency_paths]
    ) if saliency_paths else pl.DataFrame(schema={"item_id": pl.String, "concept": pl.Int64, "saliency": pl.Float64,
                                                  "benchmark": pl.String})
    scores = _read_keyed(score_paths, ["item_id", "score", "prediction", "response"])
    examples = select_examples(saliency, scores.select("benchmark", "item_id", "score"), ids, per_side)
    items = _read_keyed(item_paths, ["item_id", "messages", "gold", "choices", "gold_index"])
    picked = examples.select("benchmark", "item_id").unique()
    items = items.join(picked, on=["benchmark", "item_id"], how="semi")
    scores = scores.join(picked, on=["benchmark", "item_id"], how="semi")
    rows = [{"benchmark": r["benchmark"], "item_id": r["item_id"], "prompt": prompt_text(r["messages"]),
             "gold": gold_text(r["gold"], r["choices"], r["gold_index"])} for r in items.iter_rows(named=True)]
    item_text = pl.DataFrame(rows, schema={"benchmark": pl.String, "item_id": pl.String, "prompt": pl.String,
                                           "gold": pl.String})
    item_text = item_text.join(scores.select("benchmark", "item_id", "prediction", "response"),
                               on=["benchmark", "item_id"], how="full", coalesce=True)
    write_text(example_cards_markdown(weakest, examples, concept_benchmark, item_text, categories, per_side, labels,
                                      context), path)
    return examples


# ---------------------------------------------------------------------------------------------------------
# Entry point


def benchmark_categories(item_paths: list[str]) -> dict[str, str]:
    """benchmark -> category, from each items table's `category` column (first non-null; else Other)."""
    categories = {}
    for path in item_paths:
        column = pl.read_parquet(path, columns=["category"], hive_partitioning=False)["category"].drop_nulls()
        categories[benchmark_of(path)] = category_of(column[0] if column.len() else None)
    return categories


def read_labels(path: str | None) -> dict[int, str] | None:
    """Concept labels from a CSV or Parquet file with columns concept, label (optional)."""
    if not path:
        return None
    frame = pl.read_parquet(path) if str(path).endswith(".parquet") else pl.read_csv(path)
    return {int(c): str(label) for c, label in frame.select("concept", "label").iter_rows() if label}


def run_figures(concept_benchmark_path: str, concepts_path: str, benchmarks_path: str, overlap_path: str,
                thresholds_path: str | None, item_paths: list[str], score_paths: list[str], saliency_paths: list[str],
                out_dir: Path, context: str = "", labels_path: str | None = None, top_n: int = 25,
                n_cards: int = 10, per_side: int = 2) -> list[Path]:
    """Every figure (PNG + SVG), the ranked tables and the example cards, under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    concept_benchmark = pl.read_parquet(concept_benchmark_path)
    concepts = pl.read_parquet(concepts_path)
    benchmarks = pl.read_parquet(benchmarks_path)
    overlap = pl.read_parquet(overlap_path)
    thresholds = json.loads(Path(thresholds_path).read_text()) if thresholds_path else {}
    categories = benchmark_categories(item_paths)
    labels = read_labels(labels_path)
    written = [
        *plot_chi_bench_hist(concepts, out_dir / "chi_bench_hist", thresholds, context),
        *plot_chi_bench_grid(concept_benchmark, categories, out_dir / "chi_bench_per_benchmark", context),
        *plot_chi_model_grid(concept_benchmark, categories, out_dir / "chi_model_per_benchmark", context, benchmarks),
        *plot_chi_model_hist(concepts, out_dir / "chi_model_hist", context),
        *plot_missing_percent(benchmarks, categories, out_dir / "missing_percent", concepts.height, context),
        *plot_overlap_heatmap(overlap, categories, out_dir / "jaccard_overlap", context),
        *plot_correlation_heatmap(concept_benchmark, categories, out_dir / "chi_model_correlation", context),
    ]
    rankings = write_ranked_tables(concepts, out_dir, thresholds, labels, top_n, context)
    write_example_cards(rankings, concept_benchmark, saliency_paths, score_paths, item_paths, categories,
                        out_dir / "example_cards.md", n_cards, per_side, labels, context)
    written += [out_dir / name for name in TABLES]
    log.info("wrote %d figure and table files to %s", len(written), out_dir)
    return written
