"""Per-item scoring policies for generated responses: answer extraction and comparison with the gold.

Every scorer takes the model's response and the item (a row of the items table as a dict: `gold`,
`choices`, `gold_index`, `metadata`, …) and returns `Scored(score, prediction)`, with `score` the
per-item p_i in [0, 1] and `prediction` the extracted answer (None when none could be extracted,
which scores 0). Log-likelihood policies are scored in competency_gaps.evaluate, not here.

Policies: numeric_match (GSM8K), boxed_equiv (MATH), short_answer_match (NQ-open: SQuAD-normalised
exact match of the short answer), short_answer_contains (the same, or a gold answer as whole words inside
the short answer; opt-in), option_letter (an upper-case letter among the item's choices), yes_no
(LogicBench BQA) and judge (open-ended output; no judge ships offline, so such items score None —
coverage-only, χ_model N/A — unless a function is registered in JUDGES and named).

A response cut off at the generation limit (`score_generation(..., cut_off=True)`) scores under
numeric_match and boxed_equiv only through an explicit answer marker ("####", "answer is", "Answer:",
\\boxed{}): its last number or expression is where decoding stopped, not an answer.
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


def extract_final_number(response: str, require_marker: bool = False) -> str | None:
    """The final numeric answer: the first number after the last "####"/"answer is"/"Answer:"/"\\boxed{"
    marker, else the last number, or None with `require_marker` (for cut-off responses)."""
    for marker in (r"####", r"answer\s*(?:is|:)", r"\\boxed\{"):
        parts = re.split(marker, response, flags=re.IGNORECASE)
        if len(parts) > 1:
            numbers = _NUMBER.findall(parts[-1])
            if numbers:
                return numbers[0].replace(",", "")
    if require_marker:
        return None
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def score_numeric_match(response: str, item: dict[str, Any], require_marker: bool = False) -> Scored:
    prediction = extract_final_number(response, require_marker)
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


def extract_math_answer(response: str, require_marker: bool = False) -> str | None:
    """The final answer of a maths response: last \\boxed{}, else the text after "answer is"/"Answer:"
    on its line, else the last $...$ expression, else the last number; with `require_marker` (for
    cut-off responses) only a box or an "answer is"/"Answer:" marker counts, else None."""
    response = response.replace("\\$", "")  # an escaped dollar is currency, not a math delimiter
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    marked = re.findall(r"answer\s*(?:is|:)\s*:?\s*(.+)", response, flags=re.IGNORECASE)
    if marked:
        inline = re.search(r"\$([^$]+)\$", marked[-1])
        # The first math span after the marker, else the marker's sentence ("3.5" is no sentence end).
        return inline.group(1).strip() if inline else re.split(r"\.(?:\s|$)", marked[-1])[0].strip()
    if require_marker:
        return None
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


def score_boxed_equiv(response: str, item: dict[str, Any], require_marker: bool = False) -> Scored:
    prediction = extract_math_answer(response, require_marker)
    if prediction is None or not item.get("gold"):
        return Scored(0.0, prediction)
    return Scored(float(math_equivalent(prediction, item["gold"])), prediction)


# --- short_answer_match: open-domain QA (Natural Questions) ----------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(" " if char in string.punctuation else char for char in text.lower())
    text = re.sub(r"\b(?:a|an|the)\b", " ", text)
    return " ".join(text.split())


# Words whose trailing period does not end a sentence (lower-case, without that period).
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "jr", "sr", "vs"})


def _ends_in_abbreviation(text: str) -> bool:
    """Whether the last word of `text` (just before a period) is an abbreviation: a listed title, an initial
    ("J" of "J. K. Rowling") or dotted letters ("e.g", "i.e", "U.S")."""
    words = text.split()
    word = words[-1].lstrip("(\"'") if words else ""
    return word.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]|(?:[A-Za-z]\.)+[A-Za-z]", word) is not None


def first_sentence(text: str) -> str:
    """`text` up to the first ".", "!" or "?" followed by whitespace (so "3.5" goes on) that does not
    close an abbreviation ("Dr. Seuss"), without that punctuation."""
    for end in re.finditer(r"[.!?](?=\s)", text):
        if end.group() != "." or not _ends_in_abbreviation(text[: end.start()]):
            return text[: end.start()]
    return text


def extract_short_answer(response: str) -> str:
    """The first line's first sentence, without an "Answer:"/"The answer is" lead-in."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = re.sub(r"^\**\s*(?:final\s+)?answer\s*:\**\s*|^the\s+answer\s+is\s*:?\s*", "", first, flags=re.IGNORECASE)
    return first_sentence(first).strip().rstrip(".!?").strip()


def gold_answers(item: dict[str, Any]) -> list[str]:
    """The acceptable answers: `gold` holds a JSON list (a bare string counts as a one-answer list)."""
    gold = item.get("gold") or ""
    try:
        answers = json.loads(gold)
    except json.JSONDecodeError:
        answers = gold
    return [answers] if isinstance(answers, str) else [str(answer) for answer in answers]


def normalized_golds(item: dict[str, Any]) -> list[str]:
    """The item's gold answers after SQuAD normalisation, empty ones dropped."""
    return [gold for gold in (normalize_answer(answer) for answer in gold_answers(item)) if gold]


def score_short_answer_match(response: str, item: dict[str, Any]) -> Scored:
    """NQ-open's standard metric: 1 if the extracted short answer (the first sentence of the first line)
    equals a gold answer after SQuAD normalisation."""
    prediction = extract_short_answer(response)
    said = normalize_answer(prediction)
    if not said:
        return Scored(0.0, None)
    return Scored(float(said in normalized_golds(item)), prediction)


def score_short_answer_contains(response: str, item: dict[str, Any]) -> Scored:
    """Lenient, opt-in: as short_answer_match, or a normalised gold answer occurs as whole words inside the
    normalised short answer, for models that answer in a sentence ("He was born in 1952."). It also
    accepts an answer that names the gold only to reject it ("Not Paris, it is Lyon." for "Paris")."""
    prediction = extract_short_answer(response)
    said = normalize_answer(prediction)
    if not said:
        return Scored(0.0, None)
    hit = any(said == gold or re.search(rf"(?:^| ){re.escape(gold)}(?: |$)", said) for gold in normalized_golds(item))
    return Scored(float(hit), prediction)


# --- option_letter and yes_no ------------------------------------------------------------------------

def letter_patterns(n_choices: int) -> tuple[str, ...]:
    """Where a chosen letter stands, in order of trust. Only upper-case letters among the first `n_choices`
    count ("a bit", "e.g." are words); the lead-in words match in any case."""
    last = string.ascii_uppercase[max(1, min(n_choices, 26)) - 1]
    letter = f"([A-{last}])"
    return (
        rf"(?i:answer\s*(?:is|:))\s*:?\s*(?:(?i:option)\s*)?\**\(?{letter}\)?(?![a-zA-Z])",  # "Answer: B", "the answer is (C)."
        rf"^\s*\**\(?{letter}\)?(?:[.:)\s*]|$)",  # response starts with "B." / "(B)" / "B"
        rf"\({letter}\)",  # first "(B)" anywhere
        rf"\b(?i:option)\s+{letter}\b",
    )


def _is_english_word(response: str, match: re.Match[str]) -> bool:
    """A bare "A" or "I" followed by a lower-case word is the English word ("Answer: A lot of people")."""
    return match.group(1) in ("A", "I") and re.match(r" +[a-z]", response[match.end(1) :]) is not None


def extract_option_letter(response: str, n_choices: int = 5) -> str | None:
    """The option letter (A.. the `n_choices`-th letter) a generated answer chooses, or None."""
    for index, pattern in enumerate(letter_patterns(n_choices)):
        letters = [m.group(1) for m in re.finditer(pattern, response) if not _is_english_word(response, m)]
        if letters:
            return letters[-1] if index == 0 else letters[0]  # the last "answer is", else the first mark
    return None


def choice_count(item: dict[str, Any]) -> int:
    """How many options the item offers; 5 (A–E) when it lists none."""
    choices = item.get("choices")
    return len(choices) if choices is not None and len(choices) > 0 else 5


def score_option_letter(response: str, item: dict[str, Any]) -> Scored:
    prediction = extract_option_letter(response, choice_count(item))
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
    "short_answer_contains": score_short_answer_contains,
    "option_letter": score_option_letter,
    "yes_no": score_yes_no,
    "judge": score_judge,
}


# Policies whose extractors fall back to the response's last number/expression when no marker is found.
MARKER_POLICIES = ("numeric_match", "boxed_equiv")


def score_generation(policy: str, response: str, item: dict[str, Any], judge: str | None = None,
                     cut_off: bool = False) -> Scored:
    """Score one generated response under `policy`; `judge` names a JUDGES entry for the "judge" policy.
    `cut_off`: the response stopped at max_new_tokens, so numeric_match and boxed_equiv need an answer
    marker (its last number is wherever decoding stopped); other policies ignore it."""
    if policy not in GENERATION_SCORERS:
        raise KeyError(f"no scorer for generation policy {policy!r}; known: {', '.join(sorted(GENERATION_SCORERS))}")
    if policy == "judge":
        return score_judge(response, item, judge)
    if policy in MARKER_POLICIES:
        return GENERATION_SCORERS[policy](response, item, require_marker=cut_off)
    return GENERATION_SCORERS[policy](response, item)
