"""Stage: the Competency Gaps explorer, a self-contained static site per (model, layer) that opens from disk
(file://) or any static host with no server and no internet.

The page (explorer_assets/: index.html, app.js, style.css; no CDN, no framework) reads its data from JavaScript
files that call `CG.receive(name, data)`: browsers refuse fetch() on file:// pages but run <script> files, so
the data is JSON wrapped in one call. The table, map and overview load with the page; each concept's detail and
each item come in shards loaded on demand, so 65,536 concepts open quickly. Every text shown (benchmark items,
responses, labels) is set as text by app.js, never parsed as HTML.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from competency_gaps.explorer_data import (
    concept_map,
    concept_records,
    concept_table,
    correlation_heatmap,
    example_rows,
    item_records,
    overlap_heatmap,
    overview,
)
from competency_gaps.figure_data import benchmark_order, top_item_concepts_of_batches
from competency_gaps.figures import benchmark_categories
from competency_gaps.reduce import keyed_batches, read_shards, saliency_of_pairs

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("explorer_assets")
ASSET_FILES = ("index.html", "app.js", "style.css")
ITEM_COLUMNS = ["item_id", "messages", "gold", "choices", "gold_index"]  # what the item view shows


def script(name: str, data: Any) -> str:
    """A data file: JSON passed to CG.receive. ASCII-escaped, and <, >, & (which JSON has only inside strings)
    written as \\u escapes, so no text can end the script or open a tag even if the data were inlined in HTML."""
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"CG.receive({json.dumps(name)}, {body});\n"


def write_shards(folder: Path, kind: str, records: list[tuple[Any, Any]], shard_size: int) -> int:
    """Records (key, value) written `shard_size` per file as folder/<kind>/<n>.js; returns the number of files."""
    (folder / kind).mkdir(parents=True, exist_ok=True)
    n_shards = 0
    for start in range(0, len(records), shard_size):
        shard = start // shard_size
        chunk = {str(key): value for key, value in records[start:start + shard_size]}
        (folder / kind / f"{shard}.js").write_text(script(f"{kind}:{shard}", chunk), encoding="utf-8")
        n_shards += 1
    return n_shards


def write_site(out_dir: Path, meta: Mapping[str, Any], table: Mapping[str, Any], concept_map_data: Mapping[str, Any],
               concepts: Mapping[int, Any], items: list[dict[str, Any]], shard_size: int) -> None:
    """The whole site into out_dir, built in a temporary folder beside it and moved into place at the end, so an
    interrupted job never leaves half a site."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in ASSET_FILES:
            shutil.copyfile(ASSETS / name, build / name)
        data = build / "data"
        data.mkdir()
        # Concept shards hold concepts in table order, so a concept's shard is its table position // shard_size.
        concept_list = [(c, concepts[c]) for c in table["concept"]]
        item_index = {item["id"]: position // shard_size for position, item in enumerate(items)}
        meta = {**meta, "shard_size": shard_size,
                "n_concept_shards": write_shards(data, "concepts", concept_list, shard_size),
                "n_item_shards": write_shards(data, "items", [(i["id"], i) for i in items], shard_size)}
        (data / "meta.js").write_text(script("meta", meta), encoding="utf-8")
        (data / "table.js").write_text(script("table", table), encoding="utf-8")
        (data / "map.js").write_text(script("map", concept_map_data), encoding="utf-8")
        (data / "item_index.js").write_text(script("item_index", item_index), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    finally:
        if build.exists():
            shutil.rmtree(build)


def index_page(sites: list[Mapping[str, str]]) -> str:
    """The page linking every (model, layer) explorer of a run; sites: model, layer, href (relative to it)."""
    links = "\n".join(
        f'    <li><a href="{html.escape(site["href"], quote=True)}">model {html.escape(site["model"])}, '
        f'layer {html.escape(str(site["layer"]))}</a></li>' for site in sites)
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n  <meta charset=\"utf-8\">\n"
            "  <title>Competency Gaps explorer</title>\n</head>\n<body>\n  <h1>Competency Gaps explorer</h1>\n"
            f"  <p>One explorer per model and SAE layer:</p>\n  <ul>\n{links}\n  </ul>\n</body>\n</html>\n")


def run_explorer(concepts_dir: Path, labels_dir: Path, sae_summary: Path, map_path: Path, item_paths: list[str],
                 score_paths: list[str], saliency_paths: list[str], spec: Mapping[str, Any], out_dir: Path, model: str,
                 layer: int) -> None:
    """Build the explorer of one (model, layer) from the reducer's and the labels stage's tables, the SAE's
    summary and the concept map's layout."""
    concepts = pl.read_parquet(concepts_dir / "concepts.parquet")
    concept_benchmark = pl.read_parquet(concepts_dir / "concept_benchmark.parquet")
    thresholds = json.loads((concepts_dir / "thresholds.json").read_text())
    labels = pl.read_parquet(labels_dir / "labels.parquet")
    categories = benchmark_categories(item_paths)
    benchmarks = benchmark_order(concept_benchmark["benchmark"].unique().to_list(), categories)
    table = concept_table(concepts, concept_benchmark, labels, benchmarks, thresholds.get("ranking"))
    log.info("concept table: %d concepts × %d benchmarks", len(table["concept"]), len(benchmarks))

    layout = pl.read_parquet(map_path)
    label_by_id = dict(zip(table["concept"], table["label"]))
    map_data = concept_map(layout, [label_by_id.get(c, "") for c in range(layout.height)])
    log.info("concept map: %d points, %d clusters", len(map_data["x"]), len(map_data["clusters"]))

    scores = read_shards(score_paths, ["item_id", "score", "response"])
    n_contexts = int(spec.get("contexts", 5))
    # Only what is shown: the strongest corpus contexts and the benchmark ones (examples are picked among them).
    contexts = (pl.scan_parquet(labels_dir / "contexts.parquet")
                .filter((pl.col("kind") == "top") & ((pl.col("source") != "corpus") | (pl.col("rank") < n_contexts)))
                .collect())
    item_contexts = contexts.filter(pl.col("source") != "corpus")
    context_saliency, top = shown_saliency(saliency_paths, item_contexts, int(spec.get("item_concepts", 10)))
    examples = example_rows(item_contexts, scores, context_saliency, int(spec.get("examples_per_side", 2)))
    records = concept_records(table, labels, concept_benchmark, contexts, examples, benchmarks, n_contexts)
    items = item_records(read_shards(item_paths, ITEM_COLUMNS), scores, top, benchmarks)

    meta = {
        **overview(pl.read_parquet(concepts_dir / "benchmarks.parquet"), categories, benchmarks,
                   json.loads(sae_summary.read_text()), thresholds, len(table["concept"]),
                   int(labels["live"].sum()), model, layer),
        "correlation": {metric: correlation_heatmap(concept_benchmark, metric, benchmarks) for metric in ("model", "bench")},
        "overlap": overlap_heatmap(concept_benchmark, benchmarks),
    }
    write_site(out_dir, meta, table, map_data, records, items, int(spec.get("shard_size", 256)))
    log.info("explorer written to %s (%d concepts, %d items)", out_dir, len(records), len(items))


def shown_saliency(saliency_paths: list[str], item_contexts: pl.DataFrame, n_item_concepts: int,
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The saliency the explorer shows: the rows of the benchmark contexts' (item, concept) pairs (for the
    example items) and each item's `n_item_concepts` top concepts. The shards hold every (item, concept) pair of
    the suite, so they are read a batch at a time and only these are kept."""
    pairs = item_contexts.select(pl.col("source").alias("benchmark"), "item_id", "concept")
    return (saliency_of_pairs(saliency_paths, pairs),
            top_item_concepts_of_batches(keyed_batches(saliency_paths), n_item_concepts))


def write_index(sites: list[Mapping[str, str]], out_dir: Path) -> None:
    """out_dir/index.html linking every explorer, and out_dir/sites.js, from which each explorer (two folders
    down: model=M/layer=L/) lists the others."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.html").write_text(index_page(sites), encoding="utf-8")
    (out_dir / "sites.js").write_text(script("sites", list(sites)), encoding="utf-8")
