"""GSM8K (openai/grade-school-math): `question`, and `answer` ending in `#### <final answer>`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require


class GSM8K(Adapter):
    name = "gsm8k"
    generates = True
    category = "Math"
    description = "Grade-school maths word problems; numeric exact match of the final answer."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        yield from read_jsonl(data_dir / self.options.get("file", "test.jsonl"))

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # openai/gsm8k ("main") has the same field names as the release file.
        yield from hub_records({"path": "openai/gsm8k", "name": "main", **hub})

    def to_item(self, row: SourceRow) -> Item:
        question = require(row.record, "question")
        solution = require(row.record, "answer")
        if "####" not in solution:
            raise MalformedRow("answer", "no '#### <final answer>' line")
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
        return Item(
            item_id=f"gsm8k-{row.line - 1:05d}",
            fields={"question": question.strip()},
            scoring="numeric_match",
            gold=gold,
        )
