"""One explicit Arrow schema per table the pipeline writes, enforced on write, and atomic file writes.

Writes go to a temporary file in the destination folder and are renamed into place, so an
interrupted job never leaves a file that a later run would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SPAN = pa.struct([("message", pa.int32()), ("start", pa.int32()), ("end", pa.int32())])

ITEMS = pa.schema(
    [
        ("item_id", pa.string()),
        ("benchmark", pa.string()),
        ("category", pa.string()),
        ("subset", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("field_spans", pa.list_(SPAN)),
        ("scoring", pa.string()),
        ("gold", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("gold_index", pa.int32()),
        ("choice_contexts", pa.list_(pa.string())),
        ("metadata", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        ("item_id", pa.string()),
        ("scoring", pa.string()),
        ("score", pa.float64()),  # p_i in [0, 1]; null when the benchmark has no scorer (coverage only)
        ("prediction", pa.string()),
        ("response", pa.string()),
        ("choice_logprobs", pa.list_(pa.float64())),
        # Generated responses only: the decoder stopped at max_new_tokens rather than at an end-of-turn
        # token (null for log-likelihood, imported and coverage-only items).
        ("cut_off", pa.bool_()),
    ]
)

SALIENCY = pa.schema(
    [
        ("item_id", pa.string()),
        ("concept", pa.int32()),
        ("saliency", pa.float32()),  # s_i^c: mean activation over the item's counted tokens
        ("max_activation", pa.float32()),
        ("active_tokens", pa.int32()),  # counted tokens where the concept is > 0
    ]
)

ITEM_TOKENS = pa.schema(
    [
        ("item_id", pa.string()),
        ("counted_tokens", pa.int32()),  # T_i (0 for a skipped item)
        ("total_tokens", pa.int32()),  # the whole prompt, before any truncation
        ("read_tokens", pa.int32()),  # tokens the model read (≤ max_length; 0 for a skipped item)
        ("truncated", pa.bool_()),
        # Why extraction left the item out (null: extracted): "too_long" (context_policy skip) or
        # "no_counted_tokens" (nothing of the item's own text survived masking). Skipped items count in no χ.
        ("skipped", pa.string()),
    ]
)


def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema` (missing keys become nulls; extra keys are an error)."""
    extra = {key for row in rows for key in row} - set(schema.names)
    if extra:
        raise ValueError(f"rows carry columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: str | Path, schema: pa.Schema) -> None:
    """Write `table` cast to `schema` (raising if it does not fit), atomically."""
    table = table.select(schema.names).cast(schema)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd")


def write_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_frame(frame: Any, path: str | Path) -> None:
    """Write a polars DataFrame whose schema its producer fixes (the reducer's tables), atomically."""
    with atomic_path(path) as temporary:
        frame.write_parquet(temporary, compression="zstd")
