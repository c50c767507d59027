"""Built-in probe benchmarks the project generates itself: no data files, deterministic from options.

Every probe takes `seed` (default 0) and `n` (default 200) and draws its items from
`random.Random(seed)`, so the same options always give the same items. `local_rows` ignores the
data_dir a config names (configs still name one, e.g. ``data_dir: .``), and `hub_rows` ignores the
hub spec: both yield the generated rows. Rows hold the probe's parameters; `to_item` derives the
question and the gold answer from them, so every gold is correct by construction.

Probes: probe_arithmetic (numeric_match), probe_letter_count (numeric_match), probe_palindrome
(yes_no, balanced yes/no), probe_dates (mc_loglik over 4 candidate weekdays, dates or times).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, require
from competency_gaps.benchmarks.common import format_options
from competency_gaps.templates import SpannedText

# Real palindromes and near-misses (a letter added, dropped or swapped). Which is which is decided
# by s == s[::-1] at generation time, so a slip in these lists cannot produce a wrong gold.
PALINDROME_WORDS = (
    "level", "radar", "civic", "kayak", "refer", "rotor", "madam", "racecar", "noon", "deed", "stats",
    "tenet", "solos", "sagas", "redder", "reviver", "repaper", "deified", "minim", "peep", "rotator",
    "wow", "pop", "mom", "nun", "eye", "gig", "toot", "malayalam", "detartrated",
)
NEAR_MISS_WORDS = (
    "levels", "radars", "civics", "kayaks", "refers", "rotors", "madame", "racecars", "noone", "deeds",
    "state", "tenets", "solo", "saga", "reader", "revive", "repair", "defied", "minimum", "peel",
    "rotater", "window", "poppy", "moon", "none", "eyes", "giggle", "tooth", "malaysia", "lever",
    "rover", "civil", "kayaker", "radial", "refuel", "madman", "racecourse", "needs", "stairs", "tenant",
)
# Words for letter counting: repeated letters make the count non-trivial (the "strawberry" problem).
COUNT_WORDS = (
    "strawberry", "banana", "mississippi", "bookkeeper", "committee", "occurrence", "necessary",
    "assessment", "parallel", "balloon", "coffee", "raspberry", "successful", "address", "millennium",
    "possession", "embarrass", "accommodate", "letter", "programming", "tomorrow", "bubble", "pepper",
    "referee", "engineering", "cinnamon", "broccoli", "hippopotamus", "onomatopoeia", "abracadabra",
    "tennessee", "giraffe", "sleeplessness", "cucumber", "independence", "grammar", "rhythm",
    "peppermint", "butterfly", "zucchini",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _positive_int(options: dict[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"probe option {key!r} must be a positive integer, got {value!r}")
    return value


def _choice_list(options: dict[str, Any], key: str, default: list, allowed: tuple) -> list:
    """An option that names a non-empty list of values from `allowed` (a single value is a one-item list)."""
    value = options.get(key, default)
    values = value if isinstance(value, list) else [value]
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise ValueError(f"probe option {key!r} must list values from {list(allowed)}, got {value!r}")
    return values


class Probe(Adapter):
    """Base of the generated probes: subclasses implement `records` (or `generate`) and `to_item`."""

    category = "Probe"
    needs_data = False

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        seed = self.options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"probe option 'seed' must be an integer, got {seed!r}")
        self.seed = seed
        self.n = _positive_int(self.options, "n", 200)

    def generate(self, rng: random.Random) -> dict[str, Any]:
        """Parameters of one item."""
        raise NotImplementedError

    def records(self, rng: random.Random) -> list[dict[str, Any]]:
        """Parameters of all `n` items (probes that balance labels across items override this)."""
        return [self.generate(rng) for _ in range(self.n)]

    def rows(self) -> Iterator[SourceRow]:
        """The generated rows; `line` is the 1-based item number, `index` in the record the 0-based one."""
        label = f"probe:{self.name}(seed={self.seed}, n={self.n})"
        for index, record in enumerate(self.records(random.Random(self.seed))):
            yield SourceRow(label, index + 1, {"index": index, **record})

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        return self.rows()  # nothing to read: data_dir is ignored

    def hub_rows(self, hub: dict[str, Any]) -> Iterator[SourceRow]:
        return self.rows()

    def item_id(self, row: SourceRow) -> str:
        return f"{self.name}-{require(row.record, 'index', int):05d}"


# --- arithmetic --------------------------------------------------------------------------------

OPERATIONS = {"add": "+", "sub": "-", "mul": "*"}


def arithmetic_answer(operation: str, a: int, b: int) -> int:
    """The exact result of `a <operation> b`."""
    if operation == "add":
        return a + b
    if operation == "sub":
        return a - b
    if operation == "mul":
        return a * b
    raise MalformedRow("operation", f"expected one of {', '.join(OPERATIONS)}, got {operation!r}")


class ArithmeticProbe(Probe):
    """Options: seed, n, `operations` (add/sub/mul; default all), `digits` (operand digits; default [2, 3, 4])."""

    name = "probe_arithmetic"
    generates = True
    description = "Multi-digit addition, subtraction and multiplication; numeric exact match."

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        self.operations = _choice_list(self.options, "operations", list(OPERATIONS), tuple(OPERATIONS))
        digits = self.options.get("digits", [2, 3, 4])
        self.digits = digits if isinstance(digits, list) else [digits]
        valid = [d for d in self.digits if not isinstance(d, bool) and isinstance(d, int) and 1 <= d <= 18]
        if not self.digits or len(valid) != len(self.digits):
            raise ValueError(f"probe option 'digits' must be integers 1-18 (or a list of them), got {digits!r}")

    def generate(self, rng: random.Random) -> dict[str, Any]:
        operation = rng.choice(self.operations)
        digits = rng.choice(self.digits)
        a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
        if operation == "sub" and b > a:
            a, b = b, a  # non-negative differences: a sign slip is a different competence
        return {"operation": operation, "digits": digits, "a": a, "b": b}

    def to_item(self, row: SourceRow) -> Item:
        operation = require(row.record, "operation")
        a, b = require(row.record, "a", int), require(row.record, "b", int)
        digits = require(row.record, "digits", int)
        answer = arithmetic_answer(operation, a, b)
        return Item(
            item_id=self.item_id(row),
            fields={"question": f"What is {a} {OPERATIONS[operation]} {b}?"},
            scoring="numeric_match",
            gold=str(answer),
            subset=f"{operation}-{digits}digit",
            metadata={"operation": operation, "digits": digits, "a": a, "b": b},
        )


# --- letter counting ---------------------------------------------------------------------------


class LetterCountProbe(Probe):
    """Options: seed, n, `absent_fraction` (share of letters not in the word; default 0.2)."""

    name = "probe_letter_count"
    generates = True
    description = "Count the occurrences of a letter in a word; numeric exact match."

    def generate(self, rng: random.Random) -> dict[str, Any]:
        word = rng.choice(COUNT_WORDS)
        if rng.random() < float(self.options.get("absent_fraction", 0.2)):
            letter = rng.choice(sorted(set(ALPHABET) - set(word)))
        else:
            # Prefer repeated letters: they are where models miscount.
            counts = {letter: word.count(letter) for letter in sorted(set(word))}
            repeated = [letter for letter, count in counts.items() if count > 1]
            letter = rng.choice(repeated if repeated and rng.random() < 0.7 else list(counts))
        return {"word": word, "letter": letter}

    def to_item(self, row: SourceRow) -> Item:
        word = require(row.record, "word")
        letter = require(row.record, "letter")
        count = word.count(letter)
        return Item(
            item_id=self.item_id(row),
            fields={"question": f"How many times does the letter '{letter}' appear in '{word}'?"},
            scoring="numeric_match",
            gold=str(count),
            subset="absent" if count == 0 else "once" if count == 1 else "repeated",
            metadata={"word": word, "letter": letter, "count": count, "word_length": len(word)},
        )


# --- palindromes -------------------------------------------------------------------------------


def random_palindrome(rng: random.Random, length: int) -> str:
    half = "".join(rng.choice(ALPHABET) for _ in range(length // 2))
    middle = rng.choice(ALPHABET) if length % 2 else ""
    return half + middle + half[::-1]


def break_palindrome(rng: random.Random, text: str) -> str:
    """Change one letter off the centre, so the string is no longer its own reverse (a near-miss)."""
    positions = [i for i in range(len(text)) if i != len(text) - 1 - i]
    position = rng.choice(positions)
    letter = rng.choice([c for c in ALPHABET if c != text[position]])
    return text[:position] + letter + text[position + 1 :]


class PalindromeProbe(Probe):
    """Options: seed, n, `random_fraction` (share of random letter strings instead of words; default 0.5).

    Exactly half the items (rounded down) are palindromes, the rest near-misses.
    """

    name = "probe_palindrome"
    generates = True
    description = "Decide whether a word or letter string is a palindrome; yes/no, balanced."

    def records(self, rng: random.Random) -> list[dict[str, Any]]:
        labels = [True] * (self.n // 2) + [False] * (self.n - self.n // 2)
        rng.shuffle(labels)
        words = {flag: [w for w in PALINDROME_WORDS + NEAR_MISS_WORDS if w.isalpha() and (w == w[::-1]) == flag]
                 for flag in (True, False)}
        random_fraction = float(self.options.get("random_fraction", 0.5))
        records = []
        for is_palindrome in labels:
            if rng.random() < random_fraction:
                text = random_palindrome(rng, rng.randint(3, 9))
                text, source = (text if is_palindrome else break_palindrome(rng, text)), "random"
            else:
                text, source = rng.choice(words[is_palindrome]), "word"
            records.append({"text": text, "source": source})
        return records

    def to_item(self, row: SourceRow) -> Item:
        text = require(row.record, "text")
        source = require(row.record, "source")
        answer = "yes" if text == text[::-1] else "no"
        return Item(
            item_id=self.item_id(row),
            # The answer-format instruction is the same on every item: only the question counts.
            fields={"question": SpannedText.from_pieces([(f"Is '{text}' a palindrome?", True),
                                                         (" Answer yes or no.", False)])},
            scoring="yes_no",
            gold=answer,
            subset=f"{source}-{answer}",
            metadata={"text": text, "source": source, "length": len(text), "is_palindrome": answer == "yes"},
        )


# --- dates and times ---------------------------------------------------------------------------

DATE_KINDS = ("weekday", "date", "time")
FIRST_DAY, LAST_DAY = dt.date(1990, 1, 1), dt.date(2035, 12, 31)
# Distractors are the answers of typical slips: off by one (inclusive counting), a week, an hour,
# ten minutes, a month taken as 30 days.
DATE_SLIPS = (-1, 1, -2, 2, -7, 7, -30, 30)
TIME_SLIPS = (-60, 60, -10, 10, -30, 30, -120, 120)


def time_text(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def date_answer(kind: str, start: str, offset: int) -> str:
    """The true answer text of a date probe: a weekday name, an ISO date, or an HH:MM time."""
    if kind == "time":
        hours, minutes = (int(part) for part in start.split(":"))
        return time_text(hours * 60 + minutes + offset)
    end = dt.date.fromisoformat(start) + dt.timedelta(days=offset)
    return WEEKDAYS[end.weekday()] if kind == "weekday" else end.isoformat()


def date_question(kind: str, start: str, offset: int, state_weekday: bool = True) -> str:
    if kind == "weekday" and state_weekday:
        weekday = WEEKDAYS[dt.date.fromisoformat(start).weekday()]
        return f"{start} is a {weekday}. What day of the week is it {offset} days later?"
    if kind == "weekday":  # the model must also know the calendar
        return f"What day of the week is it {offset} days after {start}?"
    if kind == "date":
        return f"What is the date {offset} days after {start}?"
    return f"On a 24-hour clock, what time is it {offset} minutes after {start}?"


class DateProbe(Probe):
    """Options: seed, n, `kinds` (weekday/date/time; default all), `max_days` (default 400),
    `max_minutes` (default 600), `state_weekday` (weekday questions say the start date's weekday, so
    they test counting rather than calendar recall; default true). Four candidates, by log-likelihood."""

    name = "probe_dates"
    description = "Weekday, calendar-date and clock-time arithmetic; 4-way multiple choice by log-likelihood."

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        self.kinds = _choice_list(self.options, "kinds", list(DATE_KINDS), DATE_KINDS)
        self.max_days = _positive_int(self.options, "max_days", 400)
        self.max_minutes = _positive_int(self.options, "max_minutes", 600)
        self.state_weekday = bool(self.options.get("state_weekday", True))

    def generate(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(self.kinds)
        if kind == "time":
            start = time_text(rng.randrange(0, 24 * 60, 5))
            offset = rng.randint(5, self.max_minutes)
        else:
            start = (FIRST_DAY + dt.timedelta(days=rng.randint(0, (LAST_DAY - FIRST_DAY).days))).isoformat()
            offset = rng.randint(1, self.max_days if kind == "date" else min(self.max_days, 100))
        answer = date_answer(kind, start, offset)
        if kind == "weekday":
            distractors = [w for w in WEEKDAYS if w != answer]
            rng.shuffle(distractors)
        else:
            slips = list(TIME_SLIPS if kind == "time" else DATE_SLIPS)
            rng.shuffle(slips)
            distractors = [date_answer(kind, start, offset + slip) for slip in slips]
        choices = [answer] + list(dict.fromkeys(d for d in distractors if d != answer))[:3]
        rng.shuffle(choices)
        return {"kind": kind, "start": start, "offset": offset, "choices": choices}

    def to_item(self, row: SourceRow) -> Item:
        kind = require(row.record, "kind")
        if kind not in DATE_KINDS:
            raise MalformedRow("kind", f"expected one of {', '.join(DATE_KINDS)}, got {kind!r}")
        start = require(row.record, "start")
        offset = require(row.record, "offset", int)
        choices = require(row.record, "choices", list)
        answer = date_answer(kind, start, offset)
        if choices.count(answer) != 1:
            raise MalformedRow("choices", f"the true answer {answer!r} must be among the choices exactly once")
        unit = "minutes" if kind == "time" else "days"
        question = date_question(kind, start, offset, self.state_weekday)
        return Item(
            item_id=self.item_id(row),
            fields={"question": question, "options": format_options(choices)},
            scoring="mc_loglik",
            gold=answer,
            choices=list(choices),
            gold_index=choices.index(answer),
            subset=kind,
            metadata={"kind": kind, "start": start, f"offset_{unit}": offset},
        )
