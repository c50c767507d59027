"""Saliency extraction: the per-item token table, and items that cannot be extracted are skipped, not fatal."""

from __future__ import annotations

import logging

import pytest

from competency_gaps.extract import extract_saliency
from competency_gaps.prompts import encode_item
from competency_gaps.templates import render_prompt

TEMPLATE = {"user": "Answer the question.\n\nQuestion: {question}\nAnswer briefly."}


def make_item(item_id: str, question: str) -> dict:
    prompt = render_prompt(TEMPLATE, {"question": question})
    return {"item_id": item_id, "messages": prompt.messages,
            "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans]}


@pytest.fixture(scope="module")
def sae(random_sae_dirs):
    from competency_gaps.sae import load_sae

    return load_sae(random_sae_dirs[1])


def extract(tiny_model, sae, items: list[dict], max_length: int = 512, context_policy: str = "truncate"):
    model, tokenizer = tiny_model
    return extract_saliency(model, tokenizer, sae, 1, items, mode="fields", system_prompt=None, max_length=max_length,
                            context_policy=context_policy, batch_tokens=64)


def test_items_without_counted_tokens_are_skipped_and_reported(tiny_model, sae, caplog):
    masked_out = {**make_item("masked", "How many apples?"), "field_spans": []}
    items = [make_item("good-1", "How many apples does Janet have?"), make_item("blank", "   "), masked_out,
             make_item("empty", ""), make_item("good-2", "Who was incompetent?")]
    with caplog.at_level(logging.WARNING, logger="competency_gaps.extract"):
        saliency, tokens = extract(tiny_model, sae, items)
    rows = {row["item_id"]: row for row in tokens.to_dicts()}
    assert list(rows) == ["good-1", "blank", "masked", "empty", "good-2"]  # one row per item, in item order
    for item_id in ("blank", "masked", "empty"):
        assert rows[item_id]["skipped"] == "no_counted_tokens"
        assert rows[item_id]["counted_tokens"] == 0 and rows[item_id]["read_tokens"] == 0
        assert rows[item_id]["total_tokens"] > 0
        assert any(item_id in r.getMessage() and "no_counted_tokens" in r.getMessage() for r in caplog.records)
    for item_id in ("good-1", "good-2"):
        assert rows[item_id]["skipped"] is None and rows[item_id]["counted_tokens"] > 0
        assert rows[item_id]["read_tokens"] == rows[item_id]["total_tokens"]
    assert set(saliency["item_id"].to_list()) == {"good-1", "good-2"}


def test_too_long_item_is_skipped_under_the_skip_policy(tiny_model, sae, caplog):
    _, tokenizer = tiny_model
    short, long = make_item("short", "How many?"), make_item("long", "Janet has 3 apples and buys 5 more. " * 8)
    max_length = len(encode_item(tokenizer, short).input_ids)
    with caplog.at_level(logging.WARNING, logger="competency_gaps.extract"):
        saliency, tokens = extract(tiny_model, sae, [short, long], max_length=max_length, context_policy="skip")
    rows = {row["item_id"]: row for row in tokens.to_dicts()}
    assert rows["long"] == {"item_id": "long", "counted_tokens": 0, "read_tokens": 0, "truncated": True,
                            "skipped": "too_long", "total_tokens": len(encode_item(tokenizer, long).input_ids)}
    assert rows["short"]["skipped"] is None and rows["short"]["read_tokens"] == max_length
    assert set(saliency["item_id"].to_list()) == {"short"}
    assert any("long" in r.getMessage() and "too_long" in r.getMessage() for r in caplog.records)


def test_truncated_item_records_its_untruncated_length(tiny_model, sae):
    _, tokenizer = tiny_model
    long = make_item("long", "Janet has 3 apples and buys 5 more. " * 8 + "How many apples does Janet have?")
    full = encode_item(tokenizer, long)
    max_length = full.counted.index(True) + full.counted[::-1].index(True) + 5
    _, tokens = extract(tiny_model, sae, [long], max_length=max_length)
    row = tokens.row(0, named=True)
    assert row["total_tokens"] == len(full.input_ids) and row["read_tokens"] == max_length
    assert row["truncated"] and row["skipped"] is None and row["counted_tokens"] == 5


def test_length_batches_bound_padded_tokens_and_keep_every_item():
    from competency_gaps.saliency import length_batches

    lengths = [120, 30, 90, 30, 500, 31, 29]
    batches = length_batches(lengths, max_tokens=128)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 128 or len(batch) == 1  # only a prompt longer than the budget goes over, alone
    assert [4] in batches


def test_saliency_does_not_depend_on_the_token_budget(tiny_model, sae):
    model, tokenizer = tiny_model
    items = [make_item(f"q{i}", "Janet has 3 apples. " * (i + 1)) for i in range(5)]
    results = [extract_saliency(model, tokenizer, sae, 1, items, mode="fields", system_prompt=None, max_length=512,
                                context_policy="truncate", batch_tokens=budget)[0] for budget in (16, 100_000)]
    assert results[0].height > 0
    assert results[0].select("item_id", "concept", "active_tokens").equals(results[1].select("item_id", "concept", "active_tokens"))
    for column in ("saliency", "max_activation"):
        assert (results[0][column] - results[1][column]).abs().max() < 1e-4


def test_shard_rows_come_out_by_item_id_then_concept_whatever_the_batch_order():
    import polars as pl
    import torch

    from competency_gaps.extract import ShardRows
    from competency_gaps.saliency import SparseSaliency
    from competency_gaps.tables import SALIENCY

    def batch(rows: list[int], concepts: list[int]) -> SparseSaliency:
        n = len(rows)
        return SparseSaliency(row=torch.tensor(rows), concept=torch.tensor(concepts),
                              saliency=torch.arange(1, n + 1, dtype=torch.float32), max_activation=torch.ones(n),
                              active_tokens=torch.ones(n, dtype=torch.int32), counted_tokens=torch.ones(2))

    # Item positions 0..3; their ids sort in another order than the positions (and "é" after ASCII, as polars sorts).
    ids = ["b-2", "é-1", "a-10", "a-9"]
    shard = ShardRows()
    shard.add([3, 0], batch([1, 0, 1], [7, 5, 2]))  # b-2 (row 1): concepts 7 and 2; a-9 (row 0): concept 5
    shard.add([1, 2], batch([0, 1, 1], [4, 9, 3]))  # é-1: 4; a-10: 9 and 3
    table = shard.table(ids)
    assert table.schema == SALIENCY
    expected = (pl.DataFrame({"item_id": ["b-2", "a-9", "b-2", "é-1", "a-10", "a-10"], "concept": [7, 5, 2, 4, 9, 3],
                              "saliency": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]}).sort("item_id", "concept"))
    got = pl.from_arrow(table)
    assert got.select("item_id", "concept").equals(expected.select("item_id", "concept").cast({"concept": pl.Int32}))
    assert got["saliency"].to_list() == expected["saliency"].to_list()  # each value stays with its (item, concept)
    assert ShardRows().table(ids).num_rows == 0
