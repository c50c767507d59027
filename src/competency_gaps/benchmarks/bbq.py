"""BBQ: one `<Category>.jsonl` per bias category; `label` 0–2 indexes `ans0`..`ans2`.

Every category file present in the folder is read (sorted by name), so a partial copy works; the
subset is the category. Metadata keeps what the BBQ bias score needs besides accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require
from competency_gaps.benchmarks.common import format_options, option_texts

ANSWER_KEYS = ["ans0", "ans1", "ans2"]
CATEGORIES = [
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
    "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
]


class BBQ(Adapter):
    name = "bbq"
    category = "Ethics & Bias"
    description = "Bias Benchmark for QA; 3-way multiple choice by option log-likelihood, subset = bias category."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        files = sorted(data_dir.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no BBQ category files (*.jsonl) in {data_dir}")
        for path in files:
            yield from read_jsonl(path)

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # heegyu/bbq: one config per category, split "test", the release's field names.
        names = [hub["name"]] if hub.get("name") else self.options.get("categories", CATEGORIES)
        for name in names:
            yield from hub_records({"path": "heegyu/bbq", "split": "test", **hub, "name": name})

    def to_item(self, row: SourceRow) -> Item:
        record = row.record
        category = require(record, "category")
        example_id = require(record, "example_id", int)
        options = option_texts(record, ANSWER_KEYS)
        label = require(record, "label", int)
        if not 0 <= label <= 2:
            raise MalformedRow("label", f"expected 0, 1 or 2, got {label}")
        return Item(
            item_id=f"bbq-{category}-{example_id:05d}",
            fields={"context": require(record, "context").strip(), "question": require(record, "question").strip(),
                    "options": format_options(options)},
            scoring="mc_loglik",
            choices=options,
            gold_index=label,
            subset=category,
            metadata={
                "category": category,
                "context_condition": require(record, "context_condition"),
                "question_polarity": require(record, "question_polarity"),
                "question_index": record.get("question_index"),
                "answer_info": record.get("answer_info"),
                "stereotyped_groups": (record.get("additional_metadata") or {}).get("stereotyped_groups"),
            },
        )
