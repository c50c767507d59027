"""Built-in probes: deterministic from seed, golds recomputed independently, rendered through prepare."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from competency_gaps.benchmarks import get_adapter
from competency_gaps.benchmarks.base import Item
from competency_gaps.prepare import prepare_benchmark

PROBES = ("probe_arithmetic", "probe_palindrome", "probe_dates", "probe_letter_count")
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def items(name: str, **options) -> list[Item]:
    adapter = get_adapter(name, options)
    return [adapter.to_item(row) for row in adapter.local_rows(Path("/nonexistent"))]


def as_tuples(batch: list[Item]) -> list[tuple]:
    return [(i.item_id, i.fields, i.gold, i.choices, i.gold_index, i.subset, i.metadata) for i in batch]


@pytest.mark.parametrize("name", PROBES)
def test_deterministic_from_seed(name):
    first = items(name, seed=3, n=50)
    assert as_tuples(first) == as_tuples(items(name, seed=3, n=50))
    assert as_tuples(first) != as_tuples(items(name, seed=4, n=50))
    assert len(first) == 50
    assert len({item.item_id for item in first}) == 50
    assert first[17].item_id == f"{name}-00017"
    assert len(items(name)) == 200  # default n


@pytest.mark.parametrize("name", PROBES)
def test_prepare_ignores_data_dir(name, tmp_path):
    table, report = prepare_benchmark(name, {"adapter": name, "data_dir": str(tmp_path), "limit": 20, "seed": 0,
                                             "options": {"n": 30}})
    rows = table.to_pylist()
    assert report.rows_read == 30 and report.items_kept == 20 and not report.malformed
    assert {row["category"] for row in rows} == {"Probe"}
    assert all(row["messages"][-1]["role"] == "user" and row["field_spans"] for row in rows)


def test_arithmetic_golds():
    batch = items("probe_arithmetic", seed=1, n=300)
    operations = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
    for item in batch:
        a, b = map(int, re.fullmatch(r"What is (\d+) [-+*] (\d+)\?", item.fields["question"]).groups())
        meta = item.metadata
        assert (a, b) == (meta["a"], meta["b"])
        assert item.gold == str(operations[meta["operation"]](a, b))
        assert len(str(a)) == len(str(b)) == meta["digits"]
        assert item.subset == f"{meta['operation']}-{meta['digits']}digit"
        assert item.scoring == "numeric_match"
    assert {item.metadata["operation"] for item in batch} == {"add", "sub", "mul"}
    assert {item.metadata["digits"] for item in batch} == {2, 3, 4}


def test_arithmetic_options():
    batch = items("probe_arithmetic", n=20, operations=["mul"], digits=5)
    assert all(item.subset == "mul-5digit" and " * " in item.fields["question"] for item in batch)
    with pytest.raises(ValueError, match="operations"):
        get_adapter("probe_arithmetic", {"operations": ["div"]})
    with pytest.raises(ValueError, match="digits"):
        get_adapter("probe_arithmetic", {"digits": 0})
    with pytest.raises(ValueError, match="'n'"):
        get_adapter("probe_dates", {"n": 0})


def test_letter_count_golds():
    batch = items("probe_letter_count", seed=2, n=300)
    for item in batch:
        letter, word = re.fullmatch(r"How many times does the letter '(\w)' appear in '(\w+)'\?",
                                    item.fields["question"]).groups()
        assert item.gold == str(word.count(letter))
        assert item.scoring == "numeric_match"
    counts = {int(item.gold) for item in batch}
    assert 0 in counts and max(counts) >= 3


def test_palindrome_golds_balanced():
    batch = items("probe_palindrome", seed=5, n=101)
    for item in batch:
        text = re.fullmatch(r"Is '(\w+)' a palindrome\? Answer yes or no\.", item.fields["question"]).group(1)
        assert item.gold == ("yes" if text == text[::-1] else "no")
        assert item.scoring == "yes_no"
    assert sum(item.gold == "yes" for item in batch) == 50
    assert {item.metadata["source"] for item in batch} == {"word", "random"}


def test_date_golds():
    batch = items("probe_dates", seed=7, n=300)
    for item in batch:
        question = item.fields["question"]
        assert item.scoring == "mc_loglik" and len(item.choices) == 4 == len(set(item.choices))
        if match := re.fullmatch(r"(\S+) is a (\w+)\. What day of the week is it (\d+) days later\?", question):
            start = dt.date.fromisoformat(match.group(1))
            assert WEEKDAYS[start.weekday()] == match.group(2)
            truth = WEEKDAYS[(start + dt.timedelta(days=int(match.group(3)))).weekday()]
        elif match := re.fullmatch(r"What is the date (\d+) days after (\S+)\?", question):
            truth = (dt.date.fromisoformat(match.group(2)) + dt.timedelta(days=int(match.group(1)))).isoformat()
        else:
            match = re.fullmatch(r"On a 24-hour clock, what time is it (\d+) minutes after (\d\d:\d\d)\?", question)
            start = dt.datetime.strptime(match.group(2), "%H:%M")
            truth = (start + dt.timedelta(minutes=int(match.group(1)))).strftime("%H:%M")
        assert item.choices[item.gold_index] == truth == item.gold
        assert f"{'ABCD'[item.gold_index]}. {truth}" in item.fields["options"]
    assert {item.subset for item in batch} == {"weekday", "date", "time"}
    assert len({item.gold_index for item in batch}) == 4  # the true choice is not always in one place


def test_date_kinds_and_unstated_weekday():
    batch = items("probe_dates", n=10, kinds=["weekday"], state_weekday=False)
    for item in batch:
        offset, start = re.fullmatch(r"What day of the week is it (\d+) days after (\S+)\?",
                                     item.fields["question"]).groups()
        end = dt.date.fromisoformat(start) + dt.timedelta(days=int(offset))
        assert item.choices[item.gold_index] == end.strftime("%A")


def prepared_rows(name: str, **options) -> list[dict]:
    table, _ = prepare_benchmark(name, {"adapter": name, "data_dir": ".", "limit": None, "seed": 0,
                                        "options": {"n": 20, **options}})
    return table.to_pylist()


def counted_pieces(row: dict) -> list[str]:
    """The characters of a prepared row that count as the item's own text, span by span."""
    return [row["messages"][s["message"]]["content"][s["start"]:s["end"]] for s in row["field_spans"]]


def test_date_options_count_their_texts_not_their_letters():
    for row in prepared_rows("probe_dates"):
        assert "\nA. " in row["messages"][-1]["content"]
        question = counted_pieces(row)[0]
        assert question.endswith("?") and "\n" not in question
        assert counted_pieces(row)[1:] == row["choices"]


def test_palindrome_instruction_in_the_question_is_not_counted():
    for row in prepared_rows("probe_palindrome"):
        assert "a palindrome? Answer yes or no." in row["messages"][-1]["content"]
        text = json.loads(row["metadata"])["text"]
        assert counted_pieces(row) == [f"Is '{text}' a palindrome?"]
