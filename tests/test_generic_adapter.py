"""The generic adapter: JSONL, CSV and Parquet files through prepare_benchmark, and its malformed-row reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from competency_gaps.benchmarks import get_adapter
from competency_gaps.prepare import BenchmarkDataError, PrepareReport, prepare_benchmark, read_items

MC_RECORDS = [
    {"qid": "q1", "text": "2 + 2 = ?", "options": ["3", "4", "5"], "label": 1, "topic": "math"},
    {"qid": "q2", "text": "Capital of France?", "options": ["Paris", "Rome"], "label": 0, "topic": "geo"},
    {"qid": "q3", "text": "Sky colour?", "options": ["green", "red", "blue"], "label": 2, "topic": "geo"},
]
MC_COLUMNS = {"id": "qid", "question": "text", "choices": "options", "gold_index": "label", "subset": "topic"}


def spec(tmp_path: Path, **options) -> dict:
    return {"adapter": "generic", "data_dir": str(tmp_path), "options": options, "limit": None, "seed": 0}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def check_mc(rows: list[dict]) -> None:
    assert [row["item_id"] for row in rows] == ["q1", "q2", "q3"]
    assert [row["choices"] for row in rows] == [r["options"] for r in MC_RECORDS]
    assert [row["gold_index"] for row in rows] == [1, 0, 2]
    assert [row["gold"] for row in rows] == ["4", "Paris", "blue"]
    assert [row["subset"] for row in rows] == ["math", "geo", "geo"]
    assert {row["scoring"] for row in rows} == {"mc_loglik"}
    prompt = "Answer the following question.\n\n2 + 2 = ?\nOptions:\nA. 3\nB. 4\nC. 5"
    assert rows[0]["messages"][-1]["content"] == prompt


def test_jsonl_multiple_choice(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    table, report = prepare_benchmark("mine", spec(tmp_path, file="mc.jsonl", columns=MC_COLUMNS,
                                                   scoring="mc_loglik", category="Reasoning"))
    rows = table.to_pylist()
    check_mc(rows)
    assert {row["category"] for row in rows} == {"Reasoning"} and {row["benchmark"] for row in rows} == {"mine"}
    assert report.rows_read == report.items_kept == 3
    assert json.loads(rows[2]["metadata"]) == {"file": "mc.jsonl", "line": 3}


def test_parquet_multiple_choice_absolute_path(tmp_path):
    path = tmp_path / "sub" / "mc.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(MC_RECORDS), path)
    # An absolute `file` is used as is; data_dir is only needed to exist.
    table, _ = prepare_benchmark("mine", spec(tmp_path, file=str(path), columns=MC_COLUMNS, scoring="mc_loglik"))
    rows = table.to_pylist()
    check_mc(rows)
    assert {row["category"] for row in rows} == {"Other"}


def test_csv_choices_as_json_and_generated_ids(tmp_path):
    write_csv(tmp_path / "mc.csv", ["text", "options", "answer"],
              [[r["text"], json.dumps(r["options"]), r["options"][r["label"]]] for r in MC_RECORDS])
    columns = {"question": "text", "choices": "options", "answer": "answer"}
    table, _ = prepare_benchmark("mine", spec(tmp_path, file="mc.csv", columns=columns, scoring="mc_loglik"))
    rows = table.to_pylist()
    # CSV line numbers count the header: the first data row is line 2.
    assert [row["item_id"] for row in rows] == ["generic-2", "generic-3", "generic-4"]
    assert [row["gold_index"] for row in rows] == [1, 0, 2]


def test_csv_generation_policies(tmp_path):
    write_csv(tmp_path / "qa.csv", ["id", "question", "answer", "letter"],
              [["a", "How many legs has a spider?", "8", "B"], ["b", "Is ice cold?", "yes", "A"]])
    table, _ = prepare_benchmark("qa", spec(tmp_path, file="qa.csv", columns={"id": "id", "answer": "answer"},
                                            scoring="numeric_match"))
    rows = table.to_pylist()
    assert [(row["item_id"], row["gold"], row["choices"]) for row in rows] == [("a", "8", None), ("b", "yes", None)]
    assert rows[0]["messages"][-1]["content"] == "Answer the following question.\n\nHow many legs has a spider?"
    table, _ = prepare_benchmark("qa", spec(tmp_path, file="qa.csv", columns={"answer": "letter"},
                                            scoring="option_letter"))
    assert [row["gold"] for row in table.to_pylist()] == ["B", "A"]


def test_jsonl_answer_list_and_numbers(tmp_path):
    write_jsonl(tmp_path / "nq.jsonl", [{"question": "Who?", "answer": ["Ada", "Ada Lovelace"]},
                                        {"question": "When?", "answer": 1843}])
    table, _ = prepare_benchmark("nq", spec(tmp_path, file="nq.jsonl", columns={"answer": "answer"},
                                            scoring="short_answer_match"))
    assert [row["gold"] for row in table.to_pylist()] == ['["Ada", "Ada Lovelace"]', "1843"]


def test_missing_required_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC_RECORDS[0], {**MC_RECORDS[1], "text": None},
                                                {k: v for k, v in MC_RECORDS[2].items() if k != "label"}])
    options = {"file": "bad.jsonl", "columns": MC_COLUMNS, "scoring": "mc_loglik"}
    with pytest.raises(BenchmarkDataError) as error:
        prepare_benchmark("mine", spec(tmp_path, **options))
    message = str(error.value)
    assert f"{path}, line 2, field 'text': missing" in message
    assert f"{path}, line 3, field 'label': missing" in message
    _, report = prepare_benchmark("mine", {**spec(tmp_path, **options), "malformed": "report"})
    assert report.items_kept == 1 and [(p.line, p.field) for p in report.malformed] == [(2, "text"), (3, "label")]


def test_malformed_csv_and_parquet_rows(tmp_path):
    write_csv(tmp_path / "bad.csv", ["question", "options", "label"],
              [["ok?", '["a", "b"]', "0"], ["", '["a", "b"]', "1"], ["x?", "not json", "0"], ["y?", '["a"]', "3"]])
    options = {"file": "bad.csv", "columns": {"question": "question", "choices": "options", "gold_index": "label"},
               "scoring": "mc_loglik"}
    _, report = prepare_benchmark("b", {**spec(tmp_path, **options), "malformed": "report"})
    problems = [(Path(p.file).name, p.line, p.field, p.reason.split(" ")[0]) for p in report.malformed]
    assert problems == [("bad.csv", 3, "question", "empty"), ("bad.csv", 4, "options", "expected"),
                        ("bad.csv", 5, "label", "gold")]
    pq.write_table(pa.Table.from_pylist([{"question": "q?", "answer": "x", "n": 1},
                                         {"question": None, "answer": "y", "n": 2}]), tmp_path / "bad.parquet")
    _, report = prepare_benchmark("p", {**spec(tmp_path, file="bad.parquet", columns={"answer": "answer"},
                                              scoring="short_answer_match"), "malformed": "report"})
    assert [(p.line, p.field, p.reason) for p in report.malformed] == [(2, "question", "missing")]
    report = PrepareReport()
    wrong = spec(tmp_path, file="bad.parquet", columns={"question": "n"}, scoring="none")
    assert read_items(get_adapter("generic", wrong["options"]), wrong, report) == []
    assert [(p.line, p.field, p.reason) for p in report.malformed] == [(1, "n", "expected str, got int"),
                                                                        (2, "n", "expected str, got int")]


def test_duplicate_ids_are_fatal(tmp_path):
    write_jsonl(tmp_path / "dup.jsonl", [MC_RECORDS[0], MC_RECORDS[0]])
    with pytest.raises(BenchmarkDataError, match="duplicate item id 'q1'"):
        prepare_benchmark("d", spec(tmp_path, file="dup.jsonl", columns=MC_COLUMNS, scoring="mc_loglik"))


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="'file'"):
        get_adapter("generic", {"scoring": "mc_loglik"})
    with pytest.raises(ValueError, match="'scoring'"):
        get_adapter("generic", {"file": "x.jsonl"})
    with pytest.raises(ValueError, match="category"):
        get_adapter("generic", {"file": "x.jsonl", "scoring": "none", "category": "Sports"})
    with pytest.raises(ValueError, match="role"):
        get_adapter("generic", {"file": "x.jsonl", "scoring": "none", "columns": {"prompt": "p"}})
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        prepare_benchmark("x", spec(tmp_path, file="absent.jsonl", scoring="none"))


def counted_pieces(row: dict) -> list[str]:
    """The characters of a prepared row that count as the item's own text, span by span."""
    return [row["messages"][s["message"]]["content"][s["start"]:s["end"]] for s in row["field_spans"]]


def test_option_letters_and_options_header_are_not_counted(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    table, _ = prepare_benchmark("mine", spec(tmp_path, file="mc.jsonl", columns=MC_COLUMNS, scoring="mc_loglik"))
    rows = table.to_pylist()
    check_mc(rows)  # the prompt text is unchanged
    for row, record in zip(rows, MC_RECORDS, strict=True):
        assert counted_pieces(row) == [record["text"], *record["options"]]


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as handle:  # Excel's "CSV UTF-8" writes a BOM
        writer = csv.writer(handle)
        writer.writerow(["qid", "text", "options", "label"])
        writer.writerows([[r["qid"], r["text"], json.dumps(r["options"]), r["label"]] for r in MC_RECORDS])
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    columns = {"id": "qid", "question": "text", "choices": "options", "gold_index": "label"}
    table, report = prepare_benchmark("bom", spec(tmp_path, file="bom.csv", columns=columns, scoring="mc_loglik"))
    assert report.malformed == []
    assert [row["item_id"] for row in table.to_pylist()] == ["q1", "q2", "q3"]


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in MC_RECORDS), encoding="utf-8-sig")
    columns = {"id": "qid", "question": "text", "choices": "options", "gold_index": "label"}
    table, report = prepare_benchmark("bom", spec(tmp_path, file="bom.jsonl", columns=columns, scoring="mc_loglik"))
    assert report.malformed == []
    assert [row["item_id"] for row in table.to_pylist()] == ["q1", "q2", "q3"]
