"""Hostile benchmark files through the generic adapter and prepare_benchmark (property-based, hypothesis).

Every row either becomes an item or is a counted rejection naming its file and line; `malformed: fail` stops
the prepare job (the first job of a benchmark, before any model work) listing them; nothing crashes without
saying where. BAD_INPUT_TALLY counts the cases tried, by kind and outcome (printed with `pytest -s`).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from competency_gaps.prepare import BenchmarkDataError, prepare_benchmark

from conftest import tally_printer

BAD_INPUT_TALLY: Counter = Counter()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
COLUMNS = {"id": "id", "question": "question", "answer": "answer"}
# Text that survives strip() as a non-empty field: any Unicode (control characters included) around a letter.
TEXT = st.builds(lambda before, after: f"{before}q{after}", st.text(max_size=30), st.text(max_size=30))


print_tally = tally_printer("bad-input", BAD_INPUT_TALLY)


def generic_spec(folder: Path, file: str, malformed: str = "report") -> dict:
    return {"adapter": "generic", "data_dir": str(folder), "limit": None, "seed": 0, "malformed": malformed,
            "options": {"file": file, "scoring": "numeric_match", "columns": COLUMNS}}


# ---------------------------------------------------------------- JSONL, line by line

def good_line(uid: str, question: str, answer: str) -> bytes:
    return json.dumps({"id": uid, "question": question, "answer": answer}).encode()


def jsonl_line(kind: str, uid: str, text: str) -> bytes:
    """One line of `kind`: the good kinds become items, every other kind must be rejected."""
    record = {"id": uid, "question": text, "answer": "42"}
    return {
        "good": lambda: good_line(uid, text, "42"),
        "good_100k_chars": lambda: good_line(uid, (text + " ") * (100_000 // (len(text) + 1) + 1), "7"),
        "good_escaped_control_characters": lambda: good_line(uid, f"a\x00b\x1b[31m{text}\x7f\u2028", "1"),
        "invalid_json": lambda: json.dumps(record).encode()[:-2],
        "not_an_object": lambda: json.dumps([uid, text]).encode(),
        "latin1_bytes": lambda: json.dumps({**record, "question": f"café {text}"}, ensure_ascii=False).encode("latin-1", "replace"),
        "raw_control_character": lambda: json.dumps({**record, "question": "@@"}).encode().replace(b"@@", b"a\x01b"),
        "bom_inside_the_file": lambda: b"\xef\xbb\xbf" + json.dumps(record).encode(),
        "lone_surrogate_escape": lambda: json.dumps({**record, "question": "@@"}).encode().replace(b"@@", b"\\ud800x"),
        "missing_question": lambda: json.dumps({"id": uid, "answer": "1"}).encode(),
        "empty_question": lambda: json.dumps({**record, "question": " \t "}).encode(),
        "question_not_text": lambda: json.dumps({**record, "question": [text]}).encode(),
        "missing_gold_answer": lambda: json.dumps({"id": uid, "question": text}).encode(),
        "empty_gold_answer": lambda: json.dumps({**record, "answer": ""}).encode(),
        "null_gold_answer": lambda: json.dumps({**record, "answer": None}).encode(),
        "id_not_text": lambda: json.dumps({**record, "id": {"nested": uid}}).encode(),
    }[kind]()


GOOD_KINDS = ("good", "good_100k_chars", "good_escaped_control_characters")
BAD_KINDS = ("invalid_json", "not_an_object", "latin1_bytes", "raw_control_character", "bom_inside_the_file",
             "lone_surrogate_escape", "missing_question", "empty_question", "question_not_text", "missing_gold_answer",
             "empty_gold_answer", "null_gold_answer", "id_not_text")
LINES = st.lists(st.tuples(st.sampled_from(GOOD_KINDS + BAD_KINDS), TEXT), min_size=1, max_size=12)


@given(lines=LINES, leading_bom=st.booleans(), blank_every=st.integers(0, 4))
@SETTINGS
def test_every_jsonl_line_is_an_item_or_a_counted_rejection(tmp_path_factory, lines, leading_bom, blank_every):
    folder = tmp_path_factory.mktemp("jsonl")
    lines = [("good", "anchor"), *lines]  # at least one item, so `report` never ends with an empty benchmark
    content, expected_items, expected_rejected, number = [], [], [], 0
    for index, (kind, text) in enumerate(lines):
        if blank_every and index % blank_every == 0:
            content.append(b"   ")  # blank lines are no rows
            number += 1
        number += 1
        uid = f"item-{index}"
        content.append(jsonl_line(kind, uid, text))
        (expected_items if kind in GOOD_KINDS else expected_rejected).append(uid if kind in GOOD_KINDS else number)
    path = folder / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if leading_bom else b"") + b"\n".join(content) + b"\n")

    table, report = prepare_benchmark("hostile", generic_spec(folder, "data.jsonl"))

    assert table.column("item_id").to_pylist() == expected_items
    assert [problem.line for problem in report.malformed] == expected_rejected
    assert {problem.file for problem in report.malformed} <= {str(path)}
    assert report.rows_read == len(lines) and report.as_dict()["malformed_count"] == len(expected_rejected)
    for kind, _ in lines:
        BAD_INPUT_TALLY[("jsonl " + kind, "item" if kind in GOOD_KINDS else "counted rejection (file, line)")] += 1
    if expected_rejected:
        with pytest.raises(BenchmarkDataError, match=f"{len(expected_rejected)} malformed row") as error:
            prepare_benchmark("hostile", generic_spec(folder, "data.jsonl", malformed="fail"))
        assert f"{path}, line {expected_rejected[0]}" in str(error.value)
        BAD_INPUT_TALLY[("jsonl file with rejections, malformed: fail", "BenchmarkDataError naming file and line")] += 1


def test_a_100k_character_item_is_kept_whole(tmp_path):
    question = "Why? " * 20_000 + "Answer with a number."
    (tmp_path / "long.jsonl").write_bytes(good_line("long", question, "3") + b"\n")
    table, report = prepare_benchmark("long", generic_spec(tmp_path, "long.jsonl"))
    assert report.malformed == [] and question in table.column("messages").to_pylist()[0][-1]["content"]


def test_a_utf16_file_is_rejected_line_by_line_naming_the_encoding(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes("\n".join(json.dumps({"id": f"u{i}", "question": "q?", "answer": "1"}) for i in range(3)).encode("utf-16"))
    with pytest.raises(BenchmarkDataError) as error:
        prepare_benchmark("utf16", generic_spec(tmp_path, "utf16.jsonl", malformed="fail"))
    assert f"{path}, line 1, field '<row>': not valid UTF-8 (byte 0xff at column 1)" in str(error.value)
    BAD_INPUT_TALLY[("jsonl file in UTF-16", "BenchmarkDataError naming file and line")] += 1


@given(first=st.integers(1, 5), gap=st.integers(1, 5))
@SETTINGS
def test_a_duplicate_id_stops_naming_both_lines(tmp_path_factory, first, gap):
    folder = tmp_path_factory.mktemp("dup")
    ids = [f"d{i}" for i in range(first + gap)] + [f"d{first - 1}"]
    (folder / "dup.jsonl").write_bytes(b"\n".join(good_line(uid, "q?", "1") for uid in ids))
    with pytest.raises(BenchmarkDataError) as error:
        prepare_benchmark("dup", generic_spec(folder, "dup.jsonl"))
    assert (f"dup.jsonl, line {len(ids)}, field 'id': duplicate item id 'd{first - 1}' "
            f"(first at {folder / 'dup.jsonl'}, line {first})") in str(error.value)
    BAD_INPUT_TALLY[("jsonl duplicate id", "BenchmarkDataError naming both lines")] += 1


# ---------------------------------------------------------------- CSV

CSV_GOOD = ("good", "good_quoted_newlines_and_commas", "good_nul_and_control_characters")
CSV_BAD = ("too_many_cells", "latin1_bytes", "empty_question", "missing_gold_answer", "cell_over_the_csv_field_limit")


def csv_record(kind: str, uid: str, text: str) -> bytes:
    def row(*cells: str) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(cells)
        return out.getvalue().encode()

    return {
        "good": lambda: row(uid, text, "42"),
        "good_quoted_newlines_and_commas": lambda: row(uid, f'"{text}",\nsecond line, "quoted"', "1"),
        "good_nul_and_control_characters": lambda: row(uid, f"a\x00b\x07{text}", "2"),
        "too_many_cells": lambda: row(uid, text, "42", "extra"),
        "latin1_bytes": lambda: row(uid, f"café {text}", "42").decode().encode("latin-1", "replace"),
        "empty_question": lambda: row(uid, "  ", "42"),
        "missing_gold_answer": lambda: row(uid, text, ""),
        "cell_over_the_csv_field_limit": lambda: row(uid, "x" * 140_000, "42"),
    }[kind]()


@given(records=st.lists(st.tuples(st.sampled_from(CSV_GOOD + CSV_BAD), TEXT.filter(lambda t: "\r" not in t)),
                        min_size=1, max_size=10), leading_bom=st.booleans())
@SETTINGS
def test_every_csv_record_is_an_item_or_a_counted_rejection(tmp_path_factory, records, leading_bom):
    folder = tmp_path_factory.mktemp("csv")
    records = [("good", "anchor"), *records]
    body = [b"id,question,answer\n"]
    expected_items, expected_rejected, line = [], [], 1
    for index, (kind, text) in enumerate(records):
        uid = f"row-{index}"
        data = csv_record(kind, uid, text)
        start = line + 1
        line += data.count(b"\n")
        body.append(data)
        if kind in CSV_GOOD:
            expected_items.append(uid)
        else:
            expected_rejected.append(start if kind == "cell_over_the_csv_field_limit" else line)
    path = folder / "data.csv"
    path.write_bytes((b"\xef\xbb\xbf" if leading_bom else b"") + b"".join(body))

    table, report = prepare_benchmark("hostile", generic_spec(folder, "data.csv"))

    assert table.column("item_id").to_pylist() == expected_items
    assert [problem.line for problem in report.malformed] == expected_rejected
    assert {problem.file for problem in report.malformed} <= {str(path)}
    for kind, _ in records:
        BAD_INPUT_TALLY[("csv " + kind, "item" if kind in CSV_GOOD else "counted rejection (file, line)")] += 1


# ---------------------------------------------------------------- Parquet

@pytest.mark.parametrize(("kind", "column", "reason"), [
    ("null_question", pa.array([None, "fine?"], pa.string()), "field 'question': missing"),
    ("question_not_text", pa.array([7, 8], pa.int64()), "field 'question': expected str, got int"),
    ("question_is_a_struct", pa.array([{"a": 1}, {"a": 2}]), "field 'question': expected str, got dict"),
    ("empty_question", pa.array(["", "fine?"]), "field 'question': empty"),
])
def test_bad_parquet_rows_are_counted_rejections(tmp_path, kind, column, reason):
    pq.write_table(pa.table({"id": ["p1", "p2"], "question": column, "answer": ["1", "2"]}), tmp_path / "d.parquet")
    try:
        table, report = prepare_benchmark("pq", generic_spec(tmp_path, "d.parquet"))
        assert report.malformed and all(problem.file == str(tmp_path / "d.parquet") for problem in report.malformed)
        assert str(report.malformed[0]).endswith(reason) and report.malformed[0].line == 1
        outcome = "counted rejection (file, line)"
    except BenchmarkDataError as error:  # every row rejected: nothing left to prepare
        assert reason in str(error)
        outcome = "BenchmarkDataError naming file and line"
    BAD_INPUT_TALLY[("parquet " + kind, outcome)] += 1


def test_a_parquet_file_without_the_gold_column_rejects_every_row(tmp_path):
    pq.write_table(pa.table({"id": ["p1"], "question": ["q?"]}), tmp_path / "d.parquet")
    with pytest.raises(BenchmarkDataError, match=r"d.parquet, line 1, field 'answer': missing"):
        prepare_benchmark("pq", generic_spec(tmp_path, "d.parquet"))
    BAD_INPUT_TALLY[("parquet missing gold column", "BenchmarkDataError naming file and line")] += 1


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9])
def test_a_truncated_parquet_file_is_an_error_naming_it(tmp_path, keep):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(100)], "question": ["q?"] * 100, "answer": ["1"] * 100}), path)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(ValueError, match=f"{path} is not a readable Parquet file"):
        prepare_benchmark("pq", generic_spec(tmp_path, "d.parquet"))
    BAD_INPUT_TALLY[("parquet file truncated", "ValueError naming the file")] += 1


@pytest.mark.slow
def test_malformed_fail_stops_the_workflow_before_any_model_work(tmp_path, tiny_model_dir, random_sae_dirs):
    """Snakemake with a hostile file under `malformed: fail`: the prepare job fails naming the file and line, and
    no evaluation or extraction job starts."""
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    data = tmp_path / "data"
    data.mkdir()
    (data / "items.jsonl").write_bytes(good_line("a", "2 + 2?", "4") + b"\n" + b'{"id": "b", "question": "caf\xe9?"}\n')
    config = {"models": {"tiny": {"source": {"path": str(tiny_model_dir)},
                                  "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
              "benchmarks": {"hostile": generic_spec(data, "items.jsonl", malformed="fail")}, "device": "cpu"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0
    assert f"{data / 'items.jsonl'}, line 2, field '<row>': not valid UTF-8 (byte 0xe9" in run.stdout + run.stderr
    assert not (tmp_path / "results" / "evaluate").exists() and not (tmp_path / "results" / "extract").exists()
    BAD_INPUT_TALLY[("snakemake run, malformed: fail", "prepare job fails naming file and line; no model job ran")] += 1


def test_a_labels_file_that_is_not_utf8_rejects_only_its_bad_line(tmp_path):
    """Social IQa keeps its gold labels in a separate file, read line by line like the data."""
    record = {"context": "Tracy helped.", "question": "What next?", "answerA": "a", "answerB": "b", "answerC": "c"}
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(record) for _ in range(3)) + "\n")
    (tmp_path / "dev-labels.lst").write_bytes(b"1\n\xff\n3\n")
    spec = {"adapter": "social_iqa", "data_dir": str(tmp_path), "limit": None, "seed": 0, "malformed": "report"}
    table, report = prepare_benchmark("siqa", spec)
    assert table.column("gold_index").to_pylist() == [0, 2]
    assert [(problem.line, problem.field) for problem in report.malformed] == [(2, "label")]
    BAD_INPUT_TALLY[("labels file with a byte that is not UTF-8", "counted rejection (file, line)")] += 1


def test_a_json_document_that_is_not_utf8_is_a_counted_rejection(tmp_path):
    """MATH's full release is one JSON document per problem."""
    folder = tmp_path / "MATH" / "test" / "algebra"
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({"problem": "1 + 1?", "solution": "$\\boxed{2}$", "level": "Level 1",
                                               "type": "Algebra"}))
    (folder / "2.json").write_bytes('{"problem": "caf\xe9?", "solution": "\\\\boxed{1}"}'.encode("latin-1"))
    spec = {"adapter": "math", "data_dir": str(tmp_path), "limit": None, "seed": 0, "malformed": "report",
            "options": {"split": "full"}}
    table, report = prepare_benchmark("math", spec)
    assert table.num_rows == 1
    assert [(Path(problem.file).name, problem.line) for problem in report.malformed] == [("2.json", 1)]
    assert "not valid UTF-8" in report.malformed[0].reason
    BAD_INPUT_TALLY[("JSON document with a byte that is not UTF-8", "counted rejection (file, line)")] += 1
