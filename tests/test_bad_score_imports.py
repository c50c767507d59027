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
ROW = st.one_of(
    st.tuples(st.just("good"), st.sampled_from(ITEM_IDS), GOOD_SCORES),
    st.tuples(st.just("id_matching_no_item"), st.sampled_from(["bench-7", "bench-00009", "BENCH-00001", "0"]), GOOD_SCORES),
    BAD_SCORES.flatmap(lambda bad: st.tuples(st.just(bad[0]), st.sampled_from(ITEM_IDS), st.just(bad[1]))),
    st.tuples(st.just("empty_id"), st.just(""), GOOD_SCORES),
)


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    yield
    print("\nscore-import tally (kind: outcome -> cases):")
    for (kind, outcome), count in sorted(TALLY.items()):
        print(f"  {kind}: {outcome} -> {count}")


def write(path: Path, rows: list[tuple[str, object]]) -> None:
    """Rows of (item_id, score) in the file's format; CSV cells are text, as a spreadsheet writes them."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"item_id": i, "score": s}) + "\n" for i, s in rows))
        return
    as_text = [(i, None if s is None else str(s)) for i, s in rows]
    frame = pl.DataFrame(as_text, schema={"item_id": pl.String, "score": pl.String}, orient="row")
    frame.write_csv(path) if path.suffix == ".csv" else frame.write_parquet(path)


def first_problem(rows: list[tuple[str, str, object]]) -> tuple[int, str] | None:
    """The 0-based index and kind of the first row the import must refuse (None: all acceptable)."""
    seen = set()
    for index, (kind, item_id, _) in enumerate(rows):
        if kind == "empty_id" or item_id in seen or kind not in ("good", "id_matching_no_item"):
            return index, "duplicate_id" if item_id in seen and kind != "empty_id" else kind
        seen.add(item_id)
    return None


@given(rows=st.lists(ROW, max_size=8), suffix=st.sampled_from([".csv", ".parquet", ".jsonl"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_score_table_is_imported_exactly_or_refused_naming_the_row(tmp_path_factory, rows, suffix):
    path = tmp_path_factory.mktemp("scores") / f"scores{suffix}"
    write(path, [(item_id, score) for _, item_id, score in rows])
    problem = first_problem(rows)
    first_line = 2 if suffix == ".csv" else 1
    unit = "line" if suffix == ".csv" else "row"
    try:
        frame = from_table(path, ITEMS, missing="null")
    except ImportScoresError as error:
        assert problem is not None, f"refused a valid table: {error}"
        index, kind = problem
        assert str(error).startswith(f"{path}, {unit} {index + first_line}"), str(error)
        TALLY[(kind, "ImportScoresError naming file and row")] += 1
        return
    assert problem is None, f"accepted a table whose row {problem[0]} is {problem[1]}"
    expected = {item_id: float(str(score).strip()) for kind, item_id, score in rows if kind == "good"}
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
