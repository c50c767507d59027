"""The labels stage on a tiny random model and SAE: contexts from extraction and the corpus, the logit lens,
a label for every live concept, detection scores, cards."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pytest
import torch

from competency_gaps.concept_labels import (
    TokenText,
    collect_corpus_contexts,
    context_frame,
    read_negative_pool,
    run_corpus_contexts,
    run_labels,
    unembedding_and_norm,
)
from competency_gaps.extract import run_extract
from competency_gaps.templates import render_prompt

TEMPLATE = {"user": "Answer the question.\n\nQuestion: {question}\nAnswer briefly."}
QUESTIONS = ["How many apples does Janet have?", "Who was incompetent?", "What will Tracy want to do next?",
             "Janet has 3 apples and buys 5 more.", "The doctor and the nurse walked in."]
SPEC = {"top_k": 3, "before": 2, "after": 1, "corpus_tokens": 200, "n_detection": 2, "negative_pool": 5,
        "n_tokens": 3, "seed": 0, "llm": None}


@pytest.fixture(scope="module")
def labelled(tiny_model, random_sae_dirs, tmp_path_factory):
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    folder = tmp_path_factory.mktemp("labels")
    items = []
    for i, question in enumerate(QUESTIONS):
        prompt = render_prompt(TEMPLATE, {"question": question})
        items.append({"item_id": f"q-{i}", "messages": prompt.messages,
                      "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans]})
    pl.DataFrame(items).write_parquet(folder / "items.parquet")
    shard = folder / "benchmark=quiz"
    run_extract(model, tokenizer, sae, 1, str(folder / "items.parquet"), None, str(shard / "saliency.parquet"),
                str(shard / "item_tokens.parquet"), str(shard / "contexts.parquet"),
                {"max_length": 512, "system_prompt": None}, {"context_policy": "truncate"},
                {"tokens": "fields", "include_response": False}, SPEC, "quiz", batch_tokens=64)
    pl.DataFrame({"text": [" ".join(QUESTIONS * 3)] * 4}).write_parquet(folder / "corpus.parquet")
    out = folder / "out"
    spec = {"labels": SPEC, "neuronpedia": None, "layer": 1, "context_length": 16}
    corpus = folder / "corpus_contexts"
    run_corpus_contexts(model, tokenizer, sae, 1, str(folder / "corpus.parquet"), spec, corpus / "contexts.parquet",
                        corpus / "negative_pool.safetensors", batch_tokens=64)
    run_labels(model, tokenizer, sae, corpus / "contexts.parquet", corpus / "negative_pool.safetensors",
               [str(shard / "contexts.parquet")], spec, out, "cards")
    return model, sae, shard, out


def test_the_corpus_pass_saves_what_it_collected(labelled, tiny_model):
    """The corpus_contexts job's files hold the corpus pass exactly: the labels job reads back the same top
    contexts, sample and negative pool that one job holding it all in memory would use."""
    model, sae, _, out = labelled
    _, tokenizer = tiny_model
    corpus = out.parent / "corpus_contexts"
    spec = {"labels": SPEC, "context_length": 16}
    collected = collect_corpus_contexts(model, tokenizer, sae, 1, str(out.parent / "corpus.parquet"), spec, 64)
    text = TokenText(tokenizer)
    saved = pl.read_parquet(corpus / "contexts.parquet")
    for kind, contexts in (("top", collected.top), ("sample", collected.sample)):
        assert saved.filter(pl.col("kind") == kind).equals(context_frame(contexts.result(), kind, "corpus", None, text))
    pool, restored = collected.pool.result(), read_negative_pool(corpus / "negative_pool.safetensors", SPEC).result()
    assert pool.keys() == restored.keys() and len(pool["seq"]) > 0
    for name in pool:
        assert torch.equal(pool[name], restored[name]), name


def test_extraction_writes_each_concepts_top_contexts(labelled):
    _, _, shard, _ = labelled
    contexts = pl.read_parquet(shard / "contexts.parquet")
    saliency = pl.read_parquet(shard / "saliency.parquet")
    assert contexts.height > 0 and set(contexts["source"]) == {"quiz"}
    assert contexts.group_by("concept").len()["len"].max() <= SPEC["top_k"]
    assert contexts.group_by("concept", "item_id").len()["len"].max() == 1  # one context per item
    for row in contexts.iter_rows(named=True):
        assert len(row["token_ids"]) == len(row["activations"]) == SPEC["before"] + 1 + SPEC["after"]
        assert row["activations"][row["peak_index"]] == pytest.approx(row["activation"])
        # the peak is the item's strongest token for that concept: its saliency row's max_activation
        peak = saliency.filter((pl.col("item_id") == row["item_id"]) & (pl.col("concept") == row["concept"]))
        assert peak["max_activation"][0] == pytest.approx(row["activation"], rel=1e-5)


def test_every_live_concept_has_a_heuristic_label_and_a_score(labelled):
    _, sae, _, out = labelled
    labels = pl.read_parquet(out / "labels.parquet")
    contexts = pl.read_parquet(out / "contexts.parquet")
    assert labels.height == sae.cfg.d_sae
    live = labels.filter("live")
    assert live.height == contexts.filter(pl.col("kind") == "top")["concept"].n_unique() > 0
    assert live["label"].null_count() == 0 and set(live["label_source"]) == {"heuristic"}
    assert labels.filter(~pl.col("live"))["label"].null_count() == labels.height - live.height
    scores = [s for s in live["detection_score"].to_list() if not math.isnan(s)]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert set(contexts["source"]) == {"corpus", "quiz"} and set(contexts["kind"]) == {"top", "sample"}
    quality = json.loads((out / "label_quality.json").read_text())
    assert quality["live"] == live.height and quality["by_source"]["heuristic"]["concepts"] == live.height
    cards = (out / "concept_cards.md").read_text()
    first = live.row(0, named=True)
    assert f"#{first['concept']} " in cards


def test_promoted_tokens_follow_the_logit_lens_through_the_final_norm(labelled, tiny_model):
    model, sae, _, out = labelled
    _, tokenizer = tiny_model
    text = TokenText(tokenizer)
    W_U, norm = unembedding_and_norm(model)
    assert norm is model.model.norm
    labels = pl.read_parquet(out / "labels.parquet")
    for concept in (0, 5, 17):
        with torch.no_grad():
            logits = norm(sae.W_dec[concept][None]) @ W_U.T
        expected = [text(i) for i in logits[0].topk(SPEC["n_tokens"]).indices.tolist()]  # as every token reads
        assert labels.filter(pl.col("concept") == concept)["promoted_tokens"][0].to_list() == expected


def test_card_contexts_bold_active_tokens_and_stay_inert():
    from competency_gaps.concept_labels import _highlighted

    text = _highlighted([" a", " middle", "-", "aged", "<script>", "|", "\n"], [0.0, 9.4, 0.0, 13.0, 2.0, 0.0, 1.0])
    assert text == " a **middle**[9.4]-**aged**[13]**\\<script\\>**[2]\\|**⏎**[1]"
    assert "** " not in text  # bold that opens on a space does not render


def test_cards_show_labels_and_tokens_inert(labelled):
    from competency_gaps.concept_labels import concept_cards

    _, _, _, out = labelled
    labels = pl.read_parquet(out / "labels.parquet").filter("live").head(1).with_columns(
        label=pl.lit("<img src=x onerror=alert(1)> | x"), firing_tokens=pl.lit(["<script>"]))
    cards = concept_cards(labels, pl.read_parquet(out / "contexts.parquet").filter(pl.col("kind") == "top"), "t")
    ours = re.sub(r'<a id="concept-\d+"></a>', "", cards)  # the cards' own anchors are the only raw HTML
    assert re.search(r"(?<!\\)<", ours) is None
    assert "\\<img src=x onerror=alert(1)\\> \\| x" in cards and "\\<script\\>" in cards


def test_neuronpedia_explanations_replace_the_heuristic_labels(labelled, tmp_path):
    from competency_gaps.concept_labels import with_neuronpedia

    _, _, _, out = labelled
    labels = pl.read_parquet(out / "labels.parquet")
    live = labels.filter("live")["concept"].to_list()
    export = tmp_path / "explanations.json"
    export.write_text(json.dumps([{"modelId": "tiny", "layer": "1-res", "index": str(live[0]), "description": "apples and pears",
                                   "explanationModelName": "gpt-x", "typeName": "oai_token-act-pair"}]))
    relabelled = with_neuronpedia(labels, {"path": str(export), "model_id": "tiny", "layer": "1-res"})
    first = relabelled.filter(pl.col("concept") == live[0]).row(0, named=True)
    assert first["label"] == "apples and pears" and first["label_source"] == "neuronpedia"
    assert math.isnan(first["detection_score"]) and first["detection_judge"] is None  # no judge has read it
    assert relabelled.filter(pl.col("concept") == live[1])["label_source"][0] == "heuristic"
    assert relabelled.schema == labels.schema


def test_an_llm_labeller_labels_and_judges_every_live_concept(labelled, tiny_model, tiny_model_dir, tmp_path):
    """The transformers backend on the tiny model: its answers are nonsense, but every live concept goes through
    the explainer and the judge, and the answers land in the cache (a rerun asks nothing)."""
    from competency_gaps.concept_labels import with_llm
    from competency_gaps.labellers import read_cache

    model, sae, _, out = labelled
    labels = pl.read_parquet(out / "labels.parquet").head(24)
    contexts = pl.read_parquet(out / "contexts.parquet")
    top = contexts.filter((pl.col("kind") == "top") & pl.col("concept").is_in(labels["concept"].to_list()))
    live = labels.filter("live")["concept"].to_list()
    sets = {c: ([["a", " b"], ["c"]], [True, False]) for c in live}
    llm = {"backend": "transformers", "model": str(tiny_model_dir), "max_new_tokens": 4, "device": "cpu", "n_examples": 3}
    cache = tmp_path / "cache.jsonl"
    relabelled = with_llm(labels, top, sets, llm, str(cache))
    assert set(relabelled.filter("live")["label_source"]) == {"llm"}
    assert set(relabelled.filter("live")["detection_judge"]) == {"llm"}
    assert relabelled.filter(~pl.col("live"))["label"].null_count() == labels.height - len(live)
    asked = len(read_cache(cache))
    assert asked >= len(live)  # one explanation per live concept, plus the judge's prompts
    with_llm(labels, top, sets, llm, str(cache))
    assert len(read_cache(cache)) == asked


def test_a_context_frame_row_holds_its_own_window(tiny_model):
    from competency_gaps.tables import CONTEXTS

    _, tokenizer = tiny_model
    text = TokenText(tokenizer)
    result = {"concept": torch.tensor([4, 4, 9]), "rank": torch.tensor([0, 1, 0]), "seq": torch.tensor([1, 0, 1]),
              "pos": torch.tensor([5, 2, 7]), "activation": torch.tensor([2.5, 1.0, 0.5]),
              "window_tokens": torch.tensor([[-1, 10, 11], [12, 10, -1], [13, 14, 15]]),
              "window_acts": torch.tensor([[0.0, 2.5, 0.1], [0.3, 1.0, 0.0], [0.2, 0.5, 0.4]]), "peak_index": 1}
    frame = context_frame(result, "top", "quiz", ["item-a", "item-b"], text)
    assert frame.schema == pl.Schema(pl.from_arrow(CONTEXTS.empty_table()).schema)
    rows = frame.to_dicts()
    assert [row["item_id"] for row in rows] == ["item-b", "item-a", "item-b"]
    assert [row["token_ids"] for row in rows] == result["window_tokens"].tolist()
    assert [row["tokens"] for row in rows] == [[text(t) for t in window] for window in result["window_tokens"].tolist()]
    assert rows[0]["tokens"][0] == "" and rows[1]["tokens"][1] == rows[0]["tokens"][1]  # -1: no token; ids decode alike
    assert [row["activations"] for row in rows] == result["window_acts"].tolist()  # float32 both ways: exact
    assert [(row["concept"], row["rank"], row["sequence"], row["position"], row["peak_index"]) for row in rows] == [
        (4, 0, 1, 5, 1), (4, 1, 0, 2, 1), (9, 0, 1, 7, 1)]
    corpus = context_frame(result, "sample", "corpus", None, text)
    assert corpus["item_id"].null_count() == 3 and set(corpus["kind"]) == {"sample"}
    assert context_frame({name: value[:0] if torch.is_tensor(value) else value for name, value in result.items()},
                         "top", "corpus", None, text).height == 0
