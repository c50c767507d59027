"""Explorer responsiveness at scale: a synthetic site of 65,536 concepts × 14 benchmarks (and 10⁵ items), opened
from disk in headless Chromium (Debian's package, via Playwright), timing what a user waits for.

    .venv/bin/python bench/explorer.py [--concepts 65536] [--benchmarks 14] [--umap]

Prints: site size; page load to a usable table and to a drawn map; search, sort, toggle and scroll latency of the
table (from the input event to the next painted frame); map draw time per pan/zoom frame and hover lookup; opening
a concept (its shard loaded on demand). --umap also times the stage's UMAP + k-means of random decoder directions
of that many concepts (d_model 576, as SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from competency_gaps.explorer_site import write_site

FRAME = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def synthetic_site(out: Path, n_concepts: int, n_benchmarks: int, n_items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    names = [f"bench_{b:02d}" for b in range(n_benchmarks)]
    support = rng.poisson(30, size=(n_benchmarks, n_concepts)) * (rng.random((n_benchmarks, n_concepts)) < 0.7)
    chi_model = np.where(support > 0, rng.beta(2, 5, size=support.shape), np.nan)
    chi_bench = np.where(support > 0, rng.lognormal(0, 1.5, size=support.shape), 0.0)
    words = ["date", "number", "plus", "city", "name", "verb", "past", "question", "option", "answer", "the", "of"]
    labels = [f'"{words[c % 12]}", "{words[(c * 7) % 12]}" → "{words[(c * 5) % 12]}{c % 97}"' for c in range(n_concepts)]

    def rounded(values):
        return [None if not np.isfinite(v) else round(float(v), 4) for v in values]

    total_support = support.sum(axis=0)
    overall = np.nanmean(np.where(support > 0, chi_model, np.nan), axis=0)
    table = {
        "concept": list(range(n_concepts)), "label": labels, "label_source": ["heuristic"] * n_concepts,
        "detection": rounded(rng.random(n_concepts)), "chi_model": rounded(overall),
        "chi_model_lo": rounded(overall - 0.1), "chi_model_hi": rounded(overall + 0.1),
        "chi_bench": rounded(chi_bench.mean(axis=0)), "rank": (np.argsort(np.argsort(overall)) + 1).tolist(),
        "rank_score": rounded(overall - 0.3), "rank_column": "chi_model_shrunk_adjusted",
        "support": total_support.tolist(), "ess": rounded(total_support * 0.8),
        "classification": rng.choice(["missing", "under", "normal", "over"], n_concepts, p=[.1, .05, .8, .05]).tolist(),
        "passes_support_filter": (total_support >= 20).tolist(),
        "per_benchmark": {"model": [rounded(row) for row in chi_model], "bench": [rounded(row) for row in chi_bench],
                          "support": support.tolist()},
    }
    centres = rng.normal(0, 8, size=(60, 2))
    cluster = rng.integers(0, 60, n_concepts)
    xy = centres[cluster] + rng.normal(0, 1.2, size=(n_concepts, 2))
    concept_map = {"x": rounded(xy[:, 0]), "y": rounded(xy[:, 1]), "cluster": cluster.tolist(),
                   "clusters": [{"id": c, "name": f"{words[c % 12]} · {words[(c + 3) % 12]}", "size": int((cluster == c).sum()),
                                 "hull": [[round(float(centres[c, 0] + 3 * np.cos(a)), 3), round(float(centres[c, 1] + 3 * np.sin(a)), 3)]
                                          for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)],
                                 "x": round(float(centres[c, 0]), 3), "y": round(float(centres[c, 1]), 3)} for c in range(60)]}
    context = {"tokens": ["The", " date", " was", " 1999", "."], "acts": [0, 0.5, 0, 3.2, 0]}
    records = {c: {"label": labels[c], "label_source": "heuristic", "detection": 0.7, "live": True, "n_detection": 20,
                   "max_activation": 5.0, "firing": ["date"], "promoted": ["year"], "suppressed": ["no"],
                   "benchmarks": [{"b": b, "chi_model": rounded([chi_model[b, c]])[0], "lo": 0.1, "hi": 0.5, "adjusted": 0.0,
                                   "ess": 5.0, "support": int(support[b, c]), "chi_bench": round(float(chi_bench[b, c]), 4),
                                   "missing": bool(support[b, c] == 0)} for b in range(n_benchmarks)],
                   "contexts": [context] * 5,
                   "examples": [{"b": b, "side": side, "item": f"item-{(c * 31 + b) % n_items}", "score": 0.0, "saliency": 0.3,
                                 **context} for b in range(n_benchmarks) for side in ("worst", "best")]}
               for c in range(n_concepts)}
    items = [{"id": f"item-{i}", "b": i % n_benchmarks, "prompt": f"Question {i}?", "gold": "42", "response": "41",
              "score": 0.0, "top": [[int(c), 0.5, 0.1] for c in rng.choice(n_concepts, 10, replace=False)]}
             for i in range(n_items)]
    meta = {"model": "synthetic", "layer": 0, "n_concepts": n_concepts, "n_live": n_concepts,
            "sae": {"d_in": 4096, "d_sae": n_concepts, "layer": 0, "hook_name": "blocks.0.hook_resid_post",
                    "explained_variance": 0.8, "l0": 64, "dead_fraction": 0.01, "training_tokens": 10**8, "source": "synthetic"},
            "benchmarks": [{"name": n, "category": "Other", "n_items": n_items // n_benchmarks, "n_scored": n_items // n_benchmarks,
                            "accuracy": 0.5, "covered": int((support[b] > 0).sum()),
                            "missing_percent": round(100 * float((support[b] == 0).mean()), 2)} for b, n in enumerate(names)],
            "thresholds": {"ranking": "shrunk_adjusted"},
            "correlation": {m: {"r": np.eye(n_benchmarks).tolist(), "n": np.full((n_benchmarks,) * 2, 100).tolist(),
                                "drivers": [[list(range(12))] * n_benchmarks] * n_benchmarks} for m in ("model", "bench")},
            "overlap": {"jaccard": np.eye(n_benchmarks).tolist(), "shared": [[list(range(12))] * n_benchmarks] * n_benchmarks,
                        "only": [[list(range(12))] * n_benchmarks] * n_benchmarks}}
    write_site(out, meta, table, concept_map, records, items, shard_size=256)


def in_page(page, action: str) -> float:
    """Milliseconds from running `action` (JS) to the second animation frame after it (the result painted)."""
    return page.evaluate(f"async () => {{ const t = performance.now(); {action}; await {FRAME}; return performance.now() - t; }}")


def measure(site: Path, chromium: str) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    url = (site / "index.html").as_uri()
    out = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        loads = []
        for _ in range(3):
            page.goto("about:blank")  # a fresh document each time, not a same-page hash change
            began = time.perf_counter()
            page.goto(url + "#view=concepts")
            page.wait_for_selector(".body .row")
            loads.append(1000 * (time.perf_counter() - began))
        out["load to a usable table (median of 3)"] = f"{statistics.median(loads):.0f} ms"
        search = [in_page(page, f"const s = document.querySelector('#search'); s.value = '{q}'; s.dispatchEvent(new Event('input'))")
                  for q in ("d", "da", "dat", "date", "")]
        out["search keystroke → table redrawn (median of 5)"] = f"{statistics.median(search):.0f} ms"
        sort = [in_page(page, f"document.querySelector('.row.head [data-key={key}]').click()")
                for key in ("support", "b3", "label", "overall", "id")]
        out["sort by a column → table redrawn (median of 5)"] = f"{statistics.median(sort):.0f} ms"
        toggle = [in_page(page, f"document.querySelector('#metric [data-metric={m}]').click()") for m in ("bench", "model") * 2]
        out["metric toggle → table redrawn (median of 4)"] = f"{statistics.median(toggle):.0f} ms"
        scroll = [in_page(page, f"document.querySelector('#table').scrollTop = {y}") for y in (5000, 400000, 1200000, 10)]
        out["scroll jump → rows drawn (median of 4)"] = f"{statistics.median(scroll):.0f} ms"
        concept = [in_page(page, f"location.hash = '#view=concept&c={c}'; await new Promise(r => {{ const w = () => "
                           f"document.querySelector('#examples') ? r() : setTimeout(w, 2); w(); }})") for c in (100, 30000, 65000)]
        out["open a concept (shard loaded on demand; median of 3)"] = f"{statistics.median(concept):.0f} ms"

        page.goto("about:blank")
        began = time.perf_counter()
        page.goto(url + "#view=map")
        page.wait_for_function("CG.timings.map !== undefined")
        out["load to a drawn map"] = f"{1000 * (time.perf_counter() - began):.0f} ms"
        box = page.query_selector("#map").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        draws = []
        for step in range(10):
            page.mouse.move(cx, cy)
            page.mouse.wheel(0, -120 if step < 5 else 120)
            page.evaluate(FRAME)
            draws.append(page.evaluate("CG.timings.map"))
        page.mouse.move(cx, cy)
        page.mouse.down()
        for step in range(10):
            page.mouse.move(cx + 10 * (step + 1), cy + 5 * (step + 1))
            page.evaluate(FRAME)
            draws.append(page.evaluate("CG.timings.map"))
        page.mouse.up()
        out["map: draw per pan/zoom frame (median / max of 20)"] = f"{statistics.median(draws):.1f} / {max(draws):.1f} ms"
        hover = [in_page(page, f"document.querySelector('#map').dispatchEvent(new MouseEvent('mousemove', "
                               f"{{clientX: {cx + dx}, clientY: {cy}, bubbles: true}}))") for dx in range(-50, 50, 10)]
        out["map: hover → tooltip (median of 10)"] = f"{statistics.median(hover):.1f} ms"
        out["page errors"] = str(len(errors))
        browser.close()
    return out


def time_umap(n_concepts: int, d_model: int = 576) -> dict[str, str]:
    from competency_gaps.concept_map import map_layout

    directions = np.random.default_rng(0).normal(size=(n_concepts, d_model)).astype(np.float32)
    began = time.perf_counter()
    map_layout(directions, {"seed": 0})
    return {f"concept_map stage: UMAP + k-means of {n_concepts:,} random directions (d {d_model})":
            f"{time.perf_counter() - began:.0f} s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=65536)
    parser.add_argument("--benchmarks", type=int, default=14)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--umap", action="store_true", help="also time the stage's UMAP at this many concepts")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("bench/explorer.py needs Chromium (Debian: apt-get install chromium)")
    folder = Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    try:
        began = time.perf_counter()
        synthetic_site(folder / "site", args.concepts, args.benchmarks, args.items)
        size = sum(p.stat().st_size for p in (folder / "site").rglob("*") if p.is_file())
        table = (folder / "site/data/table.js").stat().st_size
        print(f"explorer, {args.concepts:,} concepts × {args.benchmarks} benchmarks, {args.items:,} items "
              f"(written in {time.perf_counter() - began:.0f} s)")
        print(f"  {'site size (table data loaded up front)':55s} {size / 2**20:.0f} MiB ({table / 2**20:.1f} MiB)")
        for key, value in measure(folder / "site", chromium).items():
            print(f"  {key:55s} {value}")
        if args.umap:
            for key, value in time_umap(args.concepts).items():
                print(f"  {key:55s} {value}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
