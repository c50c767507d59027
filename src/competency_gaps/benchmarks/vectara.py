"""Vectara hallucination leaderboard (v1 document pool): the `source` column of `leaderboard_summaries.utf8.csv`.

The model summarises each passage using only its facts; a consistency judge (Vectara's HHEM) would score
the summary. No judge ships offline, so these items are coverage-only unless one is configured
(competency_gaps.scoring.JUDGES). The other columns (a third party's summaries) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, SourceRow, hub_records, require
from competency_gaps.benchmarks.common import read_csv_rows


class Vectara(Adapter):
    name = "vectara"
    generates = True
    category = "Factuality"
    description = "Faithful summarisation of news passages (Vectara leaderboard documents); judge-scored."

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        yield from read_csv_rows(data_dir / self.options.get("file", "leaderboard_summaries.utf8.csv"))

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # vectara/leaderboard_results repeats each source once per model: keep the first occurrence.
        seen: set[str] = set()
        for row in hub_records({"path": "vectara/leaderboard_results", "split": "train", **hub}):
            if row.record.get("source") not in seen:
                seen.add(row.record.get("source"))
                yield SourceRow(row.file, len(seen), row.record)

    def to_item(self, row: SourceRow) -> Item:
        # The GBK round trip upstream turned "£" into the full-width "￡" (SOURCE.md); undo it.
        source = require(row.record, "source").strip().replace("\uffe1", "£")
        return Item(
            item_id=f"vectara-{row.record.get('__index__', row.line - 1):04d}",
            fields={"source": source},
            scoring="judge",
        )
