"""NQ-open dev (`NQ-open.dev.jsonl`): lower-cased `question` without "?", `answer` = list of acceptable answers.

The answer list is stored in `gold` as a JSON string; the short answer is scored against any of them.
Option `match` picks the policy: `exact` (default, NQ-open's standard metric: short_answer_match, the
SQuAD-normalised short answer equals a gold answer) or `contains` (short_answer_contains: also accepts
a gold answer as whole words inside the short answer's sentence; lenient, not comparable to published
NQ-open exact-match figures).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require

MATCH_POLICIES = {"exact": "short_answer_match", "contains": "short_answer_contains"}


class NaturalQuestions(Adapter):
    name = "natural_questions"
    generates = True
    category = "Factuality"
    description = "Open-domain factual questions (NQ-open); short generated answer matched against the gold list."

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        match = self.options.get("match", "exact")
        if match not in MATCH_POLICIES:
            raise ValueError(f"natural_questions adapter: option 'match' must be one of {', '.join(MATCH_POLICIES)}, "
                             f"got {match!r}")
        self.scoring: str = MATCH_POLICIES[match]

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
            scoring=self.scoring,
            gold=json.dumps(answers, ensure_ascii=False),
        )
