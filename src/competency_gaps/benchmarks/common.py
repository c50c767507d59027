"""Small helpers shared by several adapters (option lists, label files, CSV rows)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import MalformedRow, SourceRow, has_lone_surrogate, undecodable
from competency_gaps.templates import SpannedText

LETTERS = "ABCDE"


def lettered_option_pieces(texts: list[str], letters: str = LETTERS) -> list[tuple[str, bool]]:
    """"A. text" lines as (text, is_item_text) pieces: only the option texts are the item's own text."""
    pieces: list[tuple[str, bool]] = []
    for index, text in enumerate(texts):
        pieces += [("\n" if index else "", False), (f"{letters[index]}. ", False), (text, True)]
    return pieces


def format_options(texts: list[str]) -> SpannedText:
    """Options as "A. text" lines, the form every multiple-choice template shows; the letters and line
    breaks are scaffolding, so only the option texts count towards saliency."""
    return SpannedText.from_pieces(lettered_option_pieces(texts))


def option_texts(record: dict[str, Any], keys: list[str]) -> list[str]:
    """The stripped string values of `keys`, raising MalformedRow for a missing or empty one."""
    texts = []
    for key in keys:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise MalformedRow(key, "missing" if value is None else "expected a non-empty string")
        texts.append(value.strip())
    return texts


def read_label_lines(path: Path) -> list[str]:
    """One label per physical line (line i belongs to data line i); blank lines kept so numbering matches.
    A byte that is not UTF-8 stays in its line's label (as a surrogate escape), which the adapter then rejects."""
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # -sig: drop a BOM
    return [line.strip() for line in text.splitlines()]


def attach_labels(rows: Iterator[SourceRow], labels_path: Path, key: str = "label") -> Iterator[SourceRow]:
    """Zip data rows with a separate labels file by line number, storing the label under `key`.

    A data line with no label line gets no `key` (its adapter reports the field missing); labels left
    over after the data ran out are reported as malformed rows of the labels file.
    """
    labels = read_label_lines(labels_path)
    last_line = 0
    for row in rows:
        last_line = row.line
        if row.line <= len(labels) and labels[row.line - 1]:
            row.record.setdefault(key, labels[row.line - 1])
        yield row
    for number in range(last_line + 1, len(labels) + 1):
        if labels[number - 1]:
            yield SourceRow(str(labels_path), number, {"__error__": "label line with no matching data line"})


def counted_lines(handle: Iterator[str], counter: list[int]) -> Iterator[str]:
    """The handle's lines, counting them in counter[0] (csv's own line_num misses lines it failed on)."""
    for line in handle:
        counter[0] += 1
        yield line


def read_csv_rows(path: Path) -> Iterator[SourceRow]:
    """CSV records (header row gives the keys); `line` is the physical line where the record ends
    (quoted cells may span lines), and `__index__` the record's 0-based position among the data rows.
    utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would otherwise become part of the first column name.
    A record that is not UTF-8, has more cells than the header or that csv cannot parse (a cell longer than
    csv.field_size_limit()) is a malformed row; the reader goes on after it."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        lines = [0]
        reader = csv.DictReader(counted_lines(handle, lines))
        index = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield SourceRow(str(path), lines[0], {"__error__": f"unreadable CSV record: {error}"})
                continue
            problem = next(filter(None, (undecodable(str(cell)) for cell in record.values())), None)
            if problem or None in record:  # None: more cells than header columns
                yield SourceRow(str(path), lines[0], {"__error__": problem or "row has more cells than the header"})
            else:
                yield SourceRow(str(path), lines[0], {**record, "__index__": index})
            index += 1


def read_json_document(path: Path) -> dict[str, Any] | str:
    """A whole-file JSON object, or an error message for a malformed-row report."""
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # -sig: json rejects a leading BOM
    problem = undecodable(text)
    if problem:
        return problem
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        return f"invalid JSON: {error.msg}"
    if not isinstance(document, dict):
        return "file is not a JSON object"
    return "a string holds a lone surrogate (an invalid \\u escape)" if has_lone_surrogate(document) else document


def gold_from_letter(letter: Any, n_options: int, field: str = "label") -> int:
    """Index of an option letter ("A" → 0), checked against the number of options."""
    allowed = list(LETTERS[:n_options])
    if not isinstance(letter, str) or letter.strip().upper() not in allowed:
        raise MalformedRow(field, f"expected one of {', '.join(allowed)}, got {letter!r}")
    return allowed.index(letter.strip().upper())
