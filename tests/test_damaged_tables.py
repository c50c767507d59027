"""A truncated, foreign or wrongly shaped Parquet input stops the stage that reads it, naming the file and the fix."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from competency_gaps.cli import main
from competency_gaps.tables import (
    ITEM_TOKENS,
    SALIENCY,
    SCORES,
    DamagedTableError,
    check_parquet,
    table_from_rows,
    write_parquet,
)

SALIENCY_ROWS = [{"item_id": f"x-{i}", "concept": i % 7, "saliency": 0.5, "max_activation": 1.0, "active_tokens": 2}
                 for i in range(500)]


@pytest.fixture()
def shard(tmp_path):
    path = tmp_path / "extract" / "saliency.parquet"
    write_parquet(table_from_rows(SALIENCY_ROWS, SALIENCY), path, SALIENCY)
    return path


def test_a_complete_shard_passes(shard):
    check_parquet(shard)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_a_truncated_shard_is_named_with_how_to_rebuild_it(shard, keep):
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DamagedTableError, match="delete it and rerun") as error:
        check_parquet(shard)
    assert str(shard) in str(error.value)


def test_a_file_that_is_not_parquet_is_refused(tmp_path):
    path = tmp_path / "scores.parquet"
    path.write_text('{"item_id": "x-1", "score": 1.0}\n')
    with pytest.raises(DamagedTableError, match="not a readable Parquet file"):
        check_parquet(path)


def test_a_shard_with_another_schema_is_refused_naming_the_columns(tmp_path):
    path = tmp_path / "saliency.parquet"
    pq.write_table(pa.table({"item_id": ["x-1"], "concept": ["7"], "saliency": [0.5]}), path)
    with pytest.raises(DamagedTableError) as error:
        check_parquet(path)
    message = str(error.value)
    assert str(path) in message and "delete it and rerun" in message
    assert "'concept' is string, expected int32" in message
    assert "'max_activation' is missing" in message and "'active_tokens' is missing" in message


def test_an_explicit_schema_wins_over_the_file_name(shard):
    with pytest.raises(DamagedTableError, match="'score' is missing"):
        check_parquet(shard, SCORES)


def test_the_reduce_stage_refuses_a_damaged_input_before_computing(shard, tmp_path):
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_sae": 8}))
    argv = ["reduce", "--spec", json.dumps({"config": {"gaps": {}}}), "--sae-dir", str(tmp_path / "sae"),
            "--saliency", str(shard), "--tokens", str(tmp_path / "missing_tokens.parquet"),
            "--scores", str(tmp_path / "missing_scores.parquet"), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(DamagedTableError, match="saliency.parquet: not a readable Parquet file"):
        main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["reduce", "robustness"])
def test_a_damaged_data_page_behind_an_intact_footer_is_named_by_the_stage_reading_it(tmp_path, stage):
    # The input check reads footers only; a page damaged in place (a disk fault, a bad copy) is found when the
    # stage streams the rows, and must name the file, not surface as a bare decompression error.
    n = 20_000
    ids = [f"x-{i:05d}" for i in range(n)]
    root = tmp_path / "extract" / "model=m" / "benchmark=b" / "layer=1"
    rows = [{"item_id": item, "concept": i % 7, "saliency": 0.5 + (i % 11) / 10, "max_activation": 1.0,
             "active_tokens": 2} for i, item in enumerate(ids)]
    write_parquet(table_from_rows(rows, SALIENCY), root / "saliency.parquet", SALIENCY)
    write_parquet(table_from_rows([{"item_id": item, "counted_tokens": 3, "total_tokens": 3, "read_tokens": 3,
                                    "truncated": False, "skipped": None} for item in ids], ITEM_TOKENS),
                  root / "item_tokens.parquet", ITEM_TOKENS)
    scores = tmp_path / "evaluate" / "model=m" / "benchmark=b" / "scores.parquet"
    write_parquet(table_from_rows([{"item_id": item, "scoring": "x", "score": 1.0} for item in ids], SCORES),
                  scores, SCORES)
    shard = root / "saliency.parquet"
    data = bytearray(shard.read_bytes())
    start = pq.ParquetFile(shard).metadata.row_group(0).column(0).data_page_offset  # item_id's first page
    data[start + 16:start + 4016] = bytes(4000)
    shard.write_bytes(bytes(data))
    check_parquet(shard)  # the footer is intact
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_sae": 8}))
    argv = [stage, "--spec", json.dumps({"config": {"gaps": {}, "robustness": {}}}), "--sae-dir",
            str(tmp_path / "sae"), "--saliency", str(shard), "--tokens", str(root / "item_tokens.parquet"),
            "--scores", str(scores), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(DamagedTableError, match="not a readable Parquet file") as error:
        main(argv)
    assert str(shard) in str(error.value) and "delete it and rerun" in str(error.value)
    assert not (tmp_path / "out" / "concepts.parquet").exists() and not (tmp_path / "out" / "stability.parquet").exists()
