"""The reducer reads exactly the shards it is given (benchmark from each path's own `benchmark=` folder) and
reports per benchmark what was evaluated, extracted, skipped and cut off."""

from __future__ import annotations

import inspect
import re
import json
from pathlib import Path

import polars as pl
import pytest

from competency_gaps.reduce import benchmark_of, run_reduce
from competency_gaps.tables import ITEM_TOKENS, SALIENCY, SCORES, table_from_rows, write_parquet

GAPS = {"epsilon": 0.0, "under_percentile": 5, "over_percentile": 99, "pooling": "pooled", "min_benchmarks": 1,
        "min_support": 1, "n_bootstrap": 0, "ci_level": 0.95, "min_ci_support": 10, "seed": 0}


def write_benchmark(root: Path, benchmark: str, saliency: dict, scores: dict, skipped: dict | None = None,
                    truncated: tuple = (), cut_off: dict | None = None) -> tuple[str, str, str]:
    """Shards of one benchmark under `root`: one item_tokens row per item (skipped: item -> reason)."""
    skipped, cut_off = skipped or {}, cut_off or {}
    shard_dir = root / f"extract/model=m/benchmark={benchmark}/layer=3"
    rows = [{"item_id": i, "concept": c, "saliency": s, "max_activation": s, "active_tokens": 1}
            for (i, c), s in saliency.items()]
    write_parquet(table_from_rows(rows, SALIENCY), shard_dir / "saliency.parquet", SALIENCY)
    tokens = [{"item_id": i, "counted_tokens": 0 if i in skipped else 5, "total_tokens": 9,
               "read_tokens": 0 if i in skipped else 9, "truncated": i in truncated, "skipped": skipped.get(i)}
              for i in scores]
    write_parquet(table_from_rows(tokens, ITEM_TOKENS), shard_dir / "item_tokens.parquet", ITEM_TOKENS)
    score_path = root / f"evaluate/model=m/benchmark={benchmark}/scores.parquet"
    score_rows = [{"item_id": i, "scoring": "x", "score": p, "cut_off": cut_off.get(i)} for i, p in scores.items()]
    write_parquet(table_from_rows(score_rows, SCORES), score_path, SCORES)
    return str(shard_dir / "saliency.parquet"), str(shard_dir / "item_tokens.parquet"), str(score_path)


def reduce(out: Path, *benchmarks: tuple[str, str, str], n_concepts: int, gaps: dict = GAPS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run_reduce([b[0] for b in benchmarks], [b[1] for b in benchmarks], [b[2] for b in benchmarks],
               n_concepts=n_concepts, gaps=gaps, out_dir=out, title="t")


def overview_row(out: Path, benchmark: str) -> dict:
    return pl.read_parquet(out / "benchmarks.parquet").filter(pl.col("benchmark") == benchmark).row(0, named=True)


def test_reducer_uses_only_given_shards_and_flags_coverage_only(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 2.0, ("a2", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    v = write_benchmark(tmp_path, "v", {("v1", 1): 3.0}, {"v1": None})
    write_benchmark(tmp_path, "stale", {("s1", 2): 9.0}, {"s1": 1.0})  # on disk, but not handed over
    out = tmp_path / "concepts"
    reduce(out, a, v, n_concepts=3)

    table = pl.read_parquet(out / "concept_benchmark.parquet")
    assert sorted(table["benchmark"].unique()) == ["a", "v"]
    a0 = table.filter((pl.col("benchmark") == "a") & (pl.col("concept") == 0)).row(0, named=True)
    # χ_model = (2·1 + 1·0) / (2 + 1); χ_bench = 3 · K / total saliency of a = 3 · 3 / 4.
    assert a0["chi_model"] == pytest.approx(2 / 3)
    assert a0["chi_bench"] == pytest.approx(9 / 4)
    assert table.filter(pl.col("benchmark") == "v")["chi_model"].null_count() == 3
    assert table.filter(pl.col("concept") == 2)["missing"].all(), "the stale shard leaked in"
    summary = (out / "summary.md").read_text()
    assert "Coverage only" in summary and ": v." in summary
    assert json.loads((out / "thresholds.json").read_text())["n_concepts"] == 3


def test_skipped_items_count_nowhere_and_context_policy_counts_are_reported(tmp_path):
    paths = write_benchmark(tmp_path, "a", {("a1", 0): 1.0, ("a2", 1): 1.0},
                            {"a1": 1.0, "a2": 0.0, "a3": 1.0, "a4": 1.0},
                            skipped={"a3": "too_long", "a4": "no_counted_tokens"}, truncated=("a2", "a3"))
    out = tmp_path / "concepts"
    reduce(out, paths, n_concepts=2)
    overview = overview_row(out, "a")
    # n_items counts every evaluated item; a3 (skipped as too long) is not counted as truncated.
    assert (overview["n_items"], overview["n_extracted"], overview["n_truncated"]) == (4, 2, 1)
    assert (overview["n_skipped_too_long"], overview["n_skipped_no_tokens"], overview["n_skipped"]) == (1, 1, 2)
    assert overview["mean_score"] == pytest.approx(0.5)  # a3, a4 were skipped: not part of the analysis
    assert pl.read_parquet(out / "concept_benchmark.parquet")["n_items"].unique().to_list() == [2]
    summary = (out / "summary.md").read_text()
    assert "a: 1 truncated, 1 skipped" in summary
    assert "no counted tokens" in summary and "a: 1." in summary


def test_benchmark_with_every_item_skipped_is_reported_not_dropped(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0}, {"a1": 1.0})
    z = write_benchmark(tmp_path, "z", {}, {"z1": 1.0, "z2": 0.0, "z3": 1.0},
                        skipped={"z1": "too_long", "z2": "too_long", "z3": "no_counted_tokens"}, truncated=("z1",))
    out = tmp_path / "concepts"
    reduce(out, a, z, n_concepts=2)
    overview = pl.read_parquet(out / "benchmarks.parquet")
    assert overview["benchmark"].to_list() == ["a", "z"]
    row = overview_row(out, "z")
    assert (row["n_items"], row["n_extracted"], row["n_skipped_too_long"], row["n_skipped_no_tokens"]) == (3, 0, 2, 1)
    assert row["n_truncated"] == 0 and row["covered"] is None and row["mean_score"] is None
    assert pl.read_parquet(out / "concept_benchmark.parquet")["benchmark"].unique().to_list() == ["a"]
    summary = (out / "summary.md").read_text()
    assert "**Benchmark z had all 3 items skipped (2 too long, 1 with no counted tokens) and counts in no χ.**" \
        in summary


def test_every_benchmark_skipped_does_not_crash(tmp_path):
    z = write_benchmark(tmp_path, "z", {}, {"z1": 1.0}, skipped={"z1": "too_long"})
    out = tmp_path / "concepts"
    reduce(out, z, n_concepts=2)
    assert pl.read_parquet(out / "concept_benchmark.parquet").height == 0
    assert pl.read_parquet(out / "concepts.parquet")["classification"].to_list() == ["missing", "missing"]
    assert overview_row(out, "z")["n_extracted"] == 0
    assert "Benchmark z had all 1 items skipped" in (out / "summary.md").read_text()


def test_item_without_a_token_row_is_an_error(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0}, {"a1": 1.0})
    extra = {"item_id": "a9", "scoring": "x", "score": 1.0}  # scored, but extraction never saw it
    rows = pl.read_parquet(a[2]).to_dicts() + [extra]
    write_parquet(table_from_rows(rows, SCORES), a[2], SCORES)
    with pytest.raises(ValueError, match="no item_tokens row"):
        reduce(tmp_path / "concepts", a, n_concepts=2)


def test_cut_off_share_per_benchmark(tmp_path):
    # g: 4 generated responses, 2 stopped at max_new_tokens (g5 is log-likelihood: null); v: nothing generated.
    scores = {f"g{i}": 1.0 for i in range(1, 6)}
    g = write_benchmark(tmp_path, "g", {("g1", 0): 1.0}, scores,
                        cut_off={"g1": True, "g2": False, "g3": True, "g4": False})
    v = write_benchmark(tmp_path, "v", {("v1", 0): 1.0}, {"v1": 1.0})
    out = tmp_path / "concepts"
    reduce(out, g, v, n_concepts=2)
    g_row, v_row = overview_row(out, "g"), overview_row(out, "v")
    assert (g_row["n_generated"], g_row["n_cut_off"], g_row["cut_off_share"]) == (4, 2, 0.5)
    assert (v_row["n_generated"], v_row["n_cut_off"], v_row["cut_off_share"]) == (0, 0, None)
    summary = (out / "summary.md").read_text()
    assert "g: 2 of 4 responses hit max_new_tokens" in summary
    assert "v: 0 of" not in summary


def test_gap_analysis_takes_its_seed_from_gaps(tmp_path):
    assert list(inspect.signature(run_reduce).parameters) == [
        "saliency_paths", "token_paths", "score_paths", "n_concepts", "gaps", "out_dir", "title", "labels_path",
        "stability_path", "validity_path"]
    saliency = {(f"a{i}", 0): 1.0 + i for i in range(12)}
    a = write_benchmark(tmp_path, "a", saliency, {f"a{i}": (i % 3) / 2 for i in range(12)})
    bounds = {}
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        reduce(out, a, n_concepts=1, gaps={**GAPS, "n_bootstrap": 30, "seed": seed})
        assert json.loads((out / "thresholds.json").read_text())["seed"] == seed
        bounds[seed] = pl.read_parquet(out / "concepts.parquet").select("chi_model_lo", "chi_model_hi").row(0)
    assert None not in bounds[1] and bounds[1] != bounds[2]


def test_reducer_without_seed_or_min_ci_support_in_gaps_uses_defaults(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0}, {"a1": 1.0})
    out = tmp_path / "concepts"
    reduce(out, a, n_concepts=1, gaps={k: v for k, v in GAPS.items() if k not in ("seed", "min_ci_support")})
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert (thresholds["seed"], thresholds["min_ci_support"]) == (0, 10)


def test_key_value_folders_above_the_results_are_not_parsed(tmp_path):
    # run=3 above the results, and a stray benchmark= folder: only the last benchmark= segment names it.
    root = tmp_path / "run=3" / "benchmark=old" / "results"
    a = write_benchmark(root, "a", {("a1", 0): 2.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    b = write_benchmark(root, "b", {("b1", 0): 1.0}, {"b1": 0.0})
    assert Path(a[0]).parts[-5:] == ("extract", "model=m", "benchmark=a", "layer=3", "saliency.parquet")
    out = tmp_path / "concepts"
    reduce(out, a, b, n_concepts=2)
    table = pl.read_parquet(out / "concept_benchmark.parquet")
    assert sorted(table["benchmark"].unique()) == ["a", "b"]
    # Concept 0: (2·1 + 1·0) / (2 + 1) pooled over a1 and b1.
    suite = pl.read_parquet(out / "concepts.parquet")
    assert suite.filter(pl.col("concept") == 0)["chi_model"].item() == pytest.approx(2 / 3)
    assert pl.read_parquet(out / "benchmarks.parquet")["benchmark"].to_list() == ["a", "b"]


def test_benchmark_of_reads_the_last_benchmark_folder():
    assert benchmark_of("/x/benchmark=old/r/extract/model=m/benchmark=gsm8k/layer=1/saliency.parquet") == "gsm8k"
    assert benchmark_of("/scratch/run=3/evaluate/model=m/benchmark=a=b/scores.parquet") == "a=b"
    with pytest.raises(ValueError, match="benchmark="):
        benchmark_of("/scratch/run=3/saliency.parquet")
    with pytest.raises(ValueError, match="benchmark="):
        benchmark_of("/scratch/extract/benchmark=gsm8k.parquet")  # a file name is not a folder


def test_shard_from_an_older_pipeline_is_named_in_the_error(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0}, {"a1": 1.0})
    pl.DataFrame({"item_id": ["a1"], "counted_tokens": [5], "truncated": [False]}).write_parquet(a[1])  # no `skipped`
    with pytest.raises(ValueError, match=r"benchmark=a/layer=3/item_tokens.parquet lacks column\(s\) \['skipped'\]"):
        reduce(tmp_path / "concepts", a, n_concepts=1)


def test_benchmark_prior_comes_from_the_extracted_scored_items(tmp_path):
    # a: a1 1, a2 0, a3 1 -> p̄_a = 2/3 (a4 scored 0 but skipped: not analysed, not in p̄_a); b: 0, 0, 1 -> 1/3.
    # Concept 0 fires on a1 (s 1), b1 (s 1), b3 (s 2): chi = (1 + 0 + 2) / 4 = 0.75, prior = (2/3 + 1/3 + 2/3) / 4
    # = 5/12, adjusted = 1/3; per benchmark a: 1 − 2/3, b: 2/3 − 1/3.
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0, "a3": 1.0, "a4": 0.0},
                        skipped={"a4": "too_long"})
    b = write_benchmark(tmp_path, "b", {("b1", 0): 1.0, ("b3", 0): 2.0}, {"b1": 0.0, "b2": 0.0, "b3": 1.0})
    out = tmp_path / "concepts"
    reduce(out, a, b, n_concepts=3, gaps={**GAPS, "ranking": "lower_bound", "shrinkage_strength": 3})
    suite = pl.read_parquet(out / "concepts.parquet")
    assert suite.columns[-4:] == ["chi_model_adjusted", "chi_model_prior", "chi_model_shrunk", "chi_model_shrunk_adjusted"]
    c0 = suite.filter(pl.col("concept") == 0).row(0, named=True)
    assert (c0["chi_model"], c0["chi_model_prior"], c0["chi_model_adjusted"]) == pytest.approx((0.75, 5 / 12, 1 / 3))
    # κ = 3, n = scored ESS = 4² / (1 + 1 + 4) = 8/3: (8/3 · 0.75 + 3 · 5/12) / (8/3 + 3) = 39/68.
    assert c0["chi_model_shrunk"] == pytest.approx(39 / 68)
    assert suite.filter(pl.col("concept") == 2)["chi_model_shrunk"].to_list() == [None]
    # Per benchmark, adjusted = chi_model − the mean score benchmarks.parquet reports.
    table = pl.read_parquet(out / "concept_benchmark.parquet")
    assert table.columns[-1] == "chi_model_adjusted"
    means = pl.read_parquet(out / "benchmarks.parquet").select("benchmark", "mean_score")
    assert means["mean_score"].to_list() == pytest.approx([2 / 3, 1 / 3])
    check = table.join(means, on="benchmark").filter(pl.col("chi_model").is_not_null())
    assert (check["chi_model_adjusted"] - (check["chi_model"] - check["mean_score"])).abs().max() < 1e-12
    assert table.filter(pl.col("concept") == 0)["chi_model_adjusted"].to_list() == pytest.approx([1 / 3, 1 / 3])
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert (thresholds["ranking"], thresholds["shrinkage_strength"]) == ("lower_bound", 3.0)
    assert "gaps.ranking = lower_bound" in (out / "summary.md").read_text()


def test_reducer_without_ranking_options_shrinks_with_an_estimated_strength(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 1.0, ("a2", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    out = tmp_path / "concepts"
    reduce(out, a, n_concepts=2)  # GAPS has neither key
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["ranking"] == "shrunk_adjusted"
    assert isinstance(thresholds["shrinkage_strength"], float) and thresholds["shrinkage_strength"] >= 0
    assert "gaps.ranking = shrunk_adjusted" in (out / "summary.md").read_text()


def test_labels_name_the_concepts_of_the_summary_only(tmp_path):
    """labels_path puts "#id label" in summary.md (escaped: a pipe and a newline break no table) and leaves
    every table as it is without labels."""
    from competency_gaps.tables import LABELS

    a = write_benchmark(tmp_path, "a", {("a1", 0): 2.0, ("a2", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    rows = [{"concept": 0, "live": True, "label": "dates | times\n<script>x</script>", "label_source": "llm",
             "detection_score": 0.9, "n_detection": 20},
            {"concept": 1, "live": True, "label": "carries", "label_source": "heuristic",
             "detection_score": float("nan"), "n_detection": 2},
            {"concept": 2, "live": False}]  # never fired: no label
    labels = tmp_path / "labels.parquet"
    write_parquet(table_from_rows(rows, LABELS), labels, LABELS)
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    reduce(plain, a, n_concepts=3)
    labelled.mkdir()
    run_reduce([a[0]], [a[1]], [a[2]], n_concepts=3, gaps=GAPS, out_dir=labelled, title="t", labels_path=str(labels))

    for name in ("concepts.parquet", "concept_benchmark.parquet", "benchmarks.parquet", "overlap.parquet"):
        assert pl.read_parquet(labelled / name).equals(pl.read_parquet(plain / name)), name
    text, before = (labelled / "summary.md").read_text(), (plain / "summary.md").read_text()
    assert "| #0 dates \\| times \\<script\\>x\\</script\\> | " in text and "| #1 carries | " in text
    assert "<script>" not in text and "dates" not in before and "| 0 | " in before  # without labels: bare ids, as before
    widths = [len(re.split(r"(?<!\\)\|", line.strip())) - 2 for line in text.splitlines() if line.startswith("|")]
    assert widths == [len(re.split(r"(?<!\\)\|", line.strip())) - 2
                      for line in before.splitlines() if line.startswith("|")]


def test_summary_quotes_the_robustness_numbers_after_the_findings(tmp_path):
    a = write_benchmark(tmp_path, "a", {("a1", 0): 2.0, ("a2", 0): 1.0, ("a2", 1): 1.0}, {"a1": 1.0, "a2": 0.0})
    stability = {"chi_bench_std": {"mean_filtered": 0.0512, "median_filtered": 0.04, "n_filtered": 7},
                 "chi_model_std": {"mean_filtered": 0.0333, "median_filtered": 0.02, "n_filtered": 7},
                 "n_resamples": 100, "keep_fraction": 0.8, "paper": {"chi_bench_std": 0.025, "chi_model_std": 0.014},
                 "support_filter": {"min_benchmarks": 2, "min_support": 20}}
    validity = {"options": {"weak_fraction": 0.1},
                "directions": {"A->B": {"effect": -0.195, "adjusted_effect": -0.018, "p_value": 0.2807,
                                        "n_dominated": 70, "n_heldout": 280}}}
    (tmp_path / "stability.json").write_text(json.dumps(stability))
    (tmp_path / "validity.json").write_text(json.dumps(validity))
    out = tmp_path / "concepts"
    run_reduce([a[0]], [a[1]], [a[2]], n_concepts=2, gaps=GAPS, out_dir=out, title="t",
               stability_path=tmp_path / "stability.json", validity_path=tmp_path / "validity.json")
    summary = (out / "summary.md").read_text()
    assert "χ_bench 0.051 and of χ_model 0.033" in summary and "the paper reports 0.025 and 0.014" in summary
    assert "A→B" in summary and "effect -0.195, benchmark-adjusted -0.018, one-sided permutation p 0.281" in summary
    assert summary.index("## chi_model ranking") < summary.index("## Robustness") < summary.index("## Concepts")


def test_tables_do_not_depend_on_how_the_rows_are_batched_or_sharded(tmp_path, monkeypatch):
    """The reducer streams the shards in batches of BATCH_ROWS rows: batches of 2 rows, or a's rows split over two
    shard files, give the files of one batch. Saliencies are multiples of 1/4, so every sum is exact."""
    import competency_gaps.reduce as reduce_module

    saliency = {(f"a{i}", c): 0.25 * (1 + (i * 7 + c) % 9) for i in range(30) for c in range(4) if (i + c) % 3}
    scores = {f"a{i}": (i % 4) / 4 for i in range(30)}
    a = write_benchmark(tmp_path / "one", "a", saliency, scores)
    b = write_benchmark(tmp_path / "one", "b", {("b1", 0): 1.0, ("b2", 1): 0.5}, {"b1": 1.0, "b2": 0.0})
    gaps = {**GAPS, "n_bootstrap": 40, "min_ci_support": 2}
    reduce(tmp_path / "whole", a, b, n_concepts=4, gaps=gaps)

    monkeypatch.setattr(reduce_module, "BATCH_ROWS", 2)
    reduce(tmp_path / "batched", a, b, n_concepts=4, gaps=gaps)
    monkeypatch.undo()
    first = dict(list(saliency.items())[:25])
    rest = dict(list(saliency.items())[25:])
    part_one = write_benchmark(tmp_path / "split1", "a", first, scores)
    part_two = write_benchmark(tmp_path / "split2", "a", rest, scores)
    out = tmp_path / "split"
    out.mkdir()
    run_reduce([part_one[0], part_two[0], b[0]], [a[1], b[1]], [a[2], b[2]], n_concepts=4, gaps=gaps, out_dir=out,
               title="t")

    assert pl.read_parquet(tmp_path / "whole" / "concept_benchmark.parquet")["chi_model_lo"].null_count() < 8
    for variant in ("batched", "split"):
        for name in ("concept_benchmark.parquet", "concepts.parquet", "benchmarks.parquet", "overlap.parquet"):
            assert pl.read_parquet(tmp_path / variant / name).equals(pl.read_parquet(tmp_path / "whole" / name)), \
                (variant, name)
        assert (tmp_path / variant / "summary.md").read_text() == (tmp_path / "whole" / "summary.md").read_text()
