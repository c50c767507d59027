"""The explorer: its data (unit tests on hand-made tables) and the static site in a real headless Chromium
(Debian's `chromium`, driven by Playwright pointed at that binary; skipped with the reason when it is absent).

The site is built by the real stage (`run_explorer`) from synthetic shards reduced by the real reducer, with a
planted malicious benchmark item, response and label. Screenshots go to build/explorer-screenshots/.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from competency_gaps.concepts import jaccard_overlap
from competency_gaps.concept_map import run_concept_map
from competency_gaps.explorer_data import (
    cluster_names,
    concept_table,
    correlation_drivers,
    label_words,
    overlap_heatmap,
)
from competency_gaps.explorer_site import run_explorer, write_index
from competency_gaps.rankings import rank_concepts
from competency_gaps.reduce import run_reduce
from competency_gaps.tables import CONTEXTS, ITEM_TOKENS, ITEMS, LABELS, SALIENCY, SCORES, table_from_rows, write_parquet

from conftest import REPO

N_CONCEPTS = 48
D_MODEL = 16
BENCHMARKS = {"gsm8k": "Math", "social_iqa": "Reasoning", "bbq": "Ethics & Bias"}
N_ITEMS = 24
EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
EVIL_ITEM = "bbq-00003"
SCREENSHOTS = REPO / "build" / "explorer-screenshots"


# ---------------------------------------------------------------------------------------------------------
# Data


def test_label_words_and_cluster_names_prefer_words_that_set_a_cluster_apart():
    assert label_words('"Paris", "the" → "France"') == ["paris", "the", "france"]
    assert label_words("Dates in the 1990s") == ["dates", "in", "the", "1990s"]
    labels = ['"the", "dog" → "bark"', '"the", "dog"', '"the", "cat" → "meow"', '"the", "cat"']
    names = cluster_names(labels, np.array([0, 0, 1, 1]), n_words=1)
    assert names == {0: "dog", 1: "cat"}  # "the" is in every cluster: it names none


def test_correlation_drivers_follow_the_sign_of_r():
    values = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.4], [0.9, 0.1]])
    ids = [10, 11, 12, 13]
    positive = correlation_drivers(values, ids, r=0.5, n=4)
    assert set(positive[:2]) == {10, 11}  # both extremes agree: the largest products
    assert positive[-1] == 13  # the one pair that disagrees contributes least to a positive r
    assert correlation_drivers(values, ids, r=-0.5, n=1) == [13]
    assert correlation_drivers(np.full((3, 2), np.nan), [1, 2, 3], r=0.2) == []


def concept_benchmark_frame() -> pl.DataFrame:
    rows = []
    for concept, per in {0: {"a": 0.2, "b": 0.0}, 1: {"a": 0.1, "b": 0.3}, 2: {"a": 0.0, "b": 0.0},
                         3: {"a": 0.5, "b": 0.2}}.items():
        for benchmark, chi_bench in per.items():
            rows.append({"concept": concept, "benchmark": benchmark, "chi_bench": chi_bench, "missing": chi_bench == 0,
                         "support": 0 if chi_bench == 0 else 5, "chi_model": None if chi_bench == 0 else 0.5})
    return pl.DataFrame(rows)


def test_overlap_heatmap_matches_the_reducer_and_lists_shared_and_unshared_concepts():
    frame = concept_benchmark_frame()
    heat = overlap_heatmap(frame, ["a", "b"])
    reducer = jaccard_overlap(frame).filter((pl.col("benchmark_a") == "a") & (pl.col("benchmark_b") == "b"))
    assert heat["jaccard"][0][1] == pytest.approx(reducer["jaccard"][0], abs=1e-4)  # rounded for the page
    assert heat["shared"][0][1] == [3, 1]  # min χ_bench 0.2 before 0.1
    assert heat["only"][0][1] == [0] and heat["only"][1][0] == []


def test_concept_table_marks_never_firing_as_na_and_ranks_like_the_lists():
    frame = concept_benchmark_frame()
    concepts = pl.DataFrame({
        "concept": [0, 1, 2, 3], "chi_bench": [0.1, 0.2, 0.0, 0.35], "chi_model": [0.5, 0.2, None, 0.5],
        "chi_model_lo": [0.1] * 4, "chi_model_hi": [0.9] * 4, "support": [5, 10, 0, 10], "ess": [4.0, 9.0, 0.0, 9.0],
        "classification": ["normal", "normal", "missing", "over"], "passes_support_filter": [True, True, False, True],
        "chi_model_shrunk_adjusted": [-1e-12, -3e-12, None, -2e-12],
    })
    table = concept_table(concepts, frame, None, ["a", "b"], "shrunk_adjusted")
    assert table["per_benchmark"]["model"][1] == [None, 0.5, None, 0.5]  # concepts 0 and 2 never fire in b
    assert table["per_benchmark"]["bench"][1][0] == 0.0
    expected = rank_concepts(concepts, "shrunk_adjusted")["concept"].to_list()
    assert [c for _, c in sorted(zip(table["rank"], table["concept"]))] == expected == [1, 3, 0, 2]


# ---------------------------------------------------------------------------------------------------------
# A site built by the stage from synthetic shards


def write_inputs(root: Path) -> dict:
    """Items, scores, saliency and token shards of three benchmarks, reduced by the real reducer; labels with
    contexts; an SAE's decoder. One bbq item, its response and concept 5's label carry HTML that must stay inert."""
    rng = np.random.default_rng(1)
    paths = {"items": [], "scores": [], "saliency": [], "tokens": []}
    for b, (benchmark, category) in enumerate(BENCHMARKS.items()):
        item_rows, score_rows, saliency_rows, token_rows = [], [], [], []
        for i in range(N_ITEMS):
            item_id = f"{benchmark}-{i:05d}"
            text = EVIL if item_id == EVIL_ITEM else f"Question {i} of {benchmark}: what is {i} + {b}?"
            item_rows.append({"item_id": item_id, "benchmark": benchmark, "category": category, "subset": None,
                              "messages": [{"role": "user", "content": text}], "field_spans": [], "scoring": "exact",
                              "gold": str(i + b), "choices": None, "gold_index": None, "choice_contexts": None,
                              "metadata": None})
            score_rows.append({"item_id": item_id, "scoring": "exact", "score": float(rng.random() < 0.5),
                               "prediction": str(i), "response": EVIL if item_id == EVIL_ITEM else f"It is {i}.",
                               "choice_logprobs": None, "cut_off": False})
            for concept in rng.choice(N_CONCEPTS, size=12, replace=False):
                saliency_rows.append({"item_id": item_id, "concept": int(concept), "saliency": float(rng.random()),
                                      "max_activation": float(rng.random() * 5), "active_tokens": 2})
            token_rows.append({"item_id": item_id, "counted_tokens": 10, "total_tokens": 12, "read_tokens": 12,
                               "truncated": False, "skipped": None})
        folder = root / "benchmarks" / f"benchmark={benchmark}"
        extract = root / "extract" / f"benchmark={benchmark}"
        evaluate = root / "evaluate" / f"benchmark={benchmark}"
        for name, rows, schema, where in (("items", item_rows, ITEMS, folder), ("scores", score_rows, SCORES, evaluate),
                                          ("saliency", saliency_rows, SALIENCY, extract),
                                          ("tokens", token_rows, ITEM_TOKENS, extract)):
            path = where / f"{name}.parquet"
            write_parquet(table_from_rows(rows, schema), path, schema)
            paths[name].append(str(path))
    concepts_dir = root / "concepts"
    run_reduce(paths["saliency"], paths["tokens"], paths["scores"], N_CONCEPTS,
               {"min_benchmarks": 1, "min_support": 1, "n_bootstrap": 20}, concepts_dir, "test")

    labels_dir = root / "labels"
    labels = [{"concept": c, "live": True, "label": EVIL if c == 5 else f'"word{c % 6}", "the" → "next{c}"',
               "label_source": "heuristic", "detection_score": 0.75, "detection_judge": "lexical", "n_detection": 8,
               "firing_tokens": [f"word{c % 6}"], "promoted_tokens": [f"next{c}"], "suppressed_tokens": ["nope"],
               "max_activation": 4.0} for c in range(N_CONCEPTS)]
    write_parquet(table_from_rows(labels, LABELS), labels_dir / "labels.parquet", LABELS)
    contexts = []
    saliency = pl.concat([pl.read_parquet(p).with_columns(benchmark=pl.lit(b)) for p, b in zip(paths["saliency"], BENCHMARKS)])
    for c in range(N_CONCEPTS):
        contexts.append({"concept": c, "kind": "top", "rank": 0, "source": "corpus", "item_id": None, "sequence": c,
                         "position": 3, "activation": 4.0, "token_ids": [-1, 7, 8, 9, 10], "tokens": ["", "The", " word",
                         f"{c % 6}", " here"], "activations": [0.0, 0.0, 1.0, 4.0, 0.0], "peak_index": 3})
        fired = saliency.filter(pl.col("concept") == c)
        for rank, row in enumerate(fired.iter_rows(named=True)):
            contexts.append({"concept": c, "kind": "top", "rank": rank, "source": row["benchmark"],
                             "item_id": row["item_id"], "sequence": rank, "position": 2, "activation": row["saliency"],
                             "token_ids": [1, 2, 3], "tokens": ["what", " is", EVIL if row["item_id"] == EVIL_ITEM else " it"],
                             "activations": [0.0, 0.5, row["saliency"]], "peak_index": 2})
    write_parquet(table_from_rows(contexts, CONTEXTS), labels_dir / "contexts.parquet", CONTEXTS)

    from safetensors.numpy import save_file

    sae_dir = root / "sae"
    sae_dir.mkdir()
    save_file({"W_dec": rng.normal(size=(N_CONCEPTS, D_MODEL)).astype(np.float32)}, str(sae_dir / "sae_weights.safetensors"))
    (sae_dir / "summary.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": N_CONCEPTS, "layer": 1, "l0": 8.0,
                                                       "hook_name": "blocks.1.hook_resid_post",
                                                       "explained_variance": 0.9, "dead_fraction": 0.0,
                                                       "training_tokens": 1000, "source": {"train": {}}}))
    layout = root / "concept_map" / "concept_map.parquet"
    run_concept_map(sae_dir, SPEC, layout)  # the real stage
    return {"concepts_dir": concepts_dir, "labels_dir": labels_dir, "sae_summary": sae_dir / "summary.json",
            "layout": layout, **paths}


SPEC = {"umap_neighbors": 8, "clusters": 4, "shard_size": 16, "seed": 0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return write_inputs(tmp_path_factory.mktemp("explorer") / "results")


def build_site(inputs: dict, out: Path) -> None:
    run_explorer(inputs["concepts_dir"], inputs["labels_dir"], inputs["sae_summary"], inputs["layout"], inputs["items"],
                 inputs["scores"], inputs["saliency"], SPEC, out, "tiny", 1)


@pytest.fixture(scope="module")
def site(inputs) -> Path:
    out = inputs["concepts_dir"].parent / "explorer"
    build_site(inputs, out / "model=tiny/layer=1")
    # A second, empty-of-difference explorer, so the sibling links have something to link.
    shutil.copytree(out / "model=tiny/layer=1", out / "model=tiny/layer=2")
    write_index([{"model": "tiny", "layer": "1", "href": "model=tiny/layer=1/index.html"},
                 {"model": "tiny", "layer": "2", "href": "model=tiny/layer=2/index.html"}], out)
    return out / "model=tiny/layer=1"


def received(path: Path) -> object:
    """The data a data file passes to CG.receive."""
    text = path.read_text()
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


def test_site_is_self_contained_and_sharded(site):
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert {"index.html", "app.js", "style.css", "data/meta.js", "data/table.js", "data/map.js",
            "data/item_index.js"} <= set(files)
    assert len([f for f in files if f.startswith("data/concepts/")]) == math.ceil(N_CONCEPTS / 16)
    for name in ("index.html", "app.js", "style.css"):
        text = (site / name).read_text()
        assert "http://" not in text and "https://" not in text  # nothing fetched from a CDN
    table = received(site / "data/table.js")
    assert len(table["concept"]) == N_CONCEPTS and len(table["per_benchmark"]["model"]) == len(BENCHMARKS)
    # Text is escaped inside the data scripts: no raw "<" that could close a script or open a tag.
    assert "<script>" not in (site / "data/items/0.js").read_text() + (site / "data/table.js").read_text()


def test_site_is_the_same_when_the_saliency_is_read_in_small_batches(site, inputs, tmp_path, monkeypatch):
    """The stage reads the saliency shards a batch at a time; with 5-row batches an item's rows span several
    batches, and every data file (example items with their saliency, each item's top concepts and shares) must
    come out as from whole shards."""
    import competency_gaps.reduce as reduce

    rows_per_item = pl.read_parquet(inputs["saliency"][0]).group_by("item_id").len()["len"]
    assert rows_per_item.max() > 5  # so items do span batches
    monkeypatch.setattr(reduce, "BATCH_ROWS", 5)
    build_site(inputs, tmp_path / "site")
    files = sorted(p.relative_to(site) for p in (site / "data").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "site") for p in (tmp_path / "site" / "data").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "site" / name).read_bytes() == (site / name).read_bytes(), name
    # What the comparison covers is there: items with top concepts, concepts with example items.
    assert any(record["top"] for record in received(site / "data/items/0.js").values())
    assert any(record["examples"] for record in received(site / "data/concepts/0.js").values())


# ---------------------------------------------------------------------------------------------------------
# In a real browser


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (install Debian's chromium package: scripts/setup.sh does)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox cannot start.
        instance = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def open_view(page, site: Path, hash_: str = "") -> None:
    page.goto((site / "index.html").as_uri() + hash_)
    page.wait_for_selector("#main > :not(.loading)")


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def row_ids(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(".body .row", "rows => rows.map(r => r.dataset.concept)")]


def test_loads_from_disk_without_console_errors(page, site):
    open_view(page, site)
    assert "model tiny, layer 1" in page.inner_text("#title")
    assert "Also:" in page.inner_text("#siblings") and "layer 2" in page.inner_text("#siblings")
    assert "gsm8k" in page.inner_text("#main")
    shot(page, "overview")
    assert page.errors == []


def test_search_narrows_and_sorting_orders_the_table(page, site):
    open_view(page, site, "#view=concepts")
    assert page.inner_text("#count").startswith(f"{N_CONCEPTS} of {N_CONCEPTS}")
    page.fill("#search", "word3")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('8 of')")
    assert all("word3" in label for label in page.eval_on_selector_all(".body .row .cell.label", "c => c.map(x => x.textContent)"))
    page.fill("#search", "")
    page.click(".row.head [data-key=id]")
    page.wait_for_function("location.hash.includes('sort=id')")
    ascending = row_ids(page)
    assert ascending == sorted(ascending) and ascending[0] == 0
    page.click(".row.head [data-key=id]")
    page.wait_for_function("location.hash.includes('dir=desc')")
    assert row_ids(page)[0] == N_CONCEPTS - 1
    shot(page, "table")
    assert page.errors == []


def test_the_toggle_switches_every_view_to_the_other_metric(page, site):
    open_view(page, site, "#view=concepts")
    assert page.inner_text(".row.head [data-key=overall]").startswith("χ_model")
    page.click("#metric [data-metric=bench]")
    page.wait_for_function("location.hash.includes('metric=bench')")
    assert page.inner_text(".row.head [data-key=overall]").startswith("χ_bench")
    assert page.query_selector(".row.head [data-key=rank]") is None  # the ranking is of χ_model
    shot(page, "table-bench")
    page.click("#views [data-view=heatmaps]")
    assert "correlation of χ_bench" in page.inner_text("#main")
    assert page.errors == []


def test_a_concept_opens_with_highlighted_examples_and_links_to_its_items(page, site):
    open_view(page, site, "#view=concepts")
    first = row_ids(page)[0]
    page.click(f".body .row[data-concept='{first}']")
    page.wait_for_selector("#examples")
    assert page.inner_text("#concept-title").startswith(f"#{first}")
    assert page.query_selector_all("#examples .tok.on")  # tokens highlighted by the concept's activation
    assert page.query_selector_all(".context .tok.on")  # and the corpus contexts
    shot(page, "concept")
    page.click("#examples .item-link")
    page.wait_for_selector("#item")
    assert "Top concepts by saliency" in page.inner_text("#item")
    assert page.errors == []


def test_clicking_the_map_opens_that_concept(page, site):
    open_view(page, site, "#view=map")
    page.wait_for_function("CG.timings.map !== undefined")
    shot(page, "map")
    target = N_CONCEPTS // 2
    point = page.evaluate(f"CG.mapScreenPosition({target})")
    page.mouse.move(point["x"], point["y"])
    assert page.is_visible("#tooltip")
    page.mouse.click(point["x"], point["y"])
    page.wait_for_function("location.hash.includes('view=concept')")
    opened = int(page.evaluate("new URLSearchParams(location.hash.slice(1)).get('c')"))
    xy = received(site / "data/map.js")
    # The click opens the point under the cursor: the target or one drawn on the same spot.
    assert (xy["x"][opened] - xy["x"][target]) ** 2 + (xy["y"][opened] - xy["y"][target]) ** 2 < 1e-2
    assert page.errors == []


def test_a_heatmap_cell_opens_the_concepts_behind_it(page, site):
    open_view(page, site, "#view=heatmaps")
    page.click("[data-cell='overlap:0,1']")
    page.wait_for_selector("#drivers")
    assert page.query_selector_all("#drivers .concept-link")
    shot(page, "heatmaps")
    assert page.errors == []


def test_the_url_restores_the_state_after_a_reload(page, site):
    open_view(page, site, "#view=concepts")
    page.fill("#search", "word2")
    page.click("#metric [data-metric=bench]")
    page.click(".row.head [data-key=support]")
    page.wait_for_function("location.hash.includes('sort=support')")
    before = (page.inner_text("#count"), row_ids(page))
    page.reload()
    page.wait_for_selector(".body .row")
    assert page.input_value("#search") == "word2"
    assert (page.inner_text("#count"), row_ids(page)) == before
    assert page.inner_text(".row.head [data-key=overall]").startswith("χ_bench")
    assert page.errors == []


def test_malicious_items_responses_and_labels_stay_inert(page, site):
    open_view(page, site, f"#view=item&item={EVIL_ITEM}")
    page.wait_for_selector("#item")
    assert page.inner_text("#item pre.prompt") == EVIL  # shown as text, verbatim
    assert page.inner_text("#item pre.response") == EVIL
    open_view(page, site, "#view=concept&c=5")
    page.wait_for_selector("#concept-title")
    assert EVIL in page.inner_text("#concept-title")
    open_view(page, site, "#view=concepts&q=script")
    page.wait_for_selector(".body .row")
    shot(page, "malicious")
    assert page.query_selector("img") is None
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []
