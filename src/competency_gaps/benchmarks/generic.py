"""Generic adapter: any local JSONL, CSV or Parquet file becomes a benchmark through its options.

Options:
  file      path of the file, relative to data_dir or absolute (.jsonl/.json lines, .csv, .parquet)
  columns   our role -> the file's column: question (required; defaults to "question"), id, answer,
            choices (a list column, or a JSON list in a string), gold_index (0-based), subset
  scoring   a scoring policy from base.SCORING_POLICIES (required)
  category  one of base.CATEGORIES (default "Other")
  id_prefix prefix of the ids made when there is no id column (default "generic-": generic-<line>)

Item fields: `question`, and `options` — "\\nOptions:\\nA. …" when the item has choices, else empty —
for the "generic" template. Log-likelihood policies need choices plus a gold_index column, or an
answer column whose value is one of the choices; option_letter takes the letter of the gold index
when there is one, else the answer column; other policies (but judge and none) need an answer.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import (
    CATEGORIES,
    GENERATION_POLICIES,
    LOGLIK_POLICIES,
    SCORING_POLICIES,
    Adapter,
    Item,
    MalformedRow,
    SourceRow,
    read_jsonl,
    require,
)
from competency_gaps.benchmarks.common import lettered_option_pieces, read_csv_rows
from competency_gaps.templates import SpannedText

ROLES = ("id", "question", "answer", "choices", "gold_index", "subset")
ANSWER_OPTIONAL = ("judge", "none")
LETTERS = string.ascii_uppercase


def read_parquet_rows(path: Path) -> Iterator[SourceRow]:
    """Parquet records; `line` is the 1-based row index. A file pyarrow cannot read (truncated, not Parquet)
    is an error naming it: no row of it can be trusted."""
    import pyarrow as pa  # only when a Parquet file is read
    import pyarrow.parquet as pq

    line = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                line += 1
                yield SourceRow(str(path), line, record)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"generic adapter: {path} is not a readable Parquet file (after {line} rows): {error}") from None


def read_rows(path: Path) -> Iterator[SourceRow]:
    """The file's records by its suffix: JSONL (line numbers), CSV (physical lines, header = 1), Parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv_rows(path)
    if suffix in (".parquet", ".pq"):
        return read_parquet_rows(path)
    raise ValueError(f"generic adapter: cannot read {path}: expected a .jsonl, .csv or .parquet file")


def format_generic_options(choices: list[str]) -> str:
    """The `options` field: empty without choices, else a lettered list under an "Options:" line, where
    only the option texts count towards saliency (the header and letters are scaffolding)."""
    if not choices:
        return ""
    return SpannedText.from_pieces([("\nOptions:\n", False), *lettered_option_pieces(choices, LETTERS)])


def as_text(value: Any, field: str) -> str:
    """A scalar cell as text (numbers as written, 5.0 as "5"); lists and dicts are malformed here."""
    if isinstance(value, bool):
        return "yes" if value else "no"  # the yes_no policy's gold form
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise MalformedRow(field, "empty" if isinstance(value, str) else f"expected text, got {type(value).__name__}")


def parse_choices(value: Any, field: str) -> list[str]:
    """A list of non-empty strings, given as a list or as a JSON list in a string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise MalformedRow(field, f"expected a list or a JSON list, got invalid JSON ({error.msg})") from None
    if not isinstance(value, list) or not value:
        raise MalformedRow(field, f"expected a non-empty list, got {type(value).__name__}")
    if len(value) > len(LETTERS):
        raise MalformedRow(field, f"at most {len(LETTERS)} choices, got {len(value)}")
    return [as_text(choice, field) for choice in value]


def parse_index(value: Any, field: str) -> int:
    """A 0-based index: an int, or the digits of one (CSV cells are text)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise MalformedRow(field, f"expected a 0-based integer index, got {value!r}")


class Generic(Adapter):
    name = "generic"
    category = "Other"
    description = "Any local JSONL/CSV/Parquet file, mapped onto items by its options."

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        if not self.options.get("file"):
            raise ValueError("generic adapter: option 'file' (the data file) is required")
        scoring = self.options.get("scoring")
        if scoring not in SCORING_POLICIES:
            raise ValueError(f"generic adapter: option 'scoring' must be one of {', '.join(SCORING_POLICIES)}, "
                             f"got {scoring!r}")
        self.scoring: str = scoring
        self.generates = self.scoring in GENERATION_POLICIES
        columns = dict(self.options.get("columns") or {})
        unknown = sorted(set(columns) - set(ROLES))
        if unknown:
            raise ValueError(f"generic adapter: unknown column role(s) {unknown}; known: {', '.join(ROLES)}")
        columns.setdefault("question", "question")
        self.columns: dict[str, str] = columns
        # The class attribute is the registry default; an instance may belong to another category.
        self.category = self.options.get("category", "Other")
        if self.category not in CATEGORIES:
            raise ValueError(f"generic adapter: category must be one of {', '.join(CATEGORIES)}, got {self.category!r}")
        self.id_prefix = str(self.options.get("id_prefix", "generic-"))

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        path = Path(self.options["file"])
        path = path if path.is_absolute() else data_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"generic adapter: data file {path} does not exist")
        return read_rows(path)

    def cell(self, record: dict[str, Any], role: str) -> Any:
        """The value of `role`'s column, or None when the role is unmapped or the cell is empty."""
        column = self.columns.get(role)
        if column is None:
            return None
        value = record.get(column)
        return None if isinstance(value, str) and not value.strip() else value

    def to_item(self, row: SourceRow) -> Item:
        record = row.record
        question = require(record, self.columns["question"]).strip()
        choices = None
        if "choices" in self.columns:
            choices = parse_choices(require(record, self.columns["choices"], (str, list)), self.columns["choices"])
        gold_index, gold = self.gold(record, choices)
        subset = self.cell(record, "subset")
        return Item(
            item_id=self.item_id(row),
            fields={"question": question, "options": format_generic_options(choices or [])},
            scoring=self.scoring,
            gold=gold,
            choices=choices,
            gold_index=gold_index,
            subset=None if subset is None else as_text(subset, self.columns["subset"]),
            metadata={"file": Path(row.file).name, "line": row.line},
        )

    def item_id(self, row: SourceRow) -> str:
        if "id" not in self.columns:
            return f"{self.id_prefix}{row.line}"
        return as_text(require(row.record, self.columns["id"], (str, int)), self.columns["id"])

    def gold(self, record: dict[str, Any], choices: list[str] | None) -> tuple[int | None, str | None]:
        """(gold_index, gold) for this item under the configured policy."""
        gold_index = self.gold_index(record, choices)
        if self.scoring in LOGLIK_POLICIES:
            if choices is None:
                raise MalformedRow(self.columns.get("choices", "choices"), f"scoring {self.scoring} needs choices")
            if gold_index is None and "answer" not in self.columns and "gold_index" in self.columns:
                raise MalformedRow(self.columns["gold_index"], "missing")
            if gold_index is None:
                answer = self.answer(record)
                if answer not in choices:
                    raise MalformedRow(self.columns.get("answer", "answer"),
                                       f"the answer {answer!r} is not one of the choices (and no gold_index column)")
                gold_index = choices.index(answer)
            return gold_index, choices[gold_index]
        if self.scoring == "option_letter" and gold_index is not None:
            return gold_index, LETTERS[gold_index]
        return gold_index, self.answer(record)

    def gold_index(self, record: dict[str, Any], choices: list[str] | None) -> int | None:
        """The gold_index cell checked against the choices (None when unmapped or empty)."""
        column = self.columns.get("gold_index")
        value = self.cell(record, "gold_index")
        if column is None or value is None:
            return None
        index = parse_index(value, column)
        if choices is None or not 0 <= index < len(choices):
            raise MalformedRow(column, f"gold index {index} is not among the {len(choices or [])} choices")
        return index

    def answer(self, record: dict[str, Any]) -> str | None:
        """The answer cell as gold text, a list of acceptable answers as a JSON list; missing is malformed
        unless the policy needs no gold (judge, none)."""
        column = self.columns.get("answer", "answer")
        value = self.cell(record, "answer")
        if value is None:
            if self.scoring in ANSWER_OPTIONAL:
                return None
            raise MalformedRow(column, "missing" if "answer" in self.columns else
                               f"scoring {self.scoring} needs an answer column (columns.answer)")
        if isinstance(value, list):
            return json.dumps([as_text(v, column) for v in value], ensure_ascii=False)
        return as_text(value, column)
