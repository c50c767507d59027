"""Hostile score tables (property-based): ids that match no item, scores outside [0, 1], NaN, infinities, text,
empty cells and duplicated ids, as CSV, Parquet and JSONL. Each table is either imported exactly or refused
with an ImportScoresError naming the file and the first offending row."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from competency_gaps.import_scores import ImportScoresError, from_table

from conftest import tally_printer

ITEM_IDS = [f"bench-{n:05d}" for n in range(4)]
ITEMS = pl.DataFrame({"item_id": ITEM_IDS, "scoring": ["numeric_match"] * len(ITEM_IDS)})
TALLY: Counter = Counter()

GOOD_SCORES = st.one_of(st.floats(0, 1), st.sampled_from([0, 1, "0.25", " 1 "]))
BAD_SCORES = st.one_of(
    st.floats(allow_nan=False).filter(lambda x: not 0 <= x <= 1).map(lambda x: ("out_of_range", x)),
    st.just(("nan", math.nan)),
    st.sampled_from([math.inf, -math.inf]).map(lambda x: ("infinite", x)),
    st.sampled_from(["high", "", "1,0", "nan"]).map(lambda x: ("not_a_number", x)),
    st.just(("empty_cell", None)),
)

UNMATCHED_IDS = ["bench-7", "bench-00009", "BENCH-00001", "0"]
BAD_ROW = st.one_of(
    BAD_SCORES.flatmap(lambda bad: st.tuples(st.just(bad[0]), st.sampled_from(ITEM_IDS), st.just(bad[1]))),
    st.tuples(st.just("empty_id"), st.just(""), GOOD_SCORES),
    st.tuples(st.just("duplicate_id"), st.none(), GOOD_SCORES),  # takes the id of the row before it
)


print_tally = tally_printer("score-import", TALLY)


def write(path: Path, rows: list[tuple[str, object]]) -> None:
    """Rows of (item_id, score) in the file's format; CSV cells are text, as a spreadsheet writes them."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"item_id": i, "score": s}) + "\n" for i, s in rows))
        return
    as_text = [(i, None if s is None else str(s)) for i, s in rows]
    frame = pl.DataFrame(as_text, schema={"item_id": pl.String, "score": pl.String}, orient="row")
    frame.write_csv(path) if path.suffix == ".csv" else frame.write_parquet(path)


@given(scored=st.lists(st.tuples(st.sampled_from(ITEM_IDS), GOOD_SCORES), unique_by=lambda row: row[0], max_size=4),
       unmatched=st.lists(st.tuples(st.sampled_from(UNMATCHED_IDS), GOOD_SCORES), unique_by=lambda row: row[0], max_size=2),
       bad=st.one_of(st.none(), BAD_ROW), position=st.integers(0, 6),
       suffix=st.sampled_from([".csv", ".parquet", ".jsonl"]))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_score_table_is_imported_exactly_or_refused_naming_the_row(tmp_path_factory, scored, unmatched, bad, position,
                                                                     suffix):
    """A valid table (scores for some items, ids that match none) with at most one bad row put in at `position`."""
    rows = [("good", *row) for row in scored] + [("id_matching_no_item", *row) for row in unmatched]
    position = min(position, len(rows))
    if bad is not None and bad[0] == "duplicate_id":
        position = max(position, 1)
        bad = ("duplicate_id", rows[position - 1][1], bad[2]) if rows else None  # nothing to repeat in an empty table
    if bad is not None:
        rows.insert(position, bad)
    path = tmp_path_factory.mktemp("scores") / f"scores{suffix}"
    write(path, [(item_id, score) for _, item_id, score in rows])
    first_line, unit = (2, "line") if suffix == ".csv" else (1, "row")
    try:
        frame = from_table(path, ITEMS, missing="null")
    except ImportScoresError as error:
        assert bad is not None, f"refused a valid table: {error}"
        assert str(error).startswith(f"{path}, {unit} {position + first_line}"), str(error)
        TALLY[(bad[0], "ImportScoresError naming file and row")] += 1
        return
    assert bad is None, f"accepted a table whose row {position + first_line} is {bad[0]}"
    expected = {item_id: float(str(score).strip()) for item_id, score in scored}
    assert dict(zip(frame["item_id"], frame["score"])) == {i: expected.get(i) for i in ITEM_IDS}
    for kind, _, _ in rows:
        TALLY[(kind, "imported" if kind == "good" else "ignored, counted in a warning")] += 1


def test_ids_matching_no_item_are_named_by_row_when_items_go_unscored(tmp_path):
    path = tmp_path / "scores.csv"
    write(path, [("bench-0", 1.0), ("bench-1", 0.0)])  # the ids lack the zero padding
    with pytest.raises(ImportScoresError) as error:
        from_table(path, ITEMS)
    message = str(error.value)
    assert "no score for 4 of 4 items" in message
    assert f"2 scored id(s) match no item, the first at {path}, line 2, item 'bench-0'" in message
    TALLY[("every id matching no item", "ImportScoresError naming file and row")] += 1


@pytest.mark.parametrize(("name", "content"), [
    ("ragged.csv", "item_id,score\nbench-00000,1,extra,cells\n"),
    ("latin1.csv", "item_id,score\ncaf\xe9,1\n".encode("latin-1")),
    ("truncated.parquet", b"PAR1\x00\x01"),
])
def test_an_unreadable_score_table_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ImportScoresError, match=f"{path}: cannot read the score table"):
        from_table(path, ITEMS)
    TALLY[(f"unreadable table ({name})", "ImportScoresError naming the file")] += 1
