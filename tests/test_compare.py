"""Cross-model comparison: item agreement, concept matching across SAEs, differences, rank agreement, the
flipped-SAE config check, and the compare stage end to end on hand-made shards."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from competency_gaps import compare
from competency_gaps.compare import (
    CompareOptions,
    ModelRun,
    best_matches,
    concept_differences,
    flipped_differences,
    item_agreement,
    match_concepts,
    profile_matrix,
    rank_agreement,
    run_compare,
    run_flipped,
    saliency_profiles,
)
from competency_gaps.tables import SALIENCY, SCORES, write_parquet


def scores(rows: list[tuple[str, str, float | None]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"benchmark": pl.String, "item_id": pl.String, "score": pl.Float64}, orient="row")


def saliency(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"benchmark": pl.String, "item_id": pl.String, "concept": pl.Int32,
                                      "saliency": pl.Float32}, orient="row")


def items(*ids: str, benchmark: str = "b") -> pl.DataFrame:
    return pl.DataFrame({"benchmark": [benchmark] * len(ids), "item_id": list(ids)})


def test_item_agreement_is_computed_on_the_items_both_models_scored():
    a = scores([("x", "1", 1.0), ("x", "2", 0.0), ("x", "3", 1.0), ("x", "4", 0.0), ("y", "1", 1.0), ("y", "2", None)])
    b = scores([("x", "1", 1.0), ("x", "2", 1.0), ("x", "3", 0.0), ("x", "4", 0.0), ("y", "1", 0.5), ("y", "2", 1.0),
                ("y", "9", 1.0)])
    table = {row["benchmark"]: row for row in item_agreement(a, b).iter_rows(named=True)}
    x = table["x"]
    assert x["n_items"] == 4 and x["mean_score_a"] == 0.5 and x["mean_score_b"] == 0.5 and x["difference"] == 0
    assert x["agreement"] == pytest.approx(0.5)  # items 1 and 4 agree, 2 and 3 do not
    assert x["correlation"] == pytest.approx(0.0)  # a = (1, 0, 1, 0), b = (1, 1, 0, 0): uncorrelated
    y = table["y"]  # y/2 has no score from A, y/9 is B's only: one item left
    assert y["n_items"] == 1 and y["difference"] == pytest.approx(0.5) and y["agreement"] == pytest.approx(0.5)
    assert y["correlation"] is None  # one item: no correlation, not NaN
    suite = table["all"]
    assert suite["n_items"] == 5 and suite["mean_score_a"] == pytest.approx(3 / 5) and suite["mean_score_b"] == pytest.approx(2.5 / 5)


def test_profiles_are_unit_rows_over_the_given_items_only():
    s = saliency([("b", "1", 0, 3.0), ("b", "2", 0, 4.0), ("b", "zz", 1, 9.0), ("b", "2", 2, 2.0)])
    matrix = profile_matrix(s, items("1", "2"), n_concepts=4).toarray()
    np.testing.assert_allclose(matrix[0], [0.6, 0.8])
    np.testing.assert_allclose(matrix[1], [0, 0])  # fires only on an item outside the shared set
    np.testing.assert_allclose(matrix[2], [0, 1])
    np.testing.assert_allclose(matrix[3], [0, 0])


def test_profiles_stream_batches_of_several_benchmarks_into_the_items_columns():
    # run_compare streams each model's shards (a batch of rows at a time); the same id in two benchmarks is two
    # items, and the columns follow `items` in its own order.
    frame = saliency([("x", "1", 0, 3.0), ("y", "1", 0, 4.0), ("x", "2", 1, 1.0), ("y", "7", 2, 5.0), ("x", "1", 3, 0.0)])
    shared = pl.DataFrame({"benchmark": ["y", "x", "x"], "item_id": ["1", "2", "1"]})
    batches = {name: [part.slice(i, 1).drop("benchmark") for i in range(part.height)]
               for (name,), part in frame.partition_by("benchmark", as_dict=True).items()}
    profiles = saliency_profiles(batches, shared, 4)
    np.testing.assert_allclose(profiles.matrix.toarray(), [[0.8, 0, 0.6], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert profiles.live.tolist() == [True, True, True, False]  # 2 fires only off the shared items; 3 never fires
    np.testing.assert_allclose(profile_matrix(frame, shared, 4).toarray(), profiles.matrix.toarray())


def test_concepts_are_matched_by_the_items_they_fire_on_mutually_and_above_the_threshold():
    shared = items("1", "2", "3", "4")
    # A0 fires on items 1, 2; A1 on 3, 4; A2 mostly on 1, 2 as well (but less exactly than A0); A3 on nothing.
    a = saliency([("b", "1", 0, 1.0), ("b", "2", 0, 1.0), ("b", "3", 1, 2.0), ("b", "4", 1, 1.0),
                  ("b", "1", 2, 1.0), ("b", "2", 2, 1.0), ("b", "3", 2, 1.0)])
    # B5 fires on items 1, 2 at another scale (cosine 1 with A0); B2 on 3, 4 in a different proportion.
    b = saliency([("b", "1", 5, 7.0), ("b", "2", 5, 7.0), ("b", "3", 2, 1.0), ("b", "4", 2, 2.0)])
    pairs = match_concepts(a, b, shared, n_concepts_a=4, n_concepts_b=6, min_similarity=0.0)
    assert pairs.rows() == [(0, 5, pytest.approx(1.0)), (1, 2, pytest.approx(4 / 5))]  # A2's best is B5, taken by A0
    strict = match_concepts(a, b, shared, n_concepts_a=4, n_concepts_b=6, min_similarity=0.9)
    assert strict["concept_a"].to_list() == [0]


def test_best_matches_agree_with_the_dense_similarity_matrix_across_blocks(monkeypatch):
    monkeypatch.setattr(compare, "_MATCH_CHUNK", 3)  # several blocks, so the running column maxima are exercised
    rng = np.random.default_rng(0)
    dense_a = rng.random((10, 8)) * (rng.random((10, 8)) < 0.4)
    dense_b = rng.random((7, 8)) * (rng.random((7, 8)) < 0.4)
    unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-300)  # noqa: E731
    best_b, sim_a, best_a, sim_b = best_matches(sparse.csr_matrix(unit(dense_a)), sparse.csr_matrix(unit(dense_b)))
    similarity = unit(dense_a) @ unit(dense_b).T
    np.testing.assert_array_equal(best_b, similarity.argmax(axis=1))
    np.testing.assert_allclose(sim_a, similarity.max(axis=1))
    np.testing.assert_array_equal(best_a, similarity.argmax(axis=0))
    np.testing.assert_allclose(sim_b, similarity.max(axis=0))


def concepts_table(rows: list[tuple[int, float | None, float | None, int, bool]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"concept": pl.Int32, "chi_model": pl.Float64, "chi_model_adjusted": pl.Float64,
                                      "scored_support": pl.Int64, "passes_support_filter": pl.Boolean}, orient="row")


def test_differences_rank_the_pairs_passing_both_filters_by_the_absolute_difference():
    pairs = pl.DataFrame({"concept_a": [0, 1, 2, 3], "concept_b": [10, 11, 12, 13], "similarity": [0.9, 0.8, 0.7, 0.6]})
    a = concepts_table([(0, 0.5, 0.0, 50, True), (1, 0.9, 0.1, 50, True), (2, 0.1, -0.3, 50, True), (3, 0.0, -0.5, 2, False)])
    b = concepts_table([(10, 0.4, 0.05, 40, True), (11, 0.2, 0.0, 40, True), (12, 0.6, 0.2, 40, True), (13, 0.9, 0.1, 40, True)])
    table = concept_differences(pairs, a, b)
    assert table["concept_a"].to_list() == [1, 2, 0, 3]  # |0.7| > |−0.5| > |0.1|; concept 3 fails A's filter: last
    assert table["delta"].to_list() == pytest.approx([0.7, -0.5, 0.1, -0.9])
    assert table["delta_adjusted"].to_list() == pytest.approx([0.1, -0.5, -0.05, -0.6])
    assert table["ranked"].to_list() == [True, True, True, False]
    adjusted = concept_differences(pairs, a, b, by="chi_model_adjusted")
    assert adjusted["concept_a"].to_list() == [2, 1, 0, 3]


def test_rank_agreement_uses_the_finite_pairs_and_refuses_a_constant_side():
    result = rank_agreement(np.array([0.1, 0.2, 0.3, np.nan, 0.5]), np.array([1.0, 4.0, 9.0, 2.0, 25.0]))
    assert result["n"] == 4 and result["spearman"] == pytest.approx(1.0)
    assert rank_agreement(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]))["spearman"] == pytest.approx(-1.0)
    assert rank_agreement(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]))["spearman"] is None
    assert rank_agreement(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == {"spearman": None, "p_value": None, "n": 2}


def test_flipped_differences_compare_each_concept_with_itself():
    own = concepts_table([(0, 0.5, 0.0, 50, True), (1, 0.9, 0.1, 50, True), (2, None, None, 0, False)])
    flipped = concepts_table([(0, 0.2, -0.1, 50, True), (1, 0.8, 0.0, 50, True), (2, 0.4, 0.0, 3, False)])
    table = flipped_differences(own, flipped)
    assert table.select("concept_a", "concept_b").rows() == [(0, 0), (1, 1), (2, 2)]
    assert table["delta"].to_list()[:2] == pytest.approx([0.3, 0.1]) and table["delta"][2] is None


def test_compare_options_reject_an_unknown_order():
    with pytest.raises(ValueError, match="compare.by"):
        CompareOptions(by="chi_bench")


# ---------------------------------------------------------------------------------------------------------
# The stage on hand-made shards


def write_model(folder, name: str, concept_of_item: dict[str, int], item_scores: dict[str, float], n_concepts: int,
                labels: dict[int, str]) -> ModelRun:
    """One benchmark `b` whose items each fire one concept (saliency 1), with concepts.parquet holding each
    concept's χ_model (its item's score): enough for the stage to match, rank and render."""
    bench = folder / name / "benchmark=b"
    bench.mkdir(parents=True)
    ids = sorted(item_scores)
    write_parquet(pl.DataFrame({"item_id": ids, "concept": [concept_of_item[i] for i in ids], "saliency": [1.0] * len(ids),
                                "max_activation": [1.0] * len(ids), "active_tokens": [1] * len(ids)}).to_arrow(),
                  bench / "saliency.parquet", SALIENCY)
    pl.DataFrame({"item_id": ids, "truncated": [False] * len(ids), "skipped": [None] * len(ids)},
                 schema={"item_id": pl.String, "truncated": pl.Boolean, "skipped": pl.String}).write_parquet(bench / "item_tokens.parquet")
    write_parquet(pl.DataFrame({"item_id": ids, "scoring": ["exact"] * len(ids), "score": [item_scores[i] for i in ids]})
                  .with_columns(prediction=pl.lit(None, pl.String), response=pl.lit(None, pl.String),
                                choice_logprobs=pl.lit(None, pl.List(pl.Float64)), cut_off=pl.lit(None, pl.Boolean)).to_arrow(),
                  bench / "scores.parquet", SCORES)
    fired = {concept_of_item[i]: item_scores[i] for i in ids}
    concepts_table([(c, fired.get(c), None if c not in fired else 0.0, int(c in fired), c in fired)
                    for c in range(n_concepts)]).write_parquet(folder / name / "concepts.parquet")
    pl.DataFrame({"concept": list(labels), "label": list(labels.values())}).write_parquet(folder / name / "labels.parquet")
    return ModelRun(name, [str(bench / "saliency.parquet")], [str(bench / "item_tokens.parquet")],
                    [str(bench / "scores.parquet")], str(folder / name / "concepts.parquet"),
                    str(folder / name / "labels.parquet"), n_concepts)


def test_the_compare_stage_writes_labelled_tables_and_the_figure(tmp_path):
    run_a = write_model(tmp_path, "A", {"1": 0, "2": 1, "3": 2}, {"1": 1.0, "2": 0.0, "3": 1.0}, 3,
                        {0: "numbers", 1: "dates", 2: "names"})
    run_b = write_model(tmp_path, "B", {"1": 4, "2": 3, "3": 0}, {"1": 0.0, "2": 0.0, "3": 1.0}, 5,
                        {4: "digits", 3: "days", 0: "people"})
    out = tmp_path / "out"
    summary = run_compare(run_a, run_b, CompareOptions(top_n=10), out)
    assert summary["shared_items"] == 3 and summary["matched_pairs"] == 3 and summary["ranked_pairs"] == 3
    table = pl.read_csv(out / "cross_model.csv")
    first = table.row(0, named=True)  # numbers (A: 1.0) ~ digits (B: 0.0): the only pair that differs
    assert (first["concept_a"], first["label_a"], first["concept_b"], first["label_b"]) == (0, "numbers", 4, "digits")
    assert first["delta"] == pytest.approx(1.0)
    markdown = (out / "cross_model.md").read_text()
    assert "#0 numbers" in markdown and "#4 digits" in markdown and "+1.000" in markdown
    benchmarks = pl.read_csv(out / "benchmarks.csv")
    assert benchmarks.filter(pl.col("benchmark") == "b")["difference"].item() == pytest.approx(1 / 3)
    assert json.loads((out / "cross_model.json").read_text())["matched_pairs"] == 3
    assert (out / "cross_model.png").stat().st_size > 0 and (out / "cross_model.svg").stat().st_size > 0


def test_the_flipped_stage_reports_the_rank_correlation(tmp_path):
    own = concepts_table([(c, c / 10, 0.0, 50, True) for c in range(6)])
    flipped = concepts_table([(c, (5 - c) / 10, 0.0, 50, True) for c in range(6)])  # exactly reversed ranks
    own.write_parquet(tmp_path / "own.parquet")
    flipped.write_parquet(tmp_path / "flipped.parquet")
    summary = run_flipped(str(tmp_path / "own.parquet"), str(tmp_path / "flipped.parquet"), None, "A", "B",
                          CompareOptions(), tmp_path / "out")
    assert summary["rank_agreement"]["all"]["chi_model"]["spearman"] == pytest.approx(-1.0)
    assert summary["ranked_concepts"] == 6
    assert "Spearman of χ_model" in (tmp_path / "out" / "flipped.md").read_text()
    assert pl.read_csv(tmp_path / "out" / "flipped.csv").columns[:2] == ["concept", "label"]


# ---------------------------------------------------------------------------------------------------------
# Config: a flipped SAE needs another configured model of the same width


def flipped_config(tiny_model_dir, random_sae_dirs, entry: dict, second_source: dict | None = None) -> dict:
    from conftest import SHARED_BENCHMARKS

    sae = {"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}
    return {
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "layers": [sae]},
                   "other": {"source": second_source or {"path": str(tiny_model_dir)}, "layers": [sae]}},
        "benchmarks": {"gsm8k": {"adapter": "gsm8k", "data_dir": str(SHARED_BENCHMARKS / "gsm8k")}},
        "compare": {"flipped_sae": [entry]},
    }


def test_a_flipped_sae_between_models_of_one_width_is_accepted(tiny_model_dir, random_sae_dirs):
    from competency_gaps.config import validate_config

    config = validate_config(flipped_config(tiny_model_dir, random_sae_dirs, {"model": "other", "sae_of": {"model": "tiny", "layer": 1}}))
    assert config["compare"]["min_similarity"] == 0.5


@pytest.mark.parametrize("entry, message", [
    ({"model": "nobody", "sae_of": {"model": "tiny", "layer": 1}}, "compare.flipped_sae[0].model"),
    ({"model": "other", "sae_of": {"model": "tiny", "layer": 2}}, "layer 2 is not configured for model 'tiny'"),
    ({"model": "tiny", "sae_of": {"model": "tiny", "layer": 1}}, "another model's SAE"),
])
def test_a_flipped_sae_must_name_another_configured_model_and_layer(tiny_model_dir, random_sae_dirs, entry, message):
    from competency_gaps.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(flipped_config(tiny_model_dir, random_sae_dirs, entry))


def test_a_flipped_sae_across_widths_is_a_config_error(tiny_model_dir, random_sae_dirs, tmp_path):
    from competency_gaps.config import ConfigError, validate_config

    wider = json.loads((tiny_model_dir / "config.json").read_text()) | {"hidden_size": 48}
    (tmp_path / "config.json").write_text(json.dumps(wider))
    config = flipped_config(tiny_model_dir, random_sae_dirs, {"model": "other", "sae_of": {"model": "tiny", "layer": 1}},
                            second_source={"path": str(tmp_path)})
    config["models"]["other"]["layers"] = [{"layer": 1, "sae": {"train": {}}}]
    with pytest.raises(ConfigError, match=r"compare.flipped_sae\[0\].*32 wide.*48 wide.*same width"):
        validate_config(config)


def test_unit_profile_rows_keep_a_match_exact():
    """A concept identical on the shared items is matched with similarity 1 whatever the saliency scale."""
    shared = items("1", "2")
    a = saliency([("b", "1", 0, 0.001), ("b", "2", 0, 0.002)])
    b = saliency([("b", "1", 0, 10.0), ("b", "2", 0, 20.0)])
    pairs = match_concepts(a, b, shared, 1, 1, min_similarity=0.999)
    assert pairs.height == 1 and math.isclose(pairs["similarity"][0], 1.0, rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# The rules, end to end: two tiny models of one width, compared and flipped


@pytest.fixture(scope="module")
def second_tiny_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with its weights perturbed (seeded): another model of the same width and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-2")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_two_models_are_compared_and_the_flipped_sae_runs(tmp_path, tiny_model_dir, second_tiny_model_dir,
                                                          random_sae_dirs):
    from conftest import SHARED_BENCHMARKS
    from test_workflow import BENCHMARKS, planned_jobs, snakemake, tiny_corpus, write_config

    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip("../shared/benchmarks not present")
    config = {
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "batch_size": 4,
                            "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]},
                   "twin": {"source": {"path": str(second_tiny_model_dir)}, "batch_size": 4,
                            "layers": [{"layer": 2, "sae": {"path": str(random_sae_dirs[2])}}]}},
        "benchmarks": {name: BENCHMARKS[name] for name in ("social_iqa", "bbq")},
        **tiny_corpus(tmp_path),
        "gaps": {"min_benchmarks": 1, "min_support": 1, "n_bootstrap": 0},
        "robustness": {"n_resamples": 3, "n_permutations": 5},
        "compare": {"min_similarity": 0.0, "flipped_sae": [{"model": "twin", "sae_of": {"model": "tiny", "layer": 1}}]},
    }
    write_config(tmp_path, config)
    jobs = planned_jobs(tmp_path)
    assert jobs["compare_models"] == 1 and jobs["flipped_extract"] == 2 and jobs["flipped_sae"] == 1
    snakemake(tmp_path)
    pair = tmp_path / "results/compare/model_a=tiny/layer_a=1/model_b=twin/layer_b=2"
    summary = json.loads((pair / "cross_model.json").read_text())
    assert summary["shared_items"] == 8 and summary["matched_pairs"] > 0
    assert pl.read_csv(pair / "benchmarks.csv")["benchmark"].to_list() == ["bbq", "social_iqa", "all"]
    assert "# Cross-model comparison: tiny (layer 1) vs twin (layer 2)" in (pair / "cross_model.md").read_text()
    assert (pair / "cross_model.png").stat().st_size > 0
    flipped = tmp_path / "results/compare/flipped/model=twin/layer=1/sae_of=tiny"
    result = json.loads((flipped / "flipped.json").read_text())
    assert result["concepts_with_chi_model"]["own"] > 0 and result["concepts_with_chi_model"]["flipped"] > 0
    assert result["rank_agreement"]["all"]["chi_model"]["n"] > 0

    config["models"].pop("twin")
    config["compare"]["flipped_sae"] = []
    write_config(tmp_path, config)
    assert "compare_models" not in planned_jobs(tmp_path)  # one model: nothing to compare, nothing scheduled
