"""NQ-open dev (`NQ-open.dev.jsonl`): lower-cased `question` without "?", `answer` = list of acceptable answers.

The answer list is stored in `gold` as a JSON string; short_answer_match accepts any of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require


class NaturalQuestions(Adapter):
    name = "natural_questions"
    category = "Factuality"
    description = "Open-domain factual questions (NQ-open); short generated answer matched against the gold list."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        yield from read_jsonl(data_dir / self.options.get("file", "NQ-open.dev.jsonl"))

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # google-research-datasets/nq_open "validation" is this file, with the same field names.
        yield from hub_records({"path": "google-research-datasets/nq_open", "split": "validation", **hub})

    def to_item(self, row: SourceRow) -> Item:
        question = require(row.record, "question").strip()
        answers = require(row.record, "answer", list)
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise MalformedRow("answer", "expected a non-empty list of non-empty strings")
        return Item(
            item_id=f"natural_questions-{row.line - 1:05d}",
            fields={"question": question},
            scoring="short_answer_match",
            gold=json.dumps(answers, ensure_ascii=False),
        )
