"""Per-item scoring policies for generated responses: answer extraction and comparison with the gold.

Every scorer takes the model's response and the item (a row of the items table as a dict: `gold`,
`choices`, `gold_index`, `metadata`, …) and returns `Scored(score, prediction)`, with `score` the
per-item p_i in [0, 1] and `prediction` the extracted answer (None when none could be extracted,
which scores 0). Log-likelihood policies are scored in competency_gaps.evaluate, not here.

Policies: numeric_match (GSM8K), boxed_equiv (MATH), short_answer_match (NQ-open), option_letter,
yes_no (LogicBench BQA) and judge (open-ended output; no judge ships offline, so such items score
None — coverage-only, χ_model N/A — unless a function is registered in JUDGES and named).
"""

from __future__ import annotations

import json
import importlib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scored:
    score: float | None
    prediction: str | None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """A number written as text ("1,234", "-3.50", "$12") as a float, or None."""
    match = _NUMBER.search(text.replace("$", ""))
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def extract_final_number(response: str) -> str | None:
    """The final numeric answer: after an "Answer:"/"####"/"answer is" marker if present, else the last number."""
    for marker in (r"####", r"answer\s*(?:is|:)", r"\\boxed\{"):
        parts = re.split(marker, response, flags=re.IGNORECASE)
        if len(parts) > 1:
            numbers = _NUMBER.findall(parts[-1])
            if numbers:
                return numbers[0].replace(",", "")
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def score_numeric_match(response: str, item: dict[str, Any]) -> Scored:
    prediction = extract_final_number(response)
    gold = parse_number(item["gold"] or "")
    if prediction is None or gold is None:
        return Scored(0.0, prediction)
    value = parse_number(prediction)
    return Scored(float(value is not None and abs(value - gold) < 1e-6 * max(1.0, abs(gold))), prediction)


# --- boxed_equiv: MATH final answers --------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced, or None."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1].end()
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None  # unbalanced: the response was cut off inside the box


def extract_math_answer(response: str) -> str | None:
    """The final answer of a maths response: last \\boxed{}, else the text after "answer is"/"Answer:"
    on its line, else the last $...$ expression, else the last number."""
    response = response.replace("\\$", "")  # an escaped dollar is currency, not a math delimiter
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    marked = re.findall(r"answer\s*(?:is|:)\s*:?\s*(.+)", response, flags=re.IGNORECASE)
    if marked:
        inline = re.search(r"\$([^$]+)\$", marked[-1])
        # The first math span after the marker, else the marker's sentence ("3.5" is no sentence end).
        return inline.group(1).strip() if inline else re.split(r"\.(?:\s|$)", marked[-1])[0].strip()
    inline = re.findall(r"\$([^$]+)\$", response)
    if inline:
        return inline[-1].strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


_UNIT_WORDS = (
    r"units?|square\s+units?|sq\s+units?|cm|centimeters?|meters?|m|km|kilometers?|inches|inch|in|feet|foot|ft|"
    r"yards?|miles?|mph|degrees?|dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|years?|people|students?|"
    r"cubic\s+\w+|square\s+\w+"
)


def _unwrap_command(text: str, command: str) -> str:
    """Replace \\command{X} by X (balanced braces), for \\text, \\mbox, \\mathrm and friends."""
    pattern = re.compile(rf"\\{command}\s*\{{")
    while (match := pattern.search(text)) is not None:
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        inner = text[match.end() : end - 1] if depth == 0 else text[match.end() :]
        text = text[: match.start()] + inner + text[end:]
    return text


def normalize_latex(answer: str) -> str:
    """A canonical form of a LaTeX final answer, so that trivially different writings compare equal."""
    text = answer.strip().replace("\\$", "").replace("$", "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)
    text = re.sub(r"\\[!,;: ]", "", text)  # LaTeX spacing commands
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|\\%|%", "", text)
    # A unit written in \text{...} after a value goes; other \text{} is kept as its content.
    text = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*(?:" + _UNIT_WORDS + r")\s*(?:\^\s*\{?[23]\}?)?\s*\}", "", text)
    for command in ("text", "textbf", "mbox", "mathrm", "mathbf", "boxed"):
        text = _unwrap_command(text, command)
    text = re.sub(r"(?<=\d)\s+(?:" + _UNIT_WORDS + r")(?:\^\s*\{?[23]\}?)?\s*$", "", text)  # bare unit words
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text.strip())  # "x = 5" -> "5"
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12
    text = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", text)  # \frac{1}2
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)  # \sqrt3
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):  # thousands separators
        text = text.replace(",", "")
    return re.sub(r"(?<![\d])\.(\d)", r"0.\1", text)  # ".5" -> "0.5"


def latex_number(text: str) -> float | None:
    """The value of a normalised answer that is a plain number, a/b, or \\frac{a}{b} (with sign), else None."""
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}|(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", text)
    try:
        if match and match.group(2) is not None:
            value = float(match.group(2)) / float(match.group(3))
            return -value if match.group(1) else value
        if match:
            return float(match.group(4)) / float(match.group(5))
        return float(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None
    except ZeroDivisionError:
        return None


def math_equivalent(prediction: str, gold: str) -> bool:
    """Equal after LaTeX normalisation, or equal as numbers when both read as numbers or simple fractions."""
    a, b = normalize_latex(prediction), normalize_latex(gold)
    if a == b:
        return True
    x, y = latex_number(a), latex_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def score_boxed_equiv(response: str, item: dict[str, Any]) -> Scored:
    prediction = extract_math_answer(response)
    if prediction is None or not item.get("gold"):
        return Scored(0.0, prediction)
    return Scored(float(math_equivalent(prediction, item["gold"])), prediction)


# --- short_answer_match: open-domain QA (Natural Questions) ----------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(" " if char in string.punctuation else char for char in text.lower())
    text = re.sub(r"\b(?:a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_short_answer(response: str) -> str:
    """The first line's first sentence, without an "Answer:"/"The answer is" lead-in."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = re.sub(r"^\**\s*(?:final\s+)?answer\s*:\**\s*|^the\s+answer\s+is\s*:?\s*", "", first, flags=re.IGNORECASE)
    sentence = re.split(r"(?<=[^\d\s][.!?])\s", first, maxsplit=1)[0]  # "3.5" is not a sentence end
    return sentence.strip().rstrip(".!?").strip()


def gold_answers(item: dict[str, Any]) -> list[str]:
    """The acceptable answers: `gold` holds a JSON list (a bare string counts as a one-answer list)."""
    gold = item.get("gold") or ""
    try:
        answers = json.loads(gold)
    except json.JSONDecodeError:
        answers = gold
    return [answers] if isinstance(answers, str) else [str(answer) for answer in answers]


def score_short_answer_match(response: str, item: dict[str, Any]) -> Scored:
    """1 if the extracted short answer equals a gold answer after SQuAD normalisation, or if a normalised
    gold answer occurs as whole words inside the normalised short answer (the first sentence of the first
    line): models often answer in a sentence ("He was born in 1952.") rather than with the bare span."""
    prediction = extract_short_answer(response)
    said = normalize_answer(prediction)
    golds = [g for g in (normalize_answer(answer) for answer in gold_answers(item)) if g]
    if not said:
        return Scored(0.0, None)
    hit = any(said == gold or re.search(rf"(?:^| ){re.escape(gold)}(?: |$)", said) for gold in golds)
    return Scored(float(hit), prediction)


# --- option_letter and yes_no ------------------------------------------------------------------------

_LETTER_PATTERNS = (
    r"answer\s*(?:is|:)\s*:?\s*(?:option\s*)?\**\(?([A-E])\)?(?![a-zA-Z])",  # "Answer: B", "the answer is (C)."
    r"^\s*\**\(?([A-E])\)?(?:[.:)\s*]|$)",  # response starts with "B." / "(B)" / "B"
    r"\(([A-E])\)",  # first "(B)" anywhere
    r"\boption\s+([A-E])\b",
)


def extract_option_letter(response: str) -> str | None:
    """The option letter A–E a generated answer chooses, or None."""
    for index, pattern in enumerate(_LETTER_PATTERNS):
        matches = re.findall(pattern, response, flags=re.IGNORECASE if index in (0, 3) else 0)
        if matches:
            return (matches[-1] if index == 0 else matches[0]).upper()
    return None


def score_option_letter(response: str, item: dict[str, Any]) -> Scored:
    prediction = extract_option_letter(response)
    gold = (item.get("gold") or "").strip().upper()
    return Scored(float(prediction is not None and prediction == gold), prediction)


def extract_yes_no(response: str) -> str | None:
    """The first standalone "yes" or "no" in the response, lower-cased."""
    match = re.search(r"\b(yes|no)\b", response, flags=re.IGNORECASE)
    return match.group(1).lower() if match else None


def score_yes_no(response: str, item: dict[str, Any]) -> Scored:
    prediction = extract_yes_no(response)
    return Scored(float(prediction is not None and prediction == (item.get("gold") or "").strip().lower()), prediction)


# --- judge -----------------------------------------------------------------------------------------

# Pluggable judges for open-ended outputs (e.g. a summary's factual consistency with its source):
# name -> function(response, item) returning p_i in [0, 1]. None ships offline, so "judge" items are
# coverage-only by default (score None, χ_model N/A) unless a judge is registered and named.
JUDGES: dict[str, Callable[[str, dict[str, Any]], float]] = {}


def resolve_judge(judge: str) -> Callable[[str, dict[str, Any]], float]:
    """A judge registered in JUDGES, or any importable "package.module:function"."""
    if judge in JUDGES:
        return JUDGES[judge]
    if ":" in judge:
        module, function = judge.split(":", 1)
        return getattr(importlib.import_module(module), function)
    raise KeyError(f"no judge named {judge!r}; registered: {', '.join(sorted(JUDGES)) or 'none'} (or give module:function)")


def score_judge(response: str, item: dict[str, Any], judge: str | None = None) -> Scored:
    if judge is None:
        return Scored(None, None)
    score = float(resolve_judge(judge)(response, item))
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"judge {judge!r} returned {score} for item {item.get('item_id')}; expected a value in [0, 1]")
    return Scored(score, None)


GENERATION_SCORERS: dict[str, Callable[[str, dict[str, Any]], Scored]] = {
    "numeric_match": score_numeric_match,
    "boxed_equiv": score_boxed_equiv,
    "short_answer_match": score_short_answer_match,
    "option_letter": score_option_letter,
    "yes_no": score_yes_no,
    "judge": score_judge,
}


def score_generation(policy: str, response: str, item: dict[str, Any], judge: str | None = None) -> Scored:
    """Score one generated response under `policy`; `judge` names a JUDGES entry for the "judge" policy."""
    if policy not in GENERATION_SCORERS:
        raise KeyError(f"no scorer for generation policy {policy!r}; known: {', '.join(sorted(GENERATION_SCORERS))}")
    if policy == "judge":
        return score_judge(response, item, judge)
    return GENERATION_SCORERS[policy](response, item)
