"""Per-item scoring policies for generated responses: answer extraction and comparison with the gold.

Every scorer takes the model's response and the item (a row of the items table as a dict: `gold`,
`choices`, `gold_index`, `metadata`, …) and returns `Scored(score, prediction)`, with `score` the
per-item p_i in [0, 1] and `prediction` the extracted answer (None when none could be extracted,
which scores 0). Log-likelihood policies are scored in competency_gaps.evaluate, not here.
"""

from __future__ import annotations

import re
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


GENERATION_SCORERS: dict[str, Callable[[str, dict[str, Any]], Scored]] = {
    "numeric_match": score_numeric_match,
}


def score_generation(policy: str, response: str, item: dict[str, Any]) -> Scored:
    """Score one generated response under `policy`."""
    if policy not in GENERATION_SCORERS:
        raise KeyError(f"no scorer for generation policy {policy!r}; known: {', '.join(sorted(GENERATION_SCORERS))}")
    return GENERATION_SCORERS[policy](response, item)
