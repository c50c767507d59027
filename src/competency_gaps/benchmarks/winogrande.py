"""WinoGrande 1.1 dev: `dev.jsonl` (qID, sentence with one `_` blank, option1, option2, answer "1"/"2").

Scored as multiple choice over the two *filled-in sentences*: the prompt shows the sentence with its
blank and both options, and each candidate continuation is the whole sentence with one option put in
the blank (mean per-token log-probability after the prompt). This is a simple reading of the usual
"partial" scoring, which compares only the text after the blank without a prompt.
`dev-labels.lst`, when present, must agree with `answer` (it is redundant in the official release).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require
from competency_gaps.benchmarks.common import attach_labels, format_options, option_texts


class WinoGrande(Adapter):
    name = "winogrande"
    category = "Reasoning"
    description = "Pronoun/blank resolution (WinoGrande dev); 2-way choice between the filled-in sentences."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        rows = read_jsonl(data_dir / self.options.get("file", "dev.jsonl"))
        labels = data_dir / self.options.get("labels_file", "dev-labels.lst")
        yield from attach_labels(rows, labels, key="__label__") if labels.exists() else rows

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # allenai/winogrande (winogrande_xl, validation) has sentence/option1/option2/answer, no qID.
        yield from hub_records({"path": "allenai/winogrande", "name": "winogrande_xl", "split": "validation", **hub})

    def to_item(self, row: SourceRow) -> Item:
        sentence = require(row.record, "sentence").strip()
        if sentence.count("_") != 1:
            raise MalformedRow("sentence", "expected exactly one '_' blank")
        options = option_texts(row.record, ["option1", "option2"])
        answer = str(require(row.record, "answer", (str, int))).strip()
        if answer not in ("1", "2"):
            raise MalformedRow("answer", f"expected '1' or '2', got {answer!r}")
        if row.record.get("__label__", answer) != answer:
            raise MalformedRow("answer", f"disagrees with the labels file ({row.record['__label__']!r})")
        return Item(
            item_id=f"winogrande-{row.line - 1:05d}",
            fields={"sentence": sentence, "options": format_options(options)},
            scoring="mc_loglik",
            choices=[sentence.replace("_", option) for option in options],
            gold_index=int(answer) - 1,
            metadata={"qID": row.record.get("qID")},
        )
