"""Social IQa dev: `dev.jsonl` (context, question, answerA–C) zipped line by line with `dev-labels.lst` (1–3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require
from competency_gaps.benchmarks.common import attach_labels, format_options, option_texts

ANSWER_KEYS = ["answerA", "answerB", "answerC"]


class SocialIQa(Adapter):
    name = "social_iqa"
    category = "Reasoning"
    description = "Commonsense reasoning about social situations; 3-way multiple choice by option log-likelihood."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        rows = read_jsonl(data_dir / self.options.get("file", "dev.jsonl"))
        yield from attach_labels(rows, data_dir / self.options.get("labels_file", "dev-labels.lst"))

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # allenai/social_i_qa "validation" has the release's fields plus `label` "1"/"2"/"3".
        yield from hub_records({"path": "allenai/social_i_qa", "split": "validation", **hub})

    def to_item(self, row: SourceRow) -> Item:
        context = require(row.record, "context")
        question = require(row.record, "question")
        options = option_texts(row.record, ANSWER_KEYS)
        label = str(require(row.record, "label", (str, int))).strip()
        if label not in ("1", "2", "3"):
            raise MalformedRow("label", f"expected 1, 2 or 3, got {label!r}")
        return Item(
            item_id=f"social_iqa-{row.line - 1:05d}",
            fields={"context": context.strip(), "question": question.strip(), "options": format_options(options)},
            scoring="mc_loglik",
            choices=options,
            gold_index=int(label) - 1,
        )
