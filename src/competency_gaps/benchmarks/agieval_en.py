"""AGIEval v1, the 9 English multiple-choice subsets: `<subset>.jsonl` with passage, question, options, label.

Options carry their letter as a prefix, written inconsistently upstream ("(A)text", " A. text",
"A text", "A? text"); the prefix is stripped and options are taken by position, gold by `label` letter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require
from competency_gaps.benchmarks.common import LETTERS, format_options, gold_from_letter
from competency_gaps.templates import SpannedText

SUBSETS = ["lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "sat-en-without-passage",
           "aqua-rat", "gaokao-english"]


def strip_option_prefix(text: str, letter: str) -> str:
    """Drop a leading "(A)", "A.", "A?", "A:" or "A " marker for the expected letter."""
    pattern = rf"^\s*(?:\({letter}\)|{letter}\s*[.?:)]|{letter}(?=\s))\s*"
    return re.sub(pattern, "", text, count=1).strip()


class AGIEvalEnglish(Adapter):
    name = "agieval_en"
    category = "Reasoning"
    description = "AGIEval English exam questions (LSAT, SAT, LogiQA, AQuA-RAT, Gaokao English); multiple choice."

    def subsets(self) -> list[str]:
        return list(self.options.get("subsets", SUBSETS))

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        for subset in self.subsets():
            yield from read_jsonl(data_dir / f"{subset}.jsonl")

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # Best effort: a hub copy with one config per subset and the release's field names.
        for subset in self.subsets():
            for row in hub_records({"path": "lighteval/agi_eval_en", "split": "test", **hub, "name": subset}):
                yield SourceRow(row.file, row.line, {**row.record, "__subset__": subset})

    def to_item(self, row: SourceRow) -> Item:
        subset = row.record.get("__subset__") or Path(row.file).stem
        question = require(row.record, "question").strip()
        raw_options = require(row.record, "options", list)
        if not 2 <= len(raw_options) <= len(LETTERS) or not all(isinstance(o, str) for o in raw_options):
            raise MalformedRow("options", "expected a list of 2-5 strings")
        options = [strip_option_prefix(text, LETTERS[index]) for index, text in enumerate(raw_options)]
        if not all(options):
            raise MalformedRow("options", "an option is empty")
        passage = (row.record.get("passage") or "").strip()
        return Item(
            item_id=f"agieval_en-{subset}-{row.line - 1:05d}",
            # The passage field carries its own separator (not counted) so passage-less items show no empty header.
            fields={"passage": SpannedText.from_pieces([(passage, True), ("\n\n", False)]) if passage else "",
                    "question": question,
                    "options": format_options(options)},
            scoring="mc_loglik",
            choices=options,
            gold_index=gold_from_letter(row.record.get("label"), len(options)),
            subset=subset,
        )
