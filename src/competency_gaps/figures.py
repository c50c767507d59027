"""Stage 6: the paper's figures, ranked concept tables, example cards of the weakest concepts and cards of the
items the model got wrong, for one (model, layer); also the robustness rule's two figures (resampling stability,
predictive validity), rendered from its tables.

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
    LABEL_CHARS,
    MIN_PAIR_CONCEPTS,
    OPTIONAL_CHI_MODEL_COLUMNS,
    Rankings,
    benchmark_order,
    category_of,
    chi_model_matrix,
    clip_upper,
    cluster_order,
    concept_markdown,
    concept_name,
    covered_chi_bench,
    gold_text,
    labels_of,
    markdown_escape,
    markdown_table,
    median_or_none,
    overlap_matrix,
    pairwise_correlation,
    per_benchmark_values,
    pooled_percentile,
    prompt_text,
    rated_chi_model,
    ranked_concepts,
    read_labels,
    select_examples,
    select_wrong_items,
    stability_spread,
    top_item_concepts,
    validity_bars,
    validity_benchmarks,
)
from competency_gaps.reduce import benchmark_of, read_shard  # noqa: E402
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
          "missing_concepts.csv", "example_cards.md", "wrong_items.md")
# File stems of the robustness rule's figures (each .png and .svg, beside stability/validity.parquet).
ROBUSTNESS_FIGURES = ("stability", "validity")

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
# Labels and prompts carry any script (a multilingual corpus gives concepts CJK or Devanagari tokens). DejaVu Sans,
# matplotlib's font, lacks those glyphs; matplotlib takes each missing glyph from the next family that has it. These
# are Debian's fonts-droid-fallback (CJK ideographs and kana, no Hangul syllables), fonts-nanum (Hangul: Gemma's
# vocabulary gives concepts Korean tokens) and fonts-noto-core (the others), which scripts/setup.sh installs where
# it can; a family not installed is left out, and a glyph no family has is drawn as a box (matplotlib warns).
FALLBACK_FONTS = ("Droid Sans Fallback", "NanumGothic", "Noto Sans CJK JP", "Noto Sans Devanagari", "Noto Sans Bengali",
                  "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Thai", "Noto Sans Tamil", "Noto Sans Georgian",
                  "Noto Sans Armenian")
METADATA = {"png": {"Software": None}, "svg": {"Date": None}}
PROMPT_CHARS = 1500
RESPONSE_CHARS = 800


@functools.cache
def font_family() -> list[str]:
    """DejaVu Sans, then the FALLBACK_FONTS installed here (looked up once)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


def _styled(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({**STYLE, "font.family": font_family()}):
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
# Robustness figures (the robustness rule renders these beside its tables)

WEAK_COLOUR = ACCENT  # items dominated by the weak concepts
REST_COLOUR = "#8C9AA8"  # the other held-out items: neutral grey-blue
SPREAD_COLOUR = "#7A8CA0"  # histogram bars of the stability figure (lighter than NEUTRAL, so lines stand out)
PAPER_LABEL = "paper (Llama-3.1-8B-Instruct, Goodfire SAE)"


def _log_bins(values: np.ndarray, n: int = 40) -> np.ndarray | None:
    positive = values[values > 0]
    if positive.size == 0 or positive.min() == positive.max():
        return None
    return np.geomspace(positive.min(), positive.max(), n + 1)


@_styled
def plot_stability(stability: pl.DataFrame, summary: Mapping, stem: Path, context: str = "") -> list[Path]:
    """stability.png/svg: `stability_figure`."""
    return _save(stability_figure(stability, summary, context), stem)


@_styled
def stability_figure(stability: pl.DataFrame, summary: Mapping, context: str = "") -> Figure:
    """Histograms of the per-concept std over the resamples of suite χ_bench (log x: χ_bench spans orders of
    magnitude and its spread grows with it) and of suite χ_model (linear), for the concepts passing the support
    filter; the mean over those concepts (dashed) and the paper's value (solid, vermillion) marked."""
    spread, filtered = stability_spread(stability)
    paper = summary.get("paper") or {}
    fig = Figure(figsize=(10.5, 5.0), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("chi_bench_std", CHI_BENCH, True), ("chi_model_std", CHI_MODEL, False))
    for ax, (key, symbol, log_x) in zip(axes, panels):
        values = spread[key]
        if values.size == 0:
            ax.set_title(f"{symbol}: no concept has a spread")
            _no_data(ax, "no values")
            continue
        mean, median = float(values.mean()), float(np.median(values))
        bins = _log_bins(values) if log_x else None
        zeros = int((values <= 0).sum()) if bins is not None else 0
        if bins is not None:
            ax.hist(values[values > 0], bins=bins, color=SPREAD_COLOUR, edgecolor="white", linewidth=0.3)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        else:
            ax.hist(values, bins=40, color=SPREAD_COLOUR, edgecolor="white", linewidth=0.3)
            ax.set_xlim(left=0)
        reference = paper.get(key)
        times = f" ({mean / reference:.1f} × the paper's)" if reference else ""
        ax.axvline(mean, color=NEUTRAL, linestyle="--", linewidth=1.5,
                   label=f"mean over these concepts = {mean:.3f}{times}")
        if reference is not None:
            ax.axvline(paper[key], color=ACCENT, linestyle="-", linewidth=1.8, label=f"{PAPER_LABEL} = {paper[key]:g}")
        _count_axis(ax, log=False)
        scale = " (log scale)" if bins is not None else ""
        ax.set_xlabel(f"std of the concept's suite {symbol} over the resamples{scale}")
        ax.set_ylabel("concepts")
        note = f"; {zeros:,} with std 0 not shown" if zeros else ""
        ax.set_title(f"Spread of {symbol}: {values.size:,} concepts, median {median:.3f}{note}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, frameon=False)
    runs = summary.get("n_resamples")
    keep = summary.get("keep_fraction")
    how = (f"std over {runs:,} resamples, each keeping {keep:.0%} of every benchmark's items" if runs and keep is not None
           else "std over the resamples")
    support = summary.get("support_filter") or {}
    if filtered:
        who = (f"concepts passing the support filter (scored items in ≥ {support.get('min_benchmarks', '?')} "
               f"benchmarks, ≥ {support.get('min_support', '?')} scored items)")
    else:
        who = (f"no concept passes the support filter: {CHI_BENCH} over every covered concept, "
               f"{CHI_MODEL} over every concept that has one")
    _title(fig, f"Resampling stability: per-concept spread of {CHI_BENCH} and {CHI_MODEL}\n{how}\n{who}", context)
    return fig


def _p_text(p: float | None) -> str:
    return "N/A" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _signed(value: float | None) -> str:
    return "N/A" if value is None else f"{value:+.3f}".replace("-", "−")


SCORE_LABEL = "mean held-out score (accuracy for 0/1 scores)"
STATUS_TEXT = {"no items": "no held-out items", "none dominated": "none of {n:,} dominated",
               "all dominated": "all {n:,} dominated"}


def _suite_panel(ax, bar: dict, n_permutations: int | None, y_top: float) -> None:
    """One direction's suite-level bars: dominated vs rest, with counts, and the test's results."""
    direction = bar["direction"].replace("->", "→")
    train, test = direction.split("→")
    weak, eligible, threshold = bar.get("n_weak_concepts"), bar.get("n_eligible_concepts"), bar.get("weak_chi_threshold")
    weak_line = (f"{weak:,} weak of {eligible:,} eligible concepts (half-{train} {CHI_MODEL} ≤ {threshold:.3f})"
                 if weak and threshold is not None else "no weak concepts (no concept is eligible)")
    ax.set_title(f"{direction}: weak concepts from half {train}, tested on the {bar['n_heldout']:,} held-out "
                 f"items of half {test}\n{weak_line}")
    if bar["status"] != "tested":
        _no_data(ax, STATUS_TEXT[bar["status"]].format(n=bar["n_heldout"]) + ": no test")
        return
    heights = [bar["mean_dominated"], bar["mean_rest"]]
    counts = [bar["n_dominated"], bar["n_rest"]]
    share = bar.get("share_threshold")
    labels = [f"dominated by weak concepts\n(weak share of saliency ≥ {share:.3g})" if share is not None
              else "dominated by weak concepts", "the other held-out items"]
    positions = np.arange(2)
    ax.bar(positions, heights, color=[WEAK_COLOUR, REST_COLOUR], width=0.6)
    for x, height, count in zip(positions, heights, counts):
        ax.text(x, height + 0.015 * y_top, f"{height:.3f}\n{count:,} items", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, labels)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(0, y_top)
    ax.set_ylabel(SCORE_LABEL)
    lines = [f"effect (dominated − rest) = {_signed(bar['effect'])}",
             f"benchmark-adjusted effect = {_signed(bar['adjusted_effect'])}",
             f"one-sided permutation p = {_p_text(bar['p_value'])}"]
    if n_permutations:
        lines.append(f"({n_permutations:,} permutations within benchmarks)")
    ax.text(0.98, 0.97, "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "#BBBBBB", "boxstyle": "round,pad=0.4"})


def _benchmark_panel(ax, rows: list[dict], names: list[str], direction: str) -> None:
    """One direction's per-benchmark bars: each group's mean score where the group has items (a benchmark
    whose held-out items are all dominated shows its dominated bar only), annotated."""
    positions = np.arange(len(names))[::-1]  # first benchmark at the top
    height = 0.38
    for y, row in zip(positions, rows):
        dominated, rest = row["mean_dominated"], row["mean_rest"]
        if dominated is not None:
            ax.barh(y + height / 2, dominated, height=height, color=WEAK_COLOUR)
        if rest is not None:
            ax.barh(y - height / 2, rest, height=height, color=REST_COLOUR)
        if row["status"] == "tested":
            text = (f"{row['n_dominated']:,} of {row['n_heldout']:,} dominated: {dominated:.2f} vs {rest:.2f}, "
                    f"p = {_p_text(row['p_value'])}")
        else:
            text = STATUS_TEXT[row["status"]].format(n=row["n_heldout"])
            mean = dominated if dominated is not None else rest
            text += (f", mean {mean:.2f}" if mean is not None else "") + " (no test)"
        ax.text(1.03, y, text, va="center", fontsize=7.5, color="black" if row["status"] == "tested" else "#555555")
    ax.set_yticks(positions, names)
    ax.set_xlim(0, 2.35)
    ax.set_xticks(np.arange(0, 1.01, 0.25))
    ax.spines["bottom"].set_bounds(0, 1)  # room on the right for the annotations, axis only to 1
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel(SCORE_LABEL)
    ax.set_title(f"{direction.replace('->', '→')} per benchmark (p: permutations within the benchmark)")


@_styled
def plot_validity(validity: pl.DataFrame, summary: Mapping, stem: Path, context: str = "",
                  per_benchmark: bool = True) -> list[Path]:
    """validity.png/svg: `validity_figure`."""
    return _save(validity_figure(validity, summary, context, per_benchmark), stem)


@_styled
def validity_figure(validity: pl.DataFrame, summary: Mapping, context: str = "", per_benchmark: bool = True) -> Figure:
    """Per direction (A→B, B→A): mean held-out score of the items dominated by the weak concepts vs the rest
    (bars with counts, one y scale for both directions), annotated with the effect, the benchmark-adjusted
    effect and the permutation p-value; below (per_benchmark), the same per benchmark."""
    bars = validity_bars(validity)
    names = validity_benchmarks(validity) if per_benchmark else []
    options = summary.get("options") or {}
    n_columns = max(len(bars), 1)
    lower = 1.0 + 0.36 * len(names)
    fig = Figure(figsize=(6.4 * n_columns, 4.8 + (lower + 0.4 if names else 0.0)), layout="constrained")
    axes = fig.subplots(2 if names else 1, n_columns, squeeze=False,
                        gridspec_kw={"height_ratios": [4.0, lower] if names else [1.0]})
    means = [m for bar in bars for m in (bar["mean_dominated"], bar["mean_rest"]) if m is not None]
    y_top = max(max(means, default=0.0), 0.05) / 0.55  # bars in the lower half: room for labels and results
    if not bars:
        _no_data(axes[0, 0], "no validity rows")
    for column, bar in enumerate(bars):
        _suite_panel(axes[0, column], bar, options.get("n_permutations"), y_top)
        if names:
            per = {row["scope"]: row for name in names for row in validity_bars(validity, name)
                   if row["direction"] == bar["direction"]}
            present = [name for name in names if name in per]
            _benchmark_panel(axes[1, column], [per[name] for name in present], present, bar["direction"])
    handles = [Patch(facecolor=WEAK_COLOUR, label="held-out items dominated by the weak concepts"),
               Patch(facecolor=REST_COLOUR, label="the other held-out items")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    weak, quantile = options.get("weak_fraction"), options.get("dominated_quantile")
    how = (f"\nweak: the {weak:.0%} of concepts with the lowest {CHI_MODEL} on one half of the items;\n"
           f"dominated: a held-out item whose weak concepts' share of its saliency is ≥ the "
           f"{100 * quantile:g}th percentile of the held-out items' shares"
           if weak is not None and quantile is not None else "")
    _title(fig, f"Predictive validity of the {CHI_MODEL} gaps: do held-out items dominated by the weakest "
                f"concepts score lower?{how}", context)
    return fig


def run_robustness_figures(table_dir: Path, out_dir: Path | None = None, context: str = "") -> list[Path]:
    """stability.png/svg and validity.png/svg from the robustness tables in table_dir (written to out_dir,
    by default beside them)."""
    table_dir = Path(table_dir)
    out_dir = Path(out_dir) if out_dir is not None else table_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stability = pl.read_parquet(table_dir / "stability.parquet")
    validity = pl.read_parquet(table_dir / "validity.parquet")
    stability_summary = json.loads((table_dir / "stability.json").read_text())
    validity_summary = json.loads((table_dir / "validity.json").read_text())
    written = [*plot_stability(stability, stability_summary, out_dir / "stability", context),
               *plot_validity(validity, validity_summary, out_dir / "validity", context)]
    log.info("wrote %d robustness figure files to %s", len(written), out_dir)
    return written


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


OPTIONAL_HEADERS = {"chi_model_shrunk_adjusted": "shrunk adj.", "chi_model_shrunk": "shrunk",
                    "chi_model_adjusted": "adjusted", "chi_model_prior": "prior"}


def _model_rows(frame: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    optional = [c for c in OPTIONAL_CHI_MODEL_COLUMNS if c in frame.columns]
    header = ["rank", "concept", "χ_model", "CI", *[OPTIONAL_HEADERS.get(c, c) for c in optional], "scored support",
              "benchmarks scored", "scored ESS", "support", "ESS"]
    labels = labels_of(frame)
    rows = [[str(r["rank"]), concept_markdown(r["concept"], labels), _fmt(r["chi_model"]),
             f"[{_fmt(r['chi_model_lo'])}, {_fmt(r['chi_model_hi'])}]",
             *[_fmt(r[c]) for c in optional], _fmt(r["scored_support"]), _fmt(r["n_benchmarks_scored"]),
             _fmt(r["scored_ess"], 1), _fmt(r["support"]), _fmt(r["ess"], 1)]
            for r in frame.iter_rows(named=True)]
    return header, rows


ORDER_NOTES = {
    "point": "Ordered by the plain χ_model (the paper's ranking; ties by concept id).",
    "shrunk_adjusted": ("Ordered by shrunk adjusted χ_model (gaps.ranking = shrunk_adjusted: how much weaker than "
                        "its benchmarks predict, pulled towards 0 on little support), ties by χ_model, as in summary.md."),
    "shrunk": "Ordered by shrunk χ_model (gaps.ranking = shrunk), ties by χ_model, as in summary.md.",
    "lower_bound": ("Ordered by the confidence bound (gaps.ranking = lower_bound): weakest by the interval's upper "
                    "end, strongest by its lower end; concepts without an interval last, as in summary.md."),
}


ORDER_HEADINGS = {
    "point": ("lowest χ_model", "highest χ_model"),
    "shrunk_adjusted": ("lowest shrunk adjusted χ_model", "highest shrunk adjusted χ_model"),
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
                 "χ_model − prior; shrunk: (n·χ_model + κ·prior) / (n + κ), n the scored ESS; shrunk adj.: shrunk − prior"
                 + (f", κ = {thresholds['shrinkage_strength']:.4g}" if thresholds.get("shrinkage_strength") else "")
                 + ".")
    header, worst = _model_rows(rankings.worst)
    _, best = _model_rows(rankings.best)
    under_labels = labels_of(rankings.under_covered)
    under = [[str(r["rank"]), concept_markdown(r["concept"], under_labels), _fmt(r["chi_bench"], 4),
              r["classification"], _fmt(r["support"]), _fmt(r["n_benchmarks_active"]), _fmt(r["ess"], 1),
              _fmt(r["chi_model"])]
             for r in rankings.under_covered.iter_rows(named=True)]
    missing_labels = labels_of(rankings.missing)
    missing = [concept_markdown(c, missing_labels) for c in rankings.missing["concept"].to_list()]
    shown = ", ".join(missing[:max_missing_ids])
    if len(missing) > max_missing_ids:
        shown += f", … and {len(missing) - max_missing_ids:,} more (missing_concepts.csv lists all)"
    plural = "concept" if len(missing) == 1 else "concepts"
    lines = [
        f"# Ranked concepts{f' — {context}' if context else ''}", "",
        f"## Model gaps: the {rankings.worst.height} concepts with the {ORDER_HEADINGS[rankings.ranking][0]}", "",
        note, "",
        markdown_table(header, worst) if worst else "No concept has a χ_model.", "",
        f"## Strengths: the {rankings.best.height} concepts with the {ORDER_HEADINGS[rankings.ranking][1]}", "",
        markdown_table(header, best) if best else "No concept has a χ_model.", "",
        f"## Benchmark gaps: the {rankings.under_covered.height} covered concepts with the lowest χ_bench", "",
        markdown_table(["rank", "concept", "χ_bench", "class", "support", "benchmarks active", "ESS", "χ_model"], under)
        if under else "No covered concept.", "",
        f"## Missing from the whole suite: {len(missing):,} {plural} (never fire on any item)", "",
        shown or "None.",
    ]
    return "\n".join(lines) + "\n"


def write_ranked_tables(concepts: pl.DataFrame, out_dir: Path, thresholds: Mapping | None = None,
                        labels: Mapping[int, str] | None = None, n: int = 25, context: str = "") -> Rankings:
    """ranked_concepts.md and worst/best/under_covered/missing_concepts.csv (columns name and label: the label
    whole in the CSVs, cut to LABEL_CHARS and escaped in the Markdown)."""
    rankings = ranked_concepts(concepts, n, labels, (thresholds or {}).get("ranking", "point"))
    for name, frame in (("worst", rankings.worst), ("best", rankings.best),
                        ("under_covered", rankings.under_covered), ("missing", rankings.missing)):
        with atomic_path(out_dir / f"{name}_concepts.csv") as temporary:
            frame.write_csv(temporary)
    write_text(ranked_markdown(rankings, thresholds or {}, context), out_dir / "ranked_concepts.md")
    return rankings


def _full_label(concept: int, labels: Mapping[int, str] | None) -> list[str]:
    """A card's line with the whole label, when the heading had to cut it."""
    label = (labels or {}).get(int(concept))
    if not label or len(" ".join(label.split())) <= LABEL_CHARS:
        return []
    return [f"Label: {markdown_escape(label)}", ""]


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
            f"## {position}. {concept_markdown(c, labels)} — χ_model {_fmt(concept['chi_model'])} "
            f"[{_fmt(concept['chi_model_lo'])}, {_fmt(concept['chi_model_hi'])}]"
            + "".join(f", {OPTIONAL_HEADERS[k]} {_fmt(concept[k])}" for k in ("chi_model_shrunk_adjusted", "chi_model_shrunk", "chi_model_adjusted")
                      if k in concept), "",
            *_full_label(c, labels),
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
    """`columns` of every table plus its benchmark, read as the reducer reads its shards."""
    frames = [read_shard(p, columns) for p in paths]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def _saliency_where(paths: list[str], keep: Callable[[str], pl.Expr]) -> pl.DataFrame:
    """item_id, concept, saliency, benchmark of the shard rows that `keep(benchmark)` selects: only those are
    read, so wide SAEs never load whole shards here."""
    frames = [pl.scan_parquet(p, hive_partitioning=False).filter(keep(benchmark_of(p)))
              .select("item_id", pl.col("concept").cast(pl.Int64), pl.col("saliency").cast(pl.Float64))
              .with_columns(benchmark=pl.lit(benchmark_of(p))).collect() for p in paths]
    return pl.concat(frames) if frames else pl.DataFrame(
        schema={"item_id": pl.String, "concept": pl.Int64, "saliency": pl.Float64, "benchmark": pl.String})


def write_example_cards(rankings: Rankings, concept_benchmark: pl.DataFrame, saliency_paths: list[str],
                        score_paths: list[str], item_paths: list[str], categories: Mapping[str, str], path: Path,
                        n_concepts: int = 10, per_side: int = 2, labels: Mapping[int, str] | None = None,
                        context: str = "") -> pl.DataFrame:
    """example_cards.md for the n_concepts weakest concepts; returns the picked examples."""
    weakest = rankings.worst.head(n_concepts)
    ids = weakest["concept"].to_list()
    saliency = _saliency_where(saliency_paths, lambda benchmark: pl.col("concept").is_in(ids))
    scores = _read_keyed(score_paths, ["item_id", "score", "prediction", "response"])
    examples = select_examples(saliency, scores.select("benchmark", "item_id", "score"), ids, per_side)
    item_text = _item_text(examples.select("benchmark", "item_id").unique(), scores, item_paths)
    write_text(example_cards_markdown(weakest, examples, concept_benchmark, item_text, categories, per_side, labels,
                                      context), path)
    return examples


def _item_text(picked: pl.DataFrame, scores: pl.DataFrame, item_paths: list[str]) -> pl.DataFrame:
    """benchmark, item_id, prompt, gold, prediction, response of the `picked` (benchmark, item_id) items."""
    items = _read_keyed(item_paths, ["item_id", "messages", "gold", "choices", "gold_index"])
    items = items.join(picked, on=["benchmark", "item_id"], how="semi") if items.height else items
    scores = scores.join(picked, on=["benchmark", "item_id"], how="semi")
    rows = [{"benchmark": r["benchmark"], "item_id": r["item_id"], "prompt": prompt_text(r["messages"]),
             "gold": gold_text(r["gold"], r["choices"], r["gold_index"])} for r in items.iter_rows(named=True)]
    item_text = pl.DataFrame(rows, schema={"benchmark": pl.String, "item_id": pl.String, "prompt": pl.String,
                                           "gold": pl.String})
    return item_text.join(scores.select("benchmark", "item_id", "prediction", "response"),
                          on=["benchmark", "item_id"], how="full", coalesce=True)


def wrong_items_markdown(wrong: pl.DataFrame, top: pl.DataFrame, scores: pl.DataFrame, item_text: pl.DataFrame,
                         concepts: pl.DataFrame, categories: Mapping[str, str], benchmarks: list[str],
                         per_benchmark: int, n_concepts: int, gap_ranks: Mapping[int, int] | None = None,
                         labels: Mapping[int, str] | None = None, context: str = "") -> str:
    """Cards of the items picked by `select_wrong_items` (wrong), per benchmark, with their top concepts
    (`top_item_concepts`: top). scores: benchmark, item_id, score of every item (the per-benchmark counts);
    item_text as for the example cards; concepts: the reducer's concepts.parquet (suite chi_model);
    gap_ranks: concept -> its rank on the model-gap list of ranked_concepts.md."""
    text = {(r["benchmark"], r["item_id"]): r for r in item_text.iter_rows(named=True)}
    chi_model = dict(concepts.select("concept", "chi_model").iter_rows())
    gap_ranks = gap_ranks or {}
    lines = [
        f"# Items the model got wrong, with their top concepts{f' — {context}' if context else ''}", "",
        f"For each benchmark with scores: up to {per_benchmark} items the model got wrong (score < 1), the lowest "
        "score first (ties by item id), with the prompt (the item's messages without the chat template, cut at "
        f"{PROMPT_CHARS:,} characters), the model's response (cut at {RESPONSE_CHARS:,}) and the item's "
        f"{n_concepts} most salient concepts. Saliency s_i^c is the concept's mean activation over the item's counted "
        "tokens; share is its part of the item's total saliency over all concepts; suite χ_model is the concept's "
        "saliency-weighted mean score over all scored items where it fires; gap rank is its rank on the model-gap "
        "list of ranked_concepts.md (— when not on it).", "",
    ]
    counts = {r["benchmark"]: r for r in scores.group_by("benchmark").agg(
        n=pl.len(), scored=pl.col("score").is_not_null().sum(), wrong=(pl.col("score") < 1).sum(),
        mean=pl.col("score").mean()).iter_rows(named=True)}
    for benchmark in benchmark_order(benchmarks, categories):
        stats = counts.get(benchmark, {"n": 0, "scored": 0, "wrong": 0, "mean": None})
        heading = f"## {benchmark} ({category_of(categories.get(benchmark))})"
        if not stats["scored"]:
            lines += [f"{heading} — coverage only", "", "No scored items (this benchmark has no scorer).", ""]
            continue
        lines += [f"{heading} — {stats['wrong']:,} of {_items(stats['scored'])} wrong, mean score "
                  f"{_fmt(stats['mean'])}", ""]
        mine = wrong.filter(pl.col("benchmark") == benchmark)
        if mine.height == 0:
            lines += ["The model got every scored item right.", ""]
            continue
        for row in mine.iter_rows(named=True):
            item = text.get((benchmark, row["item_id"]), {})
            lines += [f"### {row['rank']}. {row['item_id']} — score {_fmt(row['score'])} · gold "
                      f"{_inline(item.get('gold'))} · prediction {_inline(item.get('prediction'))}", "",
                      "Prompt:", "", _fenced(item.get("prompt") or "(item text not found)", PROMPT_CHARS), ""]
            if item.get("response"):
                lines += ["Response:", "", _fenced(item["response"], RESPONSE_CHARS), ""]
            else:
                lines += ["Response: none recorded.", ""]
            concepts_here = top.filter((pl.col("benchmark") == benchmark) & (pl.col("item_id") == row["item_id"]))
            if concepts_here.height == 0:
                lines += ["No concept fires on this item (no saliency).", ""]
                continue
            table = [[str(c["rank"]), concept_markdown(c["concept"], labels), f"{c['saliency']:.4g}",
                      f"{100 * c['share']:.1f} %", _fmt(chi_model.get(c["concept"])),
                      str(gap_ranks[c["concept"]]) if c["concept"] in gap_ranks else "—"]
                     for c in concepts_here.iter_rows(named=True)]
            lines += [f"Top {concepts_here.height} concepts by saliency:", "",
                      markdown_table(["rank", "concept", "saliency", "share", "suite χ_model", "gap rank"], table), ""]
    return "\n".join(lines) + "\n"


def write_wrong_items(concepts: pl.DataFrame, saliency_paths: list[str], score_paths: list[str],
                      item_paths: list[str], categories: Mapping[str, str], path: Path, per_benchmark: int = 5,
                      n_concepts: int = 5, rankings: Rankings | None = None, labels: Mapping[int, str] | None = None,
                      context: str = "") -> pl.DataFrame:
    """wrong_items.md: per benchmark the `per_benchmark` lowest-scored wrong items with their `n_concepts` top
    concepts; returns the picked items (select_wrong_items)."""
    scores = _read_keyed(score_paths, ["item_id", "score", "prediction", "response"])
    if scores.height == 0:
        scores = pl.DataFrame(schema={"item_id": pl.String, "score": pl.Float64, "prediction": pl.String,
                                      "response": pl.String, "benchmark": pl.String})
    scores = scores.with_columns(pl.col("score").cast(pl.Float64).fill_nan(None))
    wrong = select_wrong_items(scores.select("benchmark", "item_id", "score"), per_benchmark)
    picked = wrong.select("benchmark", "item_id")
    saliency = _saliency_where(saliency_paths, lambda benchmark: pl.col("item_id").is_in(
        picked.filter(pl.col("benchmark") == benchmark)["item_id"].to_list()))
    top = top_item_concepts(saliency, picked, n_concepts)
    gap_ranks = dict(rankings.worst.select("concept", "rank").iter_rows()) if rankings is not None else {}
    benchmarks = sorted({benchmark_of(p) for p in [*item_paths, *score_paths]})
    write_text(wrong_items_markdown(wrong, top, scores, _item_text(picked, scores, item_paths), concepts, categories,
                                    benchmarks, per_benchmark, n_concepts, gap_ranks, labels, context), path)
    return wrong


# ---------------------------------------------------------------------------------------------------------
# Entry point


def benchmark_categories(item_paths: list[str]) -> dict[str, str]:
    """benchmark -> category, from each items table's `category` column (first non-null; else Other)."""
    categories = {}
    for path in item_paths:
        column = pl.read_parquet(path, columns=["category"], hive_partitioning=False)["category"].drop_nulls()
        categories[benchmark_of(path)] = category_of(column[0] if column.len() else None)
    return categories


def run_figures(concept_benchmark_path: str, concepts_path: str, benchmarks_path: str, overlap_path: str,
                thresholds_path: str | None, item_paths: list[str], score_paths: list[str], saliency_paths: list[str],
                out_dir: Path, context: str = "", labels_path: str | None = None, top_n: int = 25,
                n_cards: int = 10, per_side: int = 2, n_wrong: int = 5, n_item_concepts: int = 5) -> list[Path]:
    """Every figure (PNG + SVG), the ranked tables, the example cards and the wrong-item cards, under out_dir.
    labels_path: the labels stage's labels.parquet (or a CSV with concept, label); None names concepts by id."""
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
    write_wrong_items(concepts, saliency_paths, score_paths, item_paths, categories, out_dir / "wrong_items.md",
                      n_wrong, n_item_concepts, rankings, labels, context)
    written += [out_dir / name for name in TABLES]
    log.info("wrote %d figure and table files to %s", len(written), out_dir)
    return written


# ---------------------------------------------------------------------------------------------------------
# Cross-model comparison (rule compare_models; the numbers come from competency_gaps.compare)

MODEL_COLOURS = ("#0072B2", "#D55E00")  # Okabe–Ito blue (model A) and vermillion (model B)


@_styled
def plot_cross_model(ranked: pl.DataFrame, agreement: pl.DataFrame, summary: Mapping, labels_a: Mapping[int, str],
                     labels_b: Mapping[int, str], stem: Path, n: int = 25) -> list[Path]:
    """cross_model.png/svg. Left: the `n` first matched concept pairs of `ranked` (compare.concept_differences,
    ranked pairs only, largest difference first), each row both labels and both models' χ_model joined by a line.
    Right: each model's mean score per benchmark on the items both scored, with the item-level agreement."""
    a, b = summary["model_a"], summary["model_b"]
    rows = ranked.head(n)
    benchmarks = agreement.filter(pl.col("benchmark") != "all")
    height = 2.2 + 0.46 * max(rows.height, 1)
    fig = Figure(figsize=(14.0, max(height, 2.0 + 0.5 * benchmarks.height)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2.3, 1.0])
    if rows.height:
        y = np.arange(rows.height)[::-1]  # largest difference at the top
        chi_a, chi_b = rows["chi_model_a"].to_numpy(), rows["chi_model_b"].to_numpy()
        left.hlines(y, np.minimum(chi_a, chi_b), np.maximum(chi_a, chi_b), color="#B0B0B0", linewidth=2, zorder=1)
        left.scatter(chi_a, y, color=MODEL_COLOURS[0], s=36, zorder=2, label=a)
        left.scatter(chi_b, y, color=MODEL_COLOURS[1], s=36, zorder=2, label=b)
        names = [f"A {concept_name(ca, labels_a, limit=44)}\nB {concept_name(cb, labels_b, limit=44)}"
                 for ca, cb in rows.select("concept_a", "concept_b").iter_rows()]
        left.set_yticks(y, names, fontsize=7.5)
        for row_y, delta, similarity in zip(y, rows["delta"].to_list(), rows["similarity"].to_list()):
            left.text(1.02, row_y, f"Δ {delta:+.2f}  (sim. {similarity:.2f})", va="center", fontsize=7.5,
                      transform=left.get_yaxis_transform())
        left.set_xlim(0, 1)
        left.set_ylim(-0.7, rows.height - 0.3)
        left.set_xlabel(f"suite {CHI_MODEL} of the concept in its own model (saliency-weighted mean score)")
        left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
        left.grid(axis="x", color="#E8E8E8", linewidth=0.6)
        left.set_axisbelow(True)
    else:
        _no_data(left, "no matched concept pair passes both models' support filters")
    if benchmarks.height:
        y = np.arange(benchmarks.height)[::-1]
        for offset, column, colour, name in ((0.2, "mean_score_a", MODEL_COLOURS[0], a),
                                             (-0.2, "mean_score_b", MODEL_COLOURS[1], b)):
            values = benchmarks[column].fill_null(0).to_numpy()
            right.barh(y + offset, values, height=0.38, color=colour, label=name)
            for bar_y, value in zip(y + offset, values):  # a score of 0 draws no bar: say it
                right.text(value + 0.015, bar_y, f"{value:.2f}", va="center", fontsize=7)
        details = [f"{bench}\n{items:,} items, agree {agree:.0%}"
                   for bench, items, agree in benchmarks.select("benchmark", "n_items", "agreement").iter_rows()]
        right.set_yticks(y, details, fontsize=7.5)
        right.set_xlim(0, 1)
        right.set_xlabel("mean score on the items both models scored")
        right.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
        right.set_title("Benchmarks, item by item", pad=22)
    else:
        _no_data(right, "no item scored by both models")
    agreement_ranked = (summary.get("rank_agreement") or {}).get("ranked", {}).get("chi_model", {})
    rho = agreement_ranked.get("spearman")
    rho_text = f"Spearman of the two {CHI_MODEL} over them {rho:.2f}" if rho is not None else "no rank correlation"
    _title(fig, f"Concepts whose {CHI_MODEL} differs most between two models: A = {a}, B = {b}\n"
                f"concepts of the two SAEs matched by the items they fire on (mutual best match, cosine ≥ "
                f"{summary['min_similarity']:g} over {summary['shared_items']:,} items both models read)\n"
                f"the {rows.height} largest |Δ| of {summary['ranked_pairs']:,} pairs passing both support filters; "
                f"{rho_text}", "")
    return _save(fig, stem)
