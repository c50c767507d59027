"""Atomic writes: an interrupted or failed write leaves no file a later run would trust."""

from __future__ import annotations

import pyarrow as pa
import pytest

from competency_gaps.tables import SCORES, atomic_path, write_parquet


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "scores.parquet"
    bad = pa.table({"item_id": ["a"], "scoring": ["x"], "score": ["not a number"], "prediction": [None],
                    "response": [None], "choice_logprobs": pa.array([None], pa.list_(pa.float64())), "cut_off": pa.array([None], pa.bool_())})
    with pytest.raises(pa.ArrowInvalid):
        write_parquet(bad, target, SCORES)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_writer_leaves_no_partial_file(tmp_path):
    target = tmp_path / "shard.parquet"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half a parquet file")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_schema_is_enforced_on_write(tmp_path):
    target = tmp_path / "scores.parquet"
    table = pa.table({"item_id": ["a"], "scoring": ["x"], "score": [1], "prediction": ["1"], "response": ["r"],
                      "choice_logprobs": pa.array([[0.5]], pa.list_(pa.float64())), "cut_off": [False]})
    write_parquet(table, target, SCORES)
    assert pa.parquet.read_schema(target).field("score").type == pa.float64()
