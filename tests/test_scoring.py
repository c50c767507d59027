"""Answer extraction and comparison for every generation scoring policy, on realistic model responses."""

from __future__ import annotations

import json

import pytest

from competency_gaps import scoring
from competency_gaps.benchmarks.base import GENERATION_POLICIES, SourceRow
from competency_gaps.benchmarks.natural_questions import NaturalQuestions
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


@pytest.mark.parametrize(("response", "expected"), [
    ("First 12, then 30, so 42", None),  # no marker: no last-number fallback
    ("First 12, then 30. #### 42", "42"),
    ("So the answer is 42 apples", "42"),
    ("Answer: 1,234", "1234"),
    ("Thus \\boxed{42}", "42"),
])
def test_extract_final_number_can_require_a_marker(response, expected):
    assert extract_final_number(response, require_marker=True) == expected


# A derivation stopped by the token limit whose last number happens to equal the gold.
CUT_OFF_GSM8K = "Janet has 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9. Then she sells 9 * 2 = 18"


def test_numeric_match_cut_off_needs_an_answer_marker():
    item = {"gold": "18"}
    assert score_generation("numeric_match", CUT_OFF_GSM8K, item).score == 1.0  # a complete answer may end on it
    assert score_generation("numeric_match", CUT_OFF_GSM8K, item, cut_off=True) == scoring.Scored(0.0, None)
    marked = CUT_OFF_GSM8K + " dollars.\n#### 18\nNow let us check: 9"
    assert score_generation("numeric_match", marked, item, cut_off=True) == scoring.Scored(1.0, "18")


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


@pytest.mark.parametrize(("response", "expected"), [
    ("First $a=2$, then we get $x=12$", None),  # no marker: no last-expression fallback
    ("It takes 7 hours and 30 minutes", None),  # no marker: no last-number fallback
    ("Thus $x = \\boxed{\\frac{1}{2}}$. Checking: $x=3$", "\\frac{1}{2}"),
    ("The answer is \\dfrac{1}{2}. Then we check", "\\dfrac{1}{2}"),
    ("Answer: $7$", "7"),
    ("so the result is \\boxed{\\frac{1}{2", None),  # the box itself was cut off
])
def test_extract_math_answer_can_require_a_marker(response, expected):
    assert extract_math_answer(response, require_marker=True) == expected


def test_boxed_equiv_cut_off_needs_an_answer_marker():
    item = {"gold": "\\frac{1}{2}"}
    cut = "Let $p$ be the probability. Each of the two cases gives $\\frac{1}{4}$, so $p = \\frac{1}{2}$"
    assert score_generation("boxed_equiv", cut, item).score == 1.0
    assert score_generation("boxed_equiv", cut, item, cut_off=True) == scoring.Scored(0.0, None)
    assert score_generation("boxed_equiv", cut + ", so \\boxed{\\frac{1}{2}}. Now", item, cut_off=True).score == 1.0


@pytest.mark.parametrize(("policy", "response", "item"), [
    ("yes_no", "Yes, because the premise", {"gold": "yes"}),
    ("option_letter", "The answer is (C) because the", {"gold": "C"}),
    ("short_answer_match", "Paris", {"gold": "Paris"}),
    ("short_answer_contains", "It is Paris, which", {"gold": "Paris"}),
])
def test_cut_off_does_not_change_other_policies(policy, response, item):
    assert score_generation(policy, response, item, cut_off=True) == score_generation(policy, response, item)
    assert score_generation(policy, response, item, cut_off=True).score == 1.0


def test_judge_ignores_cut_off(monkeypatch):
    monkeypatch.setitem(JUDGES, "half", lambda response, item: 0.5)
    assert score_generation("judge", "A summary that", {}, judge="half", cut_off=True).score == 0.5


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


@pytest.mark.parametrize(("response", "expected"), [
    ("Dr. Seuss wrote it. He was American.", "Dr. Seuss wrote it"),
    ("Mr. Rogers", "Mr. Rogers"),
    ("Mrs. Doubtfire. A 1993 film.", "Mrs. Doubtfire"),
    ("Ms. Marvel", "Ms. Marvel"),
    ("St. Louis, Missouri. It lies on the Mississippi.", "St. Louis, Missouri"),
    ("Sammy Davis Jr. sang it. It was a hit.", "Sammy Davis Jr. sang it"),
    ("Ken Griffey Sr. was his father.", "Ken Griffey Sr. was his father"),
    ("Roe vs. Wade. It was decided in 1973.", "Roe vs. Wade"),
    ("A fruit, e.g. an apple. Or a pear.", "A fruit, e.g. an apple"),
    ("The capital, i.e. Paris. It is large.", "The capital, i.e. Paris"),
    ("The U.S. Senate. It has 100 members.", "The U.S. Senate"),
    ("J. K. Rowling. She wrote Harry Potter.", "J. K. Rowling"),
    ("Answer: 3.5 million people. Roughly.", "3.5 million people"),
    ("In December 1972. It was the last landing.", "In December 1972"),
    ("**Answer:** Paris! It is the capital.", "Paris"),
])
def test_extract_short_answer_keeps_abbreviations(response, expected):
    assert extract_short_answer(response) == expected


@pytest.mark.parametrize(("response", "score"), [
    ("December 1972", 1.0),
    ("december, 1972.", 1.0),
    ("The answer is: December 1972.", 1.0),
    ("The last crewed landing was in December 1972.", 0.0),  # exact match: a sentence is not the span
    ("Apollo 17.\nIt landed in December 1972.", 0.0),
    ("In December 19720.", 0.0),
    ("1972", 0.0),
    ("", 0.0),
])
def test_short_answer_match(response, score):
    assert score_generation("short_answer_match", response, NQ_ITEM).score == score


def test_short_answer_match_is_exact_not_containment():
    item = {"gold": json.dumps(["Paris"])}
    assert score_generation("short_answer_match", "Not Paris, it is Lyon.", item) == scoring.Scored(0.0, "Not Paris, it is Lyon")
    assert score_generation("short_answer_match", "Paris.", item).score == 1.0
    assert score_generation("short_answer_match", "Dr. Seuss wrote it.", {"gold": "Dr. Seuss"}).score == 0.0
    assert score_generation("short_answer_match", "Dr. Seuss.", {"gold": "Dr. Seuss"}).score == 1.0


@pytest.mark.parametrize(("response", "score"), [
    ("December 1972", 1.0),
    ("The last crewed landing was in December 1972.", 1.0),  # gold as whole words in the first sentence
    ("Not December 1972 but 1973.", 1.0),  # the documented weakness of containment
    ("Apollo 17.\nIt landed in December 1972.", 0.0),  # only the first sentence counts
    ("In December 19720.", 0.0),  # whole words only
    ("", 0.0),
])
def test_short_answer_contains(response, score):
    assert score_generation("short_answer_contains", response, NQ_ITEM).score == score


def test_short_answer_match_accepts_a_plain_string_gold():
    assert score_generation("short_answer_match", "The answer is one.", {"gold": "one"}).score == 1.0
    assert score_generation("short_answer_contains", "It is one.", {"gold": "one"}).score == 1.0


NQ_ROW = SourceRow("NQ-open.dev.jsonl", 1, {"question": "who wrote the cat in the hat", "answer": ["Dr. Seuss"]})


def test_natural_questions_match_option():
    assert NaturalQuestions().to_item(NQ_ROW).scoring == "short_answer_match"
    assert NaturalQuestions({"match": "exact"}).to_item(NQ_ROW).scoring == "short_answer_match"
    assert NaturalQuestions({"match": "contains"}).scoring == "short_answer_contains"
    with pytest.raises(ValueError, match="natural_questions.*'match'.*exact, contains.*'fuzzy'"):
        NaturalQuestions({"match": "fuzzy"})


def test_natural_questions_contains_items():
    assert NaturalQuestions({"match": "contains"}).to_item(NQ_ROW).scoring == "short_answer_contains"


# --- option_letter --------------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "letter"), [
    ("Answer: B", "B"),
    ("The answer is (C).", "C"),
    ("(D) because the passage says so.", "D"),
    ("B. Paris is the capital.", "B"),
    ("A good question. Weighing (A) against (B), the answer is B.", "B"),
    ("The correct answer is: **E**", "E"),
    ("I would pick Option D", "D"),
    ("A", "A"),
    ("None of them fits.", None),
    ("The answer is B because the passage says so.", "B"),
    ("(C)", "C"),
    ("D.", "D"),
    ("Answer: A", "A"),
    ("B", "B"),
    ("The answer is a bit tricky to pin down.", None),  # lower-case "a" is a word, not a letter
    ("My answer: e.g. the second one", None),
    ("I would pick option d", None),  # letters are upper-case
    ("Answer: A lot of people would say (B).", "B"),  # "A lot" is a word
    ("Answer: A lot of people disagree.", None),
    ("A good question. I think the second.", None),
    ("I think (B) fits best.", "B"),  # "I think" is a word, not the letter I
])
def test_extract_option_letter(response, letter):
    assert extract_option_letter(response) == letter


def test_option_letters_come_from_the_number_of_choices():
    assert extract_option_letter("The answer is F.") is None  # A-E by default
    assert extract_option_letter("The answer is F.", n_choices=6) == "F"
    assert extract_option_letter("Answer: D", n_choices=3) is None
    assert extract_option_letter("Answer: I", n_choices=26) == "I"
    assert extract_option_letter("Answer: I think it is (Q).", n_choices=26) == "Q"


def test_option_letter_scores():
    assert score_generation("option_letter", "The answer is (C).", {"gold": "C"}).score == 1.0
    assert score_generation("option_letter", "Answer: B", {"gold": "C"}).score == 0.0
    assert score_generation("option_letter", "The answer is a bit unclear.", {"gold": "A"}) == scoring.Scored(0.0, None)


def test_option_letter_scores_a_26_choice_item():
    item = {"gold": "Q", "choices": [f"choice {n}" for n in range(26)]}
    assert score_generation("option_letter", "The answer is Q.", item) == scoring.Scored(1.0, "Q")
    assert score_generation("option_letter", "(Q) fits best.", item).score == 1.0
    assert score_generation("option_letter", "The answer is D.", {**item, "choices": ["x", "y", "z"]}).prediction is None
    assert score_generation("option_letter", "The answer is D.", {**item, "choices": None}).prediction == "D"


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
