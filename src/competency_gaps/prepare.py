"""Stage 1: read one benchmark through its adapter into the normalised items table."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from competency_gaps.benchmarks import get_adapter
from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow
from competency_gaps.tables import ITEMS, table_from_rows, write_json, write_parquet
from competency_gaps.templates import render_prompt, template_for

log = logging.getLogger(__name__)


class BenchmarkDataError(ValueError):
    """The benchmark's source data cannot be turned into a trustworthy items table."""


@dataclass
class RowProblem:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}, field {self.field!r}: {self.reason}"


@dataclass
class PrepareReport:
    rows_read: int = 0
    malformed: list[RowProblem] = field(default_factory=list)
    items_valid: int = 0
    items_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "malformed_count": len(self.malformed),
            "malformed": [vars(problem) for problem in self.malformed],
            "items_valid": self.items_valid,
            "items_kept": self.items_kept,
        }


def source_rows(adapter: Adapter, spec: dict[str, Any]) -> Iterator[SourceRow]:
    if spec.get("hub") is not None:
        return adapter.hub_rows(spec["hub"])
    if spec.get("data_dir"):
        data_dir = Path(spec["data_dir"])
        if not data_dir.is_dir():
            raise BenchmarkDataError(f"data_dir {data_dir} of benchmark adapter {adapter.name!r} is not a folder")
        return adapter.local_rows(data_dir)
    if adapter.needs_data:
        raise BenchmarkDataError(f"adapter {adapter.name!r} needs a data_dir or a hub source")
    return adapter.local_rows(None)  # generated benchmarks (probes) read nothing


def read_items(adapter: Adapter, spec: dict[str, Any], report: PrepareReport) -> list[Item]:
    """All valid items in source order; malformed rows are recorded in `report`, duplicate ids are fatal."""
    items: list[Item] = []
    first_seen: dict[str, SourceRow] = {}
    for row in source_rows(adapter, spec):
        report.rows_read += 1
        try:
            if "__error__" in row.record:
                raise MalformedRow("<row>", row.record["__error__"])
            item = adapter.to_item(row)
        except MalformedRow as problem:
            report.malformed.append(RowProblem(row.file, row.line, problem.field, problem.reason))
            continue
        if item.item_id in first_seen:
            earlier = first_seen[item.item_id]
            raise BenchmarkDataError(
                f"{row.file}, line {row.line}, field 'id': duplicate item id {item.item_id!r} "
                f"(first at {earlier.file}, line {earlier.line})"
            )
        first_seen[item.item_id] = row
        items.append(item)
    report.items_valid = len(items)
    return items


def sample_items(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded random subset of `limit` items, kept in source order (all items when limit is None)."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[index] for index in keep]


def item_row(item: Item, benchmark: str, category: str, template: dict[str, str]) -> dict[str, Any]:
    prompt = render_prompt(template, item.fields)
    return {
        "item_id": item.item_id,
        "benchmark": benchmark,
        "category": category,
        "subset": item.subset,
        "messages": prompt.messages,
        "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans],
        "scoring": item.scoring,
        "gold": item.gold,
        "choices": item.choices,
        "gold_index": item.gold_index,
        "choice_contexts": item.choice_contexts,
        "metadata": item.metadata_json(),
    }


def prepare_benchmark(benchmark: str, spec: dict[str, Any]) -> tuple[pa.Table, PrepareReport]:
    """Read, check, sample and template one benchmark (config slice `spec`)."""
    adapter = get_adapter(spec["adapter"], spec.get("options"))
    template = template_for(spec.get("template") or adapter.name)
    report = PrepareReport()
    items = read_items(adapter, spec, report)
    for problem in report.malformed:
        log.warning("malformed row skipped: %s", problem)
    if report.malformed and spec.get("malformed", "fail") == "fail":
        shown = "\n  ".join(str(problem) for problem in report.malformed[:10])
        raise BenchmarkDataError(
            f"benchmark {benchmark!r}: {len(report.malformed)} malformed row(s) (set malformed: report to skip and "
            f"count them instead):\n  {shown}"
        )
    if not items:
        rejected = f" ({len(report.malformed)} malformed row(s), the first: {report.malformed[0]})" if report.malformed else ""
        raise BenchmarkDataError(f"benchmark {benchmark!r}: no valid items in its source{rejected}")
    kept = sample_items(items, spec.get("limit"), spec.get("seed", 0))
    report.items_kept = len(kept)
    rows = [item_row(item, benchmark, adapter.category, template) for item in kept]
    log.info("%s: %d rows read, %d malformed, %d valid, %d kept", benchmark, report.rows_read,
             len(report.malformed), report.items_valid, report.items_kept)
    return table_from_rows(rows, ITEMS), report


def run_prepare(benchmark: str, spec: dict[str, Any], items_path: Path, report_path: Path) -> None:
    table, report = prepare_benchmark(benchmark, spec)
    write_parquet(table, items_path, ITEMS)
    write_json({"benchmark": benchmark, **report.as_dict()}, report_path)
