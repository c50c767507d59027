"""MATH: MATH-500 (`test.jsonl`, option `split: math500`, default) or the full 5,000-problem test split
(`MATH/test/<subject>/<n>.json`, option `split: full`).

MATH-500 rows carry `answer`; full-split files only a `solution`, whose last \\boxed{} (balanced braces)
is the gold. Full-split rows get MATH-500's `unique_id` ("test/<subject>/<n>.json") from their path,
so one item id scheme ("math-<subject>-<n>") serves both splits and MATH-500 ids match the full split's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, hub_records, read_jsonl, require
from competency_gaps.benchmarks.common import read_json_document
from competency_gaps.scoring import last_boxed

SPLITS = ("math500", "full")


def file_order(path: Path) -> tuple[str, int, str]:
    """Subject folder, then problem number numerically (1, 2, …, 10), so the order is stable and natural."""
    return path.parent.name, int(path.stem) if path.stem.isdigit() else -1, path.stem


def parse_level(value: Any) -> int | None:
    """5 or "Level 5" -> 5; anything else ("Level ?") -> None."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(?:Level\s*)?(\d)\s*", str(value or ""))
    return int(match.group(1)) if match else None


class MATH(Adapter):
    name = "math"
    generates = True
    category = "Math"
    description = "Competition mathematics (MATH-500 or the full MATH test split); boxed final answer, LaTeX-aware match."

    def split(self) -> str:
        split = self.options.get("split", "math500")
        if split not in SPLITS:
            raise ValueError(f"math option 'split': expected one of {', '.join(SPLITS)}, got {split!r}")
        return split

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        if self.split() == "math500":
            yield from read_jsonl(data_dir / "test.jsonl")
            return
        files = sorted((data_dir / "MATH" / "test").glob("*/*.json"), key=file_order)
        if not files:
            raise FileNotFoundError(f"no MATH/test/<subject>/<n>.json files under {data_dir}")
        for path in files:
            document = read_json_document(path)
            if isinstance(document, str):
                yield SourceRow(str(path), 1, {"__error__": document})
            else:
                yield SourceRow(str(path), 1, {**document, "unique_id": f"test/{path.parent.name}/{path.name}"})

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        # HuggingFaceH4/MATH-500 has the release's fields; hendrycks/competition_math (full) has
        # problem/level/type/solution and no unique_id, so its items are numbered by position.
        default = {"path": "HuggingFaceH4/MATH-500"} if self.split() == "math500" else {"path": "hendrycks/competition_math"}
        yield from hub_records({**default, "split": "test", **hub})

    def to_item(self, row: SourceRow) -> Item:
        record = row.record
        problem = require(record, "problem").strip()
        if record.get("answer") is not None:
            gold = str(require(record, "answer", (str, int, float))).strip()
        else:
            gold = last_boxed(require(record, "solution"))
            if not gold or not gold.strip():
                raise MalformedRow("solution", "no complete \\boxed{...} answer")
            gold = gold.strip()
        subject = record.get("subject") or record.get("type")
        if not isinstance(subject, str) or not subject.strip():
            raise MalformedRow("subject", "missing (neither 'subject' nor 'type' given)")
        unique_id = record.get("unique_id")
        if isinstance(unique_id, str) and unique_id.strip():
            item_id = "math-" + unique_id.strip().removeprefix("test/").removesuffix(".json").replace("/", "-")
        else:
            item_id = f"math-{row.line - 1:05d}"
        return Item(
            item_id=item_id,
            fields={"problem": problem},
            scoring="boxed_equiv",
            gold=gold,
            subset=subject.strip(),
            metadata={"subject": subject.strip(), "level": parse_level(record.get("level")), "unique_id": unique_id},
        )
