"""Answer extraction and comparison for every generation scoring policy, on realistic model responses."""

from __future__ import annotations

import json

import pytest

from competency_gaps import scoring
from competency_gaps.benchmarks.base import GENERATION_POLICIES
from competency_gaps.scoring import (
    JUDGES,
    extract_final_number,
    extract_math_answer,
    extract_option_letter,
    extract_short_answer,
    extract_yes_no,
    last_boxed,
    math_equivalent,
    normalize_answer,
    normalize_latex,
    score_generation,
)


def test_every_generation_policy_has_a_scorer():
    assert set(scoring.GENERATION_SCORERS) == set(GENERATION_POLICIES)


# --- numeric_match --------------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "expected"), [
    ("She pays 3 * $6 = $18.\nAnswer: 18", "18"),
    ("The total is 1,234 apples.", "1234"),
    ("First 12, then 30, so 42 in all. #### 42", "42"),
    ("It costs $18.00 in total.", "18.00"),
])
def test_extract_final_number(response, expected):
    assert extract_final_number(response) == expected


def test_numeric_match_scores_dollars_and_commas():
    assert score_generation("numeric_match", "It costs $18.00.", {"gold": "18"}).score == 1.0
    assert score_generation("numeric_match", "Answer: 1,000", {"gold": "1000"}).score == 1.0
    assert score_generation("numeric_match", "I got 17 then fixed it: 19", {"gold": "18"}).score == 0.0


# --- boxed_equiv ----------------------------------------------------------------------------------

def test_last_boxed_balances_braces():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and finally \\boxed{\\sqrt{\\frac{3}{4}}}.") == "\\sqrt{\\frac{3}{4}}"
    assert last_boxed("no box here") is None
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None


@pytest.mark.parametrize(("response", "expected"), [
    ("Thus $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("The answer is \\dfrac{1}{2}.", "\\dfrac{1}{2}"),
    ("The answer is 18. This is because 3 + 15 = 18.", "18"),
    ("So the answer is $\\frac{3}{4}$, as claimed.", "\\frac{3}{4}"),
    ("Final answer: $\\$18.00$", "18.00"),
    ("First $a=2$, then we get $x=12$", "x=12"),
    ("It takes 7 hours and 30 minutes", "30"),
])
def test_extract_math_answer(response, expected):
    assert extract_math_answer(response) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("90^\\circ", "90"),
    ("5\\text{ cm}", "5"),
    ("12 square units", "12"),
    ("\\text{(C)}", "(C)"),
    ("1,000", "1000"),
    ("x = 5.", "5"),
    ("10\\%", "10"),
    ("\\$.5", "0.5"),
    ("2\\sqrt3", "2\\sqrt{3}"),
])
def test_normalize_latex(raw, expected):
    assert normalize_latex(raw) == expected


@pytest.mark.parametrize(("prediction", "gold", "equal"), [
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("1/4", "\\tfrac{1}{4}", True),
    ("18.00", "18", True),
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\frac{1}{3}", "0.33", False),
    ("3", "4", False),
    ("(1,2)", "(2,1)", False),
])
def test_math_equivalent(prediction, gold, equal):
    assert math_equivalent(prediction, gold) is equal


def test_boxed_equiv_scores():
    item = {"gold": "\\frac{1}{2}"}
    assert score_generation("boxed_equiv", "so $p = \\boxed{\\dfrac{1}{2}}$", item) == scoring.Scored(1.0, "\\dfrac{1}{2}")
    assert score_generation("boxed_equiv", "The answer is 0.5.", item).score == 1.0
    assert score_generation("boxed_equiv", "\\boxed{\\frac{1}{3}}", item).score == 0.0
    assert score_generation("boxed_equiv", "I do not know.", item) == scoring.Scored(0.0, None)


# --- short_answer_match ---------------------------------------------------------------------------

NQ_ITEM = {"gold": json.dumps(["14 December 1972 UTC", "December 1972"])}


def test_normalize_answer_squad_style():
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("An apple, a pear.") == "apple pear"


def test_extract_short_answer():
    assert extract_short_answer("Answer: December 1972.\nApollo 17 was the last mission.") == "December 1972"
    assert extract_short_answer("The answer is 3.5 million. It grew later.") == "3.5 million"
    assert extract_short_answer("\n\n  Bobby Scott\n") == "Bobby Scott"


@pytest.mark.parametrize(("response", "score"), [
    ("December 1972", 1.0),
    ("december, 1972.", 1.0),
    ("The last crewed landing was in December 1972.", 1.0),  # gold as whole words in the first sentence
    ("Apollo 17.\nIt landed in December 1972.", 0.0),  # only the first sentence counts
    ("In December 19720.", 0.0),  # whole words only
    ("1972", 0.0),
    ("", 0.0),
])
def test_short_answer_match(response, score):
    assert score_generation("short_answer_match", response, NQ_ITEM).score == score


def test_short_answer_match_accepts_a_plain_string_gold():
    assert score_generation("short_answer_match", "The answer is one.", {"gold": "one"}).score == 1.0


# --- option_letter --------------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "letter"), [
    ("Answer: B", "B"),
    ("The answer is (C).", "C"),
    ("(D) because the passage says so.", "D"),
    ("B. Paris is the capital.", "B"),
    ("A good question. Weighing (A) against (B), the answer is B.", "B"),
    ("The correct answer is: **E**", "E"),
    ("I would pick option d", "D"),
    ("A", "A"),
    ("None of them fits.", None),
])
def test_extract_option_letter(response, letter):
    assert extract_option_letter(response) == letter


def test_option_letter_scores():
    assert score_generation("option_letter", "The answer is (C).", {"gold": "C"}).score == 1.0
    assert score_generation("option_letter", "Answer: B", {"gold": "C"}).score == 0.0


# --- yes_no ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "answer"), [
    ("yes, because the premise entails it", "yes"),
    ("No.", "no"),
    ("**Yes**", "yes"),
    ("Nobody can tell; the answer is no", "no"),  # "Nobody" is not the word "no"
    ("It cannot be determined.", None),
])
def test_extract_yes_no(response, answer):
    assert extract_yes_no(response) == answer


def test_yes_no_scores():
    assert score_generation("yes_no", "No. The context says otherwise.", {"gold": "no"}).score == 1.0
    assert score_generation("yes_no", "Yes, it follows.", {"gold": "no"}).score == 0.0
    assert score_generation("yes_no", "Maybe.", {"gold": "yes"}) == scoring.Scored(0.0, None)


# --- judge ----------------------------------------------------------------------------------------

def test_judge_is_coverage_only_without_a_judge():
    assert score_generation("judge", "A summary.", {"gold": None}) == scoring.Scored(None, None)


def test_registered_judge_scores(monkeypatch):
    monkeypatch.setitem(JUDGES, "length", lambda response, item: float(len(response) < 20))
    assert score_generation("judge", "Short summary.", {}, judge="length").score == 1.0
    with pytest.raises(KeyError, match="no judge named 'hhem'"):
        score_generation("judge", "x", {}, judge="hhem")


def test_unknown_policy_is_an_error():
    with pytest.raises(KeyError, match="no scorer for generation policy"):
        score_generation("mc_loglik", "A", {})
