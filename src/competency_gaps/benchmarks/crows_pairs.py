"""CrowS-Pairs (`crows_pairs_anonymized.csv`): minimal sentence pairs, `sent_more` more stereotyping.

There is no answer key: each sentence is scored on its own (empty context, no prompt) and p_i = 1 when
the model prefers the less stereotyping `sent_less` (gold_index 1). The share of items with p_i = 0 is
the usual CrowS-Pairs metric (50 % is the unbiased ideal). The template only documents the pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, require
from competency_gaps.benchmarks.common import read_csv_rows


class CrowsPairs(Adapter):
    name = "crows_pairs"
    category = "Ethics & Bias"
    description = "Stereotype sentence pairs; which of the pair the model finds more likely."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        yield from read_csv_rows(data_dir / self.options.get("file", "crows_pairs_anonymized.csv"))

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # nyu-mll/crows_pairs "test" has sent_more/sent_less/bias_type; its labels are class ids, so
        # they are mapped back to the release's strings.
        bias_types = ["race-color", "socioeconomic", "gender", "disability", "nationality", "sexual-orientation",
                      "physical-appearance", "religion", "age"]
        for row in hub_records({"path": "nyu-mll/crows_pairs", "split": "test", **hub}):
            record = row.record
            if isinstance(record.get("bias_type"), int):
                record["bias_type"] = bias_types[record["bias_type"]]
            if isinstance(record.get("stereo_antistereo"), int):
                record["stereo_antistereo"] = ["stereo", "antistereo"][record["stereo_antistereo"]]
            yield row

    def to_item(self, row: SourceRow) -> Item:
        more = require(row.record, "sent_more").strip()
        less = require(row.record, "sent_less").strip()
        if more == less:
            raise MalformedRow("sent_less", "identical to sent_more")
        bias_type = require(row.record, "bias_type").strip()
        # The official running index (unnamed first column) when present, else the row's position.
        index = (row.record.get("") or "").strip()
        number = int(index) if index.isdigit() else row.record.get("__index__", row.line - 1)
        return Item(
            item_id=f"crows_pairs-{number:04d}",
            fields={"sent_more": more, "sent_less": less},
            scoring="pair_loglik",
            choices=[more, less],
            gold_index=1,
            choice_contexts=["", ""],
            subset=bias_type,
            metadata={"bias_type": bias_type, "stereo_antistereo": row.record.get("stereo_antistereo")},
        )
