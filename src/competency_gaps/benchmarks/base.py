"""The contract every benchmark adapter fulfils, and the normalised item it produces.

An adapter turns a benchmark's official release files (or the same benchmark on the Hugging Face hub)
into `Item`s. It never scores, never tokenises and never formats the final prompt text by hand: the
prompt is its instruction template (``resources/prompt_templates.yaml``) filled with the item's
``fields``; the model's chat template is applied later, by the model that reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Scoring policies: how a per-item score p_i in [0, 1] is obtained (see competency_gaps.scoring).
# Log-likelihood policies compare candidate continuations; generation policies decode greedily and
# extract an answer from the response; "none" marks a coverage-only item (χ_model is N/A).
LOGLIK_POLICIES = ("mc_loglik", "pair_loglik")
GENERATION_POLICIES = ("numeric_match", "boxed_equiv", "short_answer_match", "short_answer_contains", "option_letter", "yes_no", "judge")
SCORING_POLICIES = LOGLIK_POLICIES + GENERATION_POLICIES + ("none",)

CATEGORIES = ("Math", "Reasoning", "Factuality", "Ethics & Bias", "Probe", "Other")


class MalformedRow(ValueError):
    """A source row that cannot become an item; `field` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class SourceRow:
    """One raw record and where it came from, so errors can name the file and line."""

    file: str
    line: int  # 1-based line (JSONL/CSV data line) or record index for single-document files
    record: dict[str, Any]


@dataclass
class Item:
    """One normalised benchmark item.

    `fields` fill the adapter's instruction template. For log-likelihood policies `choices` are the
    candidate continuations and `gold_index` the correct one; `choice_contexts`, when set, replaces the
    chat prompt as the context of each candidate (raw sentence scoring, e.g. CrowS-Pairs).
    """

    item_id: str
    fields: dict[str, str]
    scoring: str
    gold: str | None = None
    choices: list[str] | None = None
    gold_index: int | None = None
    choice_contexts: list[str] | None = None
    subset: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_POLICIES:
            raise ValueError(f"unknown scoring policy {self.scoring!r}; known: {', '.join(SCORING_POLICIES)}")
        if self.scoring in LOGLIK_POLICIES:
            if not self.choices or self.gold_index is None or not 0 <= self.gold_index < len(self.choices):
                raise MalformedRow("choices", "log-likelihood scoring needs choices and a gold index inside them")
        if self.choice_contexts is not None and len(self.choice_contexts) != len(self.choices or []):
            raise MalformedRow("choices", "choice_contexts must have one context per choice")

    def metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True, ensure_ascii=False)


class Adapter:
    """Base class: subclasses set the class attributes and implement `local_rows` and `to_item`.

    `hub_rows` is optional: adapters whose benchmark exists on the Hugging Face hub map the hub's
    records onto the official release's field names there, so one `to_item` serves both sources.
    """

    name: ClassVar[str]
    category: ClassVar[str]
    description: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True  # False for benchmarks the adapter generates itself (probes)
    # Are (some of) its items scored by decoding a response? Those are the longest evaluation jobs, which the
    # workflow starts first. Adapters with a configurable policy set it from their options.
    generates: bool = False

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = dict(options or {})

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        raise NotImplementedError

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        raise NotImplementedError(f"adapter {self.name!r} has no Hugging Face hub source; use data_dir")

    def to_item(self, row: SourceRow) -> Item:
        raise NotImplementedError


def require(record: dict[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return record[key], raising MalformedRow naming the field when it is missing or of the wrong type."""
    if key not in record or record[key] is None:
        raise MalformedRow(key, "missing")
    value = record[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise MalformedRow(key, f"expected {expected}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise MalformedRow(key, "empty")
    return value


ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8
SURROGATE = re.compile("[\ud800-\udfff]")


def undecodable(text: str) -> str | None:
    """Why `text` (read with errors="surrogateescape") is not UTF-8: the first offending byte and its column."""
    found = ESCAPED_BYTE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return f"not valid UTF-8 (byte 0x{byte:02x} at column {found.start() + 1}); save the file as UTF-8"


def read_jsonl(path: Path) -> Iterator[SourceRow]:
    """Yield one SourceRow per non-blank line; a line that is not UTF-8 or not a JSON object is a malformed row."""
    # -sig: json rejects a leading byte-order mark; surrogateescape: a stray byte rejects its line, not the file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            problem = undecodable(text)
            if problem:
                yield SourceRow(str(path), number, {"__error__": problem})
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield SourceRow(str(path), number, {"__error__": f"invalid JSON: {error.msg}"})
                continue
            if not isinstance(record, dict):
                yield SourceRow(str(path), number, {"__error__": "line is not a JSON object"})
                continue
            if has_lone_surrogate(record):  # a \ud800-style escape: no text, and Arrow cannot store it
                yield SourceRow(str(path), number, {"__error__": "a string holds a lone surrogate (an invalid \\u escape)"})
                continue
            yield SourceRow(str(path), number, record)


def has_lone_surrogate(value: Any) -> bool:
    """True when a string anywhere in a parsed JSON value holds a surrogate code point (U+D800..U+DFFF)."""
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogate(key) or has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(item) for item in value)
    return False


def hub_records(hub: dict[str, Any]) -> Iterator[SourceRow]:
    """Records of a Hugging Face hub dataset (`path`, optional `name`, `split`, `revision`), as SourceRows."""
    import datasets  # heavy; only when a hub source is used

    dataset = datasets.load_dataset(
        hub["path"], hub.get("name"), split=hub.get("split", "test"), revision=hub.get("revision")
    )
    label = f"hub:{hub['path']}" + (f"/{hub['name']}" if hub.get("name") else "") + f"[{hub.get('split', 'test')}]"
    for index, record in enumerate(dataset):
        yield SourceRow(label, index + 1, dict(record))
