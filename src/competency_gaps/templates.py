"""Zero-shot instruction templates (resources/prompt_templates.yaml) and where the item text lands in them."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

TEMPLATES_FILE = Path(__file__).resolve().parents[2] / "resources" / "prompt_templates.yaml"


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


def fill_with_spans(template: str, fields: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """Format `template` with `fields`, returning the text and the (start, end) span of each substituted field."""
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
        if value:
            spans.append((cursor, cursor + len(value)))
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
