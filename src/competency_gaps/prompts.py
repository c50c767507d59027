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


SYSTEM_SEPARATOR = "\n\n"  # between the configured system prompt and a template's own system text


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    counted: list[bool]  # per token: does it count towards s_i^c
    truncated: bool = False
    total_tokens: int = -1  # length of the whole prompt before truncation (-1: len(input_ids))

    def __post_init__(self) -> None:
        if self.total_tokens < 0:
            object.__setattr__(self, "total_tokens", len(self.input_ids))


def has_own_system_message(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and messages[0]["role"] == "system"


def system_prefix(system_prompt: str | None) -> str:
    """What the configured system prompt puts in front of a template's own system text."""
    return system_prompt + SYSTEM_SEPARATOR if system_prompt else ""


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The configured system prompt in front: merged into the item's own system message (configured text,
    a blank line, the template's text), or as a new system message (None: the chat template's default)."""
    if system_prompt is None:
        return list(messages)
    if has_own_system_message(messages):
        merged = {"role": "system", "content": system_prefix(system_prompt) + messages[0]["content"]}
        return [merged, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def item_offsets(messages: list[dict[str, str]], system_prompt: str | None, offsets: list[int]) -> list[int]:
    """Where each of the item's own message contents starts in the rendered text, given the offsets of the
    rendered messages: past an injected system message, and past the configured part of a merged one."""
    if system_prompt is None:
        return offsets
    if has_own_system_message(messages):
        return [offsets[0] + len(system_prefix(system_prompt)), *offsets[1:]]
    return offsets[1:]


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


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without its leading and trailing whitespace: a whitespace-only field is no item text, and
    a token that overlaps only the blank edge of a field (a line break, a space) is scaffolding."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


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

    Longer than `max_length`: see `truncate`; `truncated` is set and `total_tokens` keeps the full length.
    """
    messages = with_system_prompt(item["messages"], system_prompt)
    text, offsets = render(tokenizer, messages)
    # Only the item's own text counts in "content" mode: the configured system prompt is the same on every item.
    own_offsets = item_offsets(item["messages"], system_prompt, offsets)
    spans = [] if mode == "all" else counted_spans(item["messages"], own_offsets, item["field_spans"], mode)
    spans = [strip_span(text, start, end) for start, end in spans]
    if response:
        spans.append((len(text), len(text) + len(response)))
        text += response
    has_template = bool(getattr(tokenizer, "chat_template", None))
    encoding = tokenizer(text, add_special_tokens=not has_template, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    counted = [True] * len(ids) if mode == "all" else [_overlaps(a, b, spans) for a, b in encoding["offset_mapping"]]
    total = len(ids)
    if max_length is None or total <= max_length:
        return EncodedPrompt(ids, counted, False, total)
    ids, counted = truncate(ids, counted, head_length(counted, mode), max_length)
    return EncodedPrompt(ids, counted, True, total)


def head_length(counted: list[bool], mode: str) -> int:
    """Tokens a truncation must keep in front: those before the first counted token; in "all" mode, where
    every token counts, just the first (BOS or the chat header's first token)."""
    if mode == "all":
        return 1
    return counted.index(True) if any(counted) else 0


def truncate(ids: list[int], counted: list[bool], keep_head: int, max_length: int) -> tuple[list[int], list[bool]]:
    """Cut a prompt to `max_length` tokens: keep its first `keep_head` tokens and as many last tokens as fit.

    With keep_head = the tokens before the first counted one (BOS, chat header, system prompt,
    instruction), the first position stays the attention sink the SAE was trained with and the cut falls
    inside the item's own text, dropping its earliest tokens (its end holds the question; the tokens after
    it close the user turn and open the assistant's). When the head and the tail after the last counted
    token leave no room for a counted token, the last `max_length` tokens are kept instead.
    """
    tail = max_length - keep_head
    after_last_counted = counted[::-1].index(True) if any(counted) else len(counted)
    if keep_head == 0 or tail <= after_last_counted:
        return ids[-max_length:], counted[-max_length:]
    return ids[:keep_head] + ids[-tail:], counted[:keep_head] + counted[-tail:]


def prompt_text(tokenizer: Any, item: dict[str, Any], system_prompt: str | None = None) -> str:
    """The rendered chat prompt that evaluation continues (same text the saliency is read from)."""
    return render(tokenizer, with_system_prompt(item["messages"], system_prompt))[0]
