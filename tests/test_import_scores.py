"""Imported per-item scores: plain tables and lm-evaluation-harness sample logs, joined to prepared items."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest

from competency_gaps.import_scores import ImportScoresError, from_lm_eval_samples, from_table, import_scores
from competency_gaps.prepare import prepare_benchmark
from competency_gaps.tables import SCORES

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "30"),
    ("Sara reads 12 pages a day. How many pages does she read in 3 days?", "36"),
]


@pytest.fixture()
def gsm8k_items(tmp_path) -> pl.DataFrame:
    """Three GSM8K-style items (ids gsm8k-00000..00002, by 0-based line), prepared as the pipeline does."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    lines = [json.dumps({"question": q, "answer": f"Work.\n#### {a}"}) for q, a in QUESTIONS]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table, _ = prepare_benchmark("gsm8k", {"adapter": "gsm8k", "data_dir": str(data), "limit": None, "seed": 0})
    return pl.from_arrow(table)


def lm_eval_sample(doc_id: int, question: str, answer: str, response: str, score: float,
                   filter_name: str = "strict-match") -> dict:
    """One line of lm-eval's samples_gsm8k_<timestamp>.jsonl (generate_until task)."""
    return {
        "doc_id": doc_id,
        "doc": {"question": question, "answer": f"Work.\n#### {answer}"},
        "target": f"Work.\n#### {answer}",
        "arguments": {"gen_args_0": {"arg_0": f"Question: {question}\nAnswer:", "arg_1": {"until": ["Question:"]}}},
        "resps": [[response]],
        "filtered_resps": [response.rsplit(" ", 1)[-1]],
        "filter": filter_name,
        "metrics": ["exact_match"],
        "doc_hash": "0" * 64,
        "prompt_hash": "1" * 64,
        "target_hash": "2" * 64,
        "exact_match": score,
    }


def write_samples(path: Path, samples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return path


RESPONSES = [("He has 7", 1.0), ("There are 35", 0.0), ("She reads 36", 1.0)]


def three_samples(filter_name: str = "strict-match", doc_ids=(0, 1, 2)) -> list[dict]:
    return [lm_eval_sample(doc_id, q, a, r, s, filter_name)
            for doc_id, (q, a), (r, s) in zip(doc_ids, QUESTIONS, RESPONSES)]


def test_lm_eval_by_doc_id(tmp_path, gsm8k_items):
    path = write_samples(tmp_path / "samples_gsm8k_2024-06-01T12-00-00.jsonl", three_samples())
    scores = from_lm_eval_samples(path, gsm8k_items, metric="exact_match")
    assert scores.columns == SCORES.names
    assert scores["item_id"].to_list() == ["gsm8k-00000", "gsm8k-00001", "gsm8k-00002"]
    assert scores["score"].to_list() == [1.0, 0.0, 1.0]
    assert scores["prediction"].to_list() == ["['7']", "['35']", "['36']"]
    assert scores["response"].to_list() == ["He has 7", "There are 35", "She reads 36"]
    assert scores["scoring"].to_list() == ["numeric_match"] * 3
    # An explicit prefix or doc_id map gives the same join.
    assert from_lm_eval_samples(path, gsm8k_items, metric="exact_match", prefix="gsm8k-").equals(scores)
    mapped = from_lm_eval_samples(path, gsm8k_items, metric="exact_match",
                                  doc_id_map={0: "gsm8k-00002", 1: "gsm8k-00001", 2: "gsm8k-00000"})
    assert mapped["score"].to_list() == [1.0, 0.0, 1.0][::-1]


def test_lm_eval_by_field(tmp_path, gsm8k_items):
    # lm-eval's doc order differs from ours: only the question text ties a doc to an item.
    samples = three_samples(doc_ids=(7, 8, 9))[::-1]
    path = write_samples(tmp_path / "samples_gsm8k.jsonl", samples)
    scores = from_lm_eval_samples(path, gsm8k_items, metric="exact_match", match="field", doc_field="question")
    assert dict(zip(scores["item_id"], scores["score"])) == {"gsm8k-00000": 1.0, "gsm8k-00001": 0.0,
                                                             "gsm8k-00002": 1.0}


def test_lm_eval_filters(tmp_path, gsm8k_items):
    flexible = [{**s, "exact_match": 1.0} for s in three_samples("flexible-extract")]
    path = write_samples(tmp_path / "samples_gsm8k.jsonl", three_samples() + flexible)
    with pytest.raises(ImportScoresError, match="flexible-extract, strict-match.*filter_name"):
        from_lm_eval_samples(path, gsm8k_items, metric="exact_match")
    strict = from_lm_eval_samples(path, gsm8k_items, metric="exact_match", filter_name="strict-match")
    assert strict["score"].to_list() == [1.0, 0.0, 1.0]
    loose = from_lm_eval_samples(path, gsm8k_items, metric="exact_match", filter_name="flexible-extract")
    assert loose["score"].to_list() == [1.0, 1.0, 1.0]


def test_lm_eval_missing_and_extra_docs(tmp_path, gsm8k_items, caplog):
    samples = three_samples()
    extra = lm_eval_sample(40, "Unrelated?", "1", "1", 1.0)
    path = write_samples(tmp_path / "samples_gsm8k.jsonl", [samples[0], samples[2], extra])
    with pytest.raises(ImportScoresError) as error:
        from_lm_eval_samples(path, gsm8k_items, metric="exact_match")
    assert str(path) in str(error.value) and "'gsm8k-00001'" in str(error.value) and "1 of 3" in str(error.value)
    with caplog.at_level(logging.WARNING):
        scores = from_lm_eval_samples(path, gsm8k_items, metric="exact_match", missing="null")
    assert scores["score"].to_list() == [1.0, None, 1.0]
    assert "1 scored id(s) are not among the 3 items" in caplog.text


def test_lm_eval_bad_metric_values(tmp_path, gsm8k_items):
    samples = three_samples()
    samples[1]["exact_match"] = 2.0
    path = write_samples(tmp_path / "samples_gsm8k.jsonl", samples)
    with pytest.raises(ImportScoresError) as error:
        from_lm_eval_samples(path, gsm8k_items, metric="exact_match")
    assert str(error.value) == f"{path}, line 2, doc_id 1, item 'gsm8k-00001': score 2.0 is outside [0, 1]"
    samples[1]["exact_match"] = "high"
    write_samples(path, samples)
    with pytest.raises(ImportScoresError, match="item 'gsm8k-00001': score 'high' is not a number"):
        from_lm_eval_samples(path, gsm8k_items, metric="exact_match")
    with pytest.raises(ImportScoresError, match="line 1, doc_id 0, item 'gsm8k-00000': no metric 'acc'"):
        from_lm_eval_samples(path, gsm8k_items)  # default metric acc: not in a generation task's samples


def test_lm_eval_multiple_choice_logprobs(tmp_path):
    data = tmp_path / "mc"
    data.mkdir()
    records = [{"id": f"siqa-{i:05d}", "q": f"Question {i}?", "c": ["a", "b", "c"], "g": i % 3} for i in range(3)]
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    options = {"file": "mc.jsonl", "scoring": "mc_loglik", "columns": {"id": "id", "question": "q", "choices": "c",
                                                                     "gold_index": "g"}}
    table, _ = prepare_benchmark("siqa", {"adapter": "generic", "data_dir": str(data), "options": options,
                                          "limit": None, "seed": 0})
    items = pl.from_arrow(table)
    samples = []
    for doc_id in range(3):
        logliks = [["-1.5", "False"], ["-0.5", "True"], ["-3.25", "False"]]
        samples.append({"doc_id": doc_id, "doc": {"question": f"Question {doc_id}?"}, "target": doc_id % 3,
                        "arguments": {}, "resps": [[pair] for pair in logliks], "filtered_resps": logliks,
                        "acc": float(doc_id % 3 == 1), "acc_norm": 1.0})
    path = write_samples(tmp_path / "samples_siqa.jsonl", samples)
    scores = from_lm_eval_samples(path, items)  # prefix "siqa-" inferred from the item ids
    assert scores["score"].to_list() == [0.0, 1.0, 0.0]
    assert scores["choice_logprobs"].to_list() == [[-1.5, -0.5, -3.25]] * 3
    assert scores["response"].to_list() == [None] * 3
    assert scores["scoring"].to_list() == ["mc_loglik"] * 3
    assert from_lm_eval_samples(path, items, metric="acc_norm")["score"].to_list() == [1.0] * 3


# --- plain tables ------------------------------------------------------------------------------


def test_table_csv(tmp_path, gsm8k_items, caplog):
    path = tmp_path / "scores.csv"
    path.write_text("item_id,score,prediction\ngsm8k-00002,0.25,36\ngsm8k-00000,1,7\nother-1,0.5,\n"
                    "gsm8k-00001,0,35\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        scores = from_table(path, gsm8k_items)
    assert scores.columns == SCORES.names
    assert scores["item_id"].to_list() == ["gsm8k-00000", "gsm8k-00001", "gsm8k-00002"]
    assert scores["score"].to_list() == [1.0, 0.0, 0.25]
    assert scores["prediction"].to_list() == ["7", "35", "36"]
    assert "1 scored id(s) are not among the 3 items" in caplog.text


def test_table_renamed_columns_parquet_and_jsonl(tmp_path, gsm8k_items):
    rows = [{"id": f"gsm8k-{i:05d}", "p": p} for i, p in enumerate([0.5, 1.0, 0.0])]
    pl.DataFrame(rows).write_parquet(tmp_path / "s.parquet")
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name in ("s.parquet", "s.jsonl"):
        scores = from_table(tmp_path / name, gsm8k_items, id_column="id", score_column="p")
        assert scores["score"].to_list() == [0.5, 1.0, 0.0]
    spec = {"table": str(tmp_path / "s.jsonl"), "id_column": "id", "score_column": "p"}
    assert import_scores(spec, gsm8k_items)["score"].to_list() == [0.5, 1.0, 0.0]


def test_table_errors(tmp_path, gsm8k_items):
    path = tmp_path / "scores.csv"
    path.write_text("item_id,score\ngsm8k-00000,1\ngsm8k-00001,1.5\ngsm8k-00002,0\n", encoding="utf-8")
    with pytest.raises(ImportScoresError) as error:
        from_table(path, gsm8k_items)
    assert str(error.value) == f"{path}, line 3, item 'gsm8k-00001': score 1.5 is outside [0, 1]"
    path.write_text("item_id,score\ngsm8k-00000,yes\n", encoding="utf-8")
    with pytest.raises(ImportScoresError, match=r"line 2, item 'gsm8k-00000': score 'yes' is not a number"):
        from_table(path, gsm8k_items)
    path.write_text("item_id,score\ngsm8k-00000,1\ngsm8k-00000,0\n", encoding="utf-8")
    with pytest.raises(ImportScoresError, match="line 3, item 'gsm8k-00000': item id appears twice"):
        from_table(path, gsm8k_items)
    path.write_text("item_id,score\ngsm8k-00001,1\n", encoding="utf-8")
    with pytest.raises(ImportScoresError) as error:
        from_table(path, gsm8k_items)
    assert f"{path}: no score for 2 of 3 items: 'gsm8k-00000', 'gsm8k-00002'" in str(error.value)
    assert from_table(path, gsm8k_items, missing="null")["score"].to_list() == [None, 1.0, None]
    with pytest.raises(ImportScoresError, match="needs columns 'item_id' and 'p'"):
        from_table(path, gsm8k_items, score_column="p")
