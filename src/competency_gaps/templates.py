"""Zero-shot instruction templates (resources/prompt_templates.yaml) and where the item text lands in them."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

TEMPLATES_FILE = Path(__file__).resolve().parents[2] / "resources" / "prompt_templates.yaml"


class SpannedText(str):
    """A field value in which only `spans` (start, end) are the item's own text.

    Adapters build one when a value mixes item text with scaffolding (option letters, separators,
    headers) so that only the item's text counts towards concept saliency. It prints as plain text.
    """

    spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, spans: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> SpannedText:
        value = super().__new__(cls, text)
        value.spans = tuple((start, end) for start, end in spans if end > start)
        return value

    def __reduce__(self) -> tuple:  # str's default pickling would drop the spans
        return SpannedText, (str(self), self.spans)

    @classmethod
    def from_pieces(cls, pieces: list[tuple[str, bool]]) -> SpannedText:
        """Concatenate (text, is_item_text) pieces; the spans cover the item-text pieces."""
        spans, cursor = [], 0
        for text, is_item_text in pieces:
            if is_item_text:
                spans.append((cursor, cursor + len(text)))
            cursor += len(text)
        return cls("".join(text for text, _ in pieces), spans)


@dataclass(frozen=True)
class RenderedPrompt:
    """Chat messages plus the character spans (message index, start, end) that hold the item's own text."""

    messages: list[dict[str, str]]
    field_spans: list[tuple[int, int, int]]


@cache
def load_templates(path: Path = TEMPLATES_FILE) -> dict[str, dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def template_for(name: str, path: Path = TEMPLATES_FILE) -> dict[str, str]:
    templates = load_templates(path)
    if name not in templates:
        raise KeyError(f"no prompt template named {name!r} in {path}")
    return templates[name]


def value_spans(raw: str, value: str) -> list[tuple[int, int]]:
    """The item-text spans within one substituted value: a SpannedText's own spans, else the whole value."""
    if isinstance(raw, SpannedText) and str(raw) == value:  # a format spec that changed the text voids them
        return list(raw.spans)
    return [(0, len(value))] if value else []


def fill_with_spans(template: str, fields: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """Format `template` with `fields`, returning the text and the (start, end) spans of the item's text in it
    (each substituted field, or the inner spans of a SpannedText field)."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for literal, field_name, format_spec, conversion in string.Formatter().parse(template):
        pieces.append(literal)
        cursor += len(literal)
        if field_name is None:
            continue
        if field_name not in fields:
            raise KeyError(f"template field {{{field_name}}} has no value (item fields: {', '.join(sorted(fields))})")
        value = format(fields[field_name], format_spec or "")
        if conversion:
            raise ValueError("conversions (!r, !s) are not supported in prompt templates")
        pieces.append(value)
        spans += [(cursor + start, cursor + end) for start, end in value_spans(fields[field_name], value)]
        cursor += len(value)
    return "".join(pieces), spans


def render_prompt(template: dict[str, str], fields: dict[str, str]) -> RenderedPrompt:
    """Build the chat messages for one item from its template (`system` optional, `user` required)."""
    messages: list[dict[str, str]] = []
    if template.get("system"):
        messages.append({"role": "system", "content": template["system"]})
    text, spans = fill_with_spans(template["user"], fields)
    messages.append({"role": "user", "content": text})
    user_index = len(messages) - 1
    return RenderedPrompt(messages, [(user_index, start, end) for start, end in spans])
