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
        ("counted_tokens", pa.int32()),  # T_i as read, massive activations left out (0 for a skipped item)
        ("total_tokens", pa.int32()),  # the whole prompt, before any truncation
        ("read_tokens", pa.int32()),  # tokens the model read (≤ max_length; 0 for a skipped item)
        ("truncated", pa.bool_()),
        # Why extraction left the item out (null: extracted): "too_long" (context_policy skip) or
        # "no_counted_tokens" (nothing of the item's own text survived masking). Skipped items count in no χ.
        ("skipped", pa.string()),
    ]
)


# Concept labels (labels stage, per model and layer): one row per SAE concept.
LABELS = pa.schema(
    [
        ("concept", pa.int32()),
        ("live", pa.bool_()),  # fired on some token the stage read (corpus slice or benchmark items)
        ("label", pa.string()),  # null for a concept that never fired
        ("label_source", pa.string()),  # heuristic | llm | neuronpedia (null: not live)
        ("detection_score", pa.float64()),  # balanced accuracy of the judge on held-out contexts (NaN: too few)
        ("detection_judge", pa.string()),  # lexical (offline) | llm
        ("n_detection", pa.int32()),  # contexts judged (activating + non-activating)
        ("firing_tokens", pa.list_(pa.string())),  # tokens it fires on most in its top contexts
        ("promoted_tokens", pa.list_(pa.string())),  # logit lens: tokens its decoder direction promotes most
        ("suppressed_tokens", pa.list_(pa.string())),
        ("max_activation", pa.float32()),  # strongest activation seen
    ]
)

# Top (and sampled) activating contexts of each concept, with the per-token activations for highlighting.
CONTEXTS = pa.schema(
    [
        ("concept", pa.int32()),
        ("kind", pa.string()),  # top: strongest contexts | sample: seeded random activating contexts (held out)
        ("rank", pa.int32()),
        ("source", pa.string()),  # "corpus" or the benchmark slug
        ("item_id", pa.string()),  # the benchmark item (null for corpus contexts)
        ("sequence", pa.int64()),  # corpus row, or the item's index in its benchmark shard
        ("position", pa.int32()),  # the peak token's position in the prompt
        ("activation", pa.float32()),  # at the peak
        ("token_ids", pa.list_(pa.int32())),  # the window (-1: no token there)
        ("tokens", pa.list_(pa.string())),
        ("activations", pa.list_(pa.float32())),  # this concept's activation on each window token
        ("peak_index", pa.int32()),  # the peak's index in the window
    ]
)

CONCEPT_MAP = pa.schema(
    [
        ("concept", pa.int32()),
        ("x", pa.float32()),  # the concept's point: UMAP of its decoder direction
        ("y", pa.float32()),
        ("cluster", pa.int32()),  # k-means cluster of the points
    ]
)


# The tables a later stage reads, by file name, so a reader can check what it is given.
SCHEMAS_BY_FILE_NAME = {
    "items.parquet": ITEMS,
    "scores.parquet": SCORES,
    "saliency.parquet": SALIENCY,
    "item_tokens.parquet": ITEM_TOKENS,
    "labels.parquet": LABELS,
    "contexts.parquet": CONTEXTS,
    "concept_map.parquet": CONCEPT_MAP,
}
REBUILD_HINT = ("delete it and rerun the same snakemake command: the job that writes it runs again, "
                "and so does every job that reads it")


class DamagedTableError(ValueError):
    """A Parquet input cannot be trusted (truncated, not Parquet, or another schema); the message names the file."""


def unreadable(path: str | Path, error: Exception) -> DamagedTableError:
    """The error for a Parquet file that cannot be read (its footer or, found while reading, a data page)."""
    return DamagedTableError(f"{path}: not a readable Parquet file ({error}); {REBUILD_HINT}")


def schema_problems(found: pa.Schema, expected: pa.Schema) -> list[str]:
    """Columns of `expected` that `found` lacks or holds with another type (extra columns are allowed)."""
    problems = []
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            problems.append(f"column {field.name!r} is missing")
        elif not found.field(index).type.equals(field.type):
            problems.append(f"column {field.name!r} is {found.field(index).type}, expected {field.type}")
    return problems


def check_parquet(path: str | Path, schema: pa.Schema | None = None) -> None:
    """Raise DamagedTableError naming `path` and how to rebuild it when it is not a complete Parquet file (its
    footer, written last, is missing when a write or copy was cut short) or, given `schema` (by default the
    pipeline table of that file name, if any), lacks one of its columns or holds one with another type."""
    path = Path(path)
    schema = schema if schema is not None else SCHEMAS_BY_FILE_NAME.get(path.name)
    try:
        found = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as error:
        raise unreadable(path, error) from None
    problems = schema_problems(found, schema) if schema is not None else []
    if problems:
        raise DamagedTableError(f"{path}: not the expected table ({'; '.join(problems)}); {REBUILD_HINT}")


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
