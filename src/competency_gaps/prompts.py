"""Chat-template rendering of an item's messages, and which tokens count towards concept saliency.

The model's chat template is applied to the stored messages; the characters that hold the counted text
(the item's own fields, all message contents, or everything) are located in the rendered string, and a
token counts when its character span overlaps them. BOS/special tokens, the template's scaffolding and
any default system prompt it inserts therefore drop out by construction, for any template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOKEN_MODES = ("fields", "content", "all")


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    counted: list[bool]  # per token: does it count towards s_i^c
    truncated: bool = False


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the configured system message unless the item brings its own."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """The prompt text ending where the assistant's answer starts, and each message's content offset in it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a chat template: the contents, blank-line separated
        text = "\n\n".join(message["content"] for message in messages) + "\n\n"
    offsets: list[int] = []
    cursor = 0
    for index, message in enumerate(messages):
        position = text.find(message["content"], cursor)
        if position < 0:
            raise ValueError(f"message {index} ({message['role']}) was altered by the chat template; cannot locate it")
        offsets.append(position)
        cursor = position + len(message["content"])
    return text, offsets


def counted_spans(messages: list[dict[str, str]], offsets: list[int], field_spans: list[dict[str, int]], mode: str) -> list[tuple[int, int]]:
    if mode == "fields":
        return [(offsets[s["message"]] + s["start"], offsets[s["message"]] + s["end"]) for s in field_spans]
    if mode == "content":
        return [(offset, offset + len(message["content"])) for offset, message in zip(offsets, messages)]
    raise ValueError(f"unknown token mode {mode!r}; expected one of {TOKEN_MODES}")


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(start < span_end and end > span_start for span_start, span_end in spans)


def encode_item(
    tokenizer: Any,
    item: dict[str, Any],
    mode: str = "fields",
    system_prompt: str | None = None,
    response: str | None = None,
    max_length: int | None = None,
) -> EncodedPrompt:
    """Token ids of one item's chat prompt (plus its response, if given) and the counted-token mask.

    Longer than `max_length`: the last `max_length` tokens are kept (the end holds the question and the
    assistant turn), and `truncated` is set.
    """
    messages = with_system_prompt(item["messages"], system_prompt)
    shift = len(messages) - len(item["messages"])
    text, offsets = render(tokenizer, messages)
    # Only the item's own messages count in "content" mode: an injected system prompt is the same on every item.
    spans = [] if mode == "all" else counted_spans(messages[shift:], offsets[shift:], item["field_spans"], mode)
    if response:
        spans.append((len(text), len(text) + len(response)))
        text += response
    has_template = bool(getattr(tokenizer, "chat_template", None))
    encoding = tokenizer(text, add_special_tokens=not has_template, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    counted = [True] * len(ids) if mode == "all" else [_overlaps(a, b, spans) for a, b in encoding["offset_mapping"]]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, counted = ids[-max_length:], counted[-max_length:]
    return EncodedPrompt(ids, counted, truncated)


def prompt_text(tokenizer: Any, item: dict[str, Any], system_prompt: str | None = None) -> str:
    """The rendered chat prompt that evaluation continues (same text the saliency is read from)."""
    return render(tokenizer, with_system_prompt(item["messages"], system_prompt))[0]
