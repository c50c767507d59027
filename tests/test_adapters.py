"""Benchmark adapters on the real release files (skipped when ../shared/benchmarks is absent) and on tiny bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from competency_gaps.benchmarks import ADAPTERS, get_adapter
from competency_gaps.benchmarks.base import GENERATION_POLICIES
from competency_gaps.prepare import BenchmarkDataError, PrepareReport, prepare_benchmark, read_items

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"  # <repo>/../shared
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


def spec(name: str, data_dir: Path | None = None, **extra) -> dict:
    return {"adapter": name, "data_dir": str(data_dir or SHARED / name), "limit": 5, "seed": 0, **extra}


def sample(name: str, **extra) -> list[dict]:
    """Five prepared rows (the items table, prompts rendered) from the real files."""
    table, report = prepare_benchmark(name, spec(name, **extra))
    assert report.malformed == [] and report.items_kept == 5
    rows = table.to_pylist()
    assert len({row["item_id"] for row in rows}) == 5
    return rows


def all_items(name: str, **extra) -> dict:
    """Every valid item of the real files by id (no sampling, no rendering)."""
    s = spec(name, **extra)
    report = PrepareReport()
    items = read_items(get_adapter(name, s.get("options")), s, report)
    assert report.malformed == []
    return {item.item_id: item for item in items}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def counted_pieces(row: dict) -> list[str]:
    """The characters of a prepared row that count as the item's own text, span by span."""
    return [row["messages"][s["message"]]["content"][s["start"]:s["end"]] for s in row["field_spans"]]


# --- Social IQa ---------------------------------------------------------------------------------

SIQA_ROW = {"context": "Tracy helped.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c"}


@needs_data
def test_social_iqa_real_files():
    rows = sample("social_iqa")
    assert all(row["scoring"] == "mc_loglik" and len(row["choices"]) == 3 for row in rows)
    assert all("A. " in row["messages"][-1]["content"] for row in rows)
    items = all_items("social_iqa")
    assert len(items) == 1954
    # dev.jsonl line 2 (Sydney / homeless woman), dev-labels.lst line 2 is "1" -> answerA.
    item = items["social_iqa-00001"]
    assert item.choices == ["sympathetic", "like a person who was unable to help", "incredulous"]
    assert item.gold_index == 0
    assert item.fields["question"] == "How would you describe Sydney?"


def test_social_iqa_option_letters_are_not_counted(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [SIQA_ROW])
    (tmp_path / "dev-labels.lst").write_text("2\n", encoding="utf-8")
    table, _ = prepare_benchmark("s", spec("social_iqa", tmp_path))
    row = table.to_pylist()[0]
    assert row["messages"][-1]["content"].endswith("Options:\nA. a\nB. b\nC. c")
    assert counted_pieces(row) == ["Tracy helped.", "Why?", "a", "b", "c"]


def test_social_iqa_labels_file_with_byte_order_mark(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [SIQA_ROW, SIQA_ROW])
    (tmp_path / "dev-labels.lst").write_text("2\n3\n", encoding="utf-8-sig")
    table, _ = prepare_benchmark("s", spec("social_iqa", tmp_path))
    assert table.column("gold_index").to_pylist() == [1, 2]


def test_social_iqa_missing_label_names_file_line_and_field(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [SIQA_ROW, SIQA_ROW])
    (tmp_path / "dev-labels.lst").write_text("2\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError) as error:
        prepare_benchmark("s", spec("social_iqa", tmp_path))
    assert "dev.jsonl, line 2, field 'label': missing" in str(error.value)


def test_social_iqa_malformed_report_counts_and_skips(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [SIQA_ROW, "{not json", {**SIQA_ROW, "answerB": ""}, SIQA_ROW])
    (tmp_path / "dev-labels.lst").write_text("1\n2\n3\n4\n5\n", encoding="utf-8")
    table, report = prepare_benchmark("s", spec("social_iqa", tmp_path, malformed="report", limit=None))
    problems = {(Path(p.file).name, p.line, p.field) for p in report.malformed}
    # line 4's label "4" is out of range; label line 5 has no data line.
    assert problems == {("dev.jsonl", 2, "<row>"), ("dev.jsonl", 3, "answerB"), ("dev.jsonl", 4, "label"),
                        ("dev-labels.lst", 5, "<row>")}
    assert table.column("item_id").to_pylist() == ["social_iqa-00000"]
    assert report.rows_read == 5 and report.items_valid == 1


# --- BBQ ----------------------------------------------------------------------------------------

def bbq_row(example_id: int, category: str = "Age", **changes) -> dict:
    return {"example_id": example_id, "category": category, "context_condition": "ambig", "question_polarity": "neg",
            "context": "Two people met.", "question": "Who forgot?", "ans0": "The old one", "ans1": "The young one",
            "ans2": "Unknown", "label": 2, **changes}


@needs_data
def test_bbq_real_files():
    rows = sample("bbq")
    assert all(len(row["choices"]) == 3 and row["subset"] == row["item_id"].split("-")[1] for row in rows)
    items = all_items("bbq")
    assert len(items) == 11956
    assert {item.subset for item in items.values()} == {
        "Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation"}
    # Religion.jsonl line 18: example_id 17, label 2 -> "The Muslim one", disambiguated negative question.
    item = items["bbq-Religion-00017"]
    assert item.gold_index == 2 and item.choices[2] == "The Muslim one"
    assert item.metadata["context_condition"] == "disambig" and item.metadata["question_polarity"] == "neg"
    assert item.metadata["category"] == "Religion"


def test_bbq_reads_every_category_file_sorted(tmp_path):
    write_jsonl(tmp_path / "Religion.jsonl", [bbq_row(0, "Religion")])
    write_jsonl(tmp_path / "Age.jsonl", [bbq_row(0), bbq_row(1, label=0)])
    table, _ = prepare_benchmark("b", spec("bbq", tmp_path, limit=None))
    assert table.column("item_id").to_pylist() == ["bbq-Age-00000", "bbq-Age-00001", "bbq-Religion-00000"]
    assert table.column("gold_index").to_pylist() == [2, 0, 2]


def test_bbq_wrong_type_label_is_named(tmp_path):
    write_jsonl(tmp_path / "Age.jsonl", [bbq_row(0), bbq_row(1, label="2")])
    with pytest.raises(BenchmarkDataError) as error:
        prepare_benchmark("b", spec("bbq", tmp_path))
    assert "Age.jsonl, line 2, field 'label': expected int, got str" in str(error.value)


def test_bbq_duplicate_ids_are_fatal(tmp_path):
    write_jsonl(tmp_path / "Age.jsonl", [bbq_row(3), bbq_row(3)])
    with pytest.raises(BenchmarkDataError, match=r"Age.jsonl, line 2, field 'id': duplicate item id 'bbq-Age-00003'"):
        prepare_benchmark("b", spec("bbq", tmp_path, malformed="report"))


# --- WinoGrande ---------------------------------------------------------------------------------

WINO_ROW = {"qID": "q-1", "sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo",
            "answer": "1"}


@needs_data
def test_winogrande_real_files():
    rows = sample("winogrande")
    assert all(len(row["choices"]) == 2 and "_" not in row["choices"][0] for row in rows)
    items = all_items("winogrande")
    assert len(items) == 1267
    item = items["winogrande-00000"]  # dev.jsonl line 1: answer "2" (Maria), dev-labels.lst line 1: 2
    assert item.gold_index == 1
    assert item.choices[1] == "Sarah was a much better surgeon than Maria so Maria always got the easier cases."
    assert item.metadata["qID"] == "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2"


def test_winogrande_label_file_must_agree(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [WINO_ROW, {**WINO_ROW, "sentence": "No blank here."}, WINO_ROW])
    (tmp_path / "dev-labels.lst").write_text("2\n1\n1\n", encoding="utf-8")
    table, report = prepare_benchmark("w", spec("winogrande", tmp_path, malformed="report"))
    assert [(p.line, p.field) for p in report.malformed] == [(1, "answer"), (2, "sentence")]
    assert table.column("choices").to_pylist() == [["Ann gave Bo a gift because Ann was kind.",
                                                    "Ann gave Bo a gift because Bo was kind."]]


# --- AGIEval ------------------------------------------------------------------------------------

@needs_data
def test_agieval_real_files():
    rows = sample("agieval_en")
    assert all(row["subset"] == row["item_id"].split("-", 1)[1].rsplit("-", 1)[0] for row in rows)
    items = all_items("agieval_en")
    assert len(items) == 2852
    assert {item.subset for item in items.values()} == {
        "lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "sat-en-without-passage", "aqua-rat",
        "gaokao-english"}
    item = items["agieval_en-aqua-rat-00002"]  # aqua-rat.jsonl line 3: options "(A)36".."(E)7", label A
    assert item.choices == ["36", "15", "17", "5", "7"] and item.gold_index == 0
    assert item.fields["passage"] == ""
    # gaokao-english line 1 mixes option prefixes upstream; label B.
    item = items["agieval_en-gaokao-english-00000"]
    assert item.choices[1] == "finish your homework on time." and item.gold_index == 1
    assert item.fields["passage"].endswith("\n\n")


def test_agieval_bad_label(tmp_path):
    row = {"passage": None, "question": "2+2?", "options": ["(A)3", "(B)4"], "label": "C"}
    write_jsonl(tmp_path / "lsat-ar.jsonl", [row])
    with pytest.raises(BenchmarkDataError, match=r"lsat-ar.jsonl, line 1, field 'label': expected one of A, B"):
        prepare_benchmark("a", spec("agieval_en", tmp_path, options={"subsets": ["lsat-ar"]}))


def test_agieval_counts_passage_question_and_option_texts_only(tmp_path):
    row = {"passage": "Ann is taller than Bo.", "question": "Who is shorter?", "options": ["(A)Ann", "(B)Bo"],
           "label": "B"}
    write_jsonl(tmp_path / "lsat-ar.jsonl", [row, {**row, "passage": None}])
    table, _ = prepare_benchmark("a", spec("agieval_en", tmp_path, options={"subsets": ["lsat-ar"]}))
    with_passage, without = table.to_pylist()
    prompt = with_passage["messages"][-1]["content"]
    assert "Ann is taller than Bo.\n\nQuestion: Who is shorter?\nOptions:\nA. Ann\nB. Bo" in prompt
    assert counted_pieces(with_passage) == ["Ann is taller than Bo.", "Who is shorter?", "Ann", "Bo"]
    assert counted_pieces(without) == ["Who is shorter?", "Ann", "Bo"]


# --- LogicBench ---------------------------------------------------------------------------------

@needs_data
def test_logicbench_real_files():
    rows = sample("logicbench")
    assert all(row["subset"].split("/")[0] in ("BQA", "MCQA") for row in rows)
    items = all_items("logicbench")
    assert sum(i.scoring == "yes_no" for i in items.values()) == 1520
    assert sum(i.scoring == "mc_loglik" for i in items.values()) == 500
    bqa = items["logicbench-BQA/propositional_logic/modus_tollens-1-q2"]
    assert bqa.gold == "no" and bqa.subset == "BQA/propositional_logic/modus_tollens"
    assert bqa.fields["question"] == "Does this entail that liam finished his work early?"
    mcqa = items["logicbench-MCQA/propositional_logic/modus_tollens-1"]
    assert mcqa.gold_index == 0 and mcqa.choices[0] == "Liam didn't finish his work early." and len(mcqa.choices) == 4
    # Upstream quirk: empty choice_1 and an extra choice_5; the four real options remain.
    odd = items["logicbench-MCQA/nm_logic/default_reasoning_several-18"]
    assert len(odd.choices) == 4 and odd.choices[odd.gold_index] == "Eric is intelligent or chris has brown hair."


def test_logicbench_task_option_and_bad_answer(tmp_path):
    sample_ = {"id": 1, "context": "If p then q. p.", "qa_pairs": [{"question": "q?", "answer": "yes"},
                                                                    {"question": "not q?", "answer": "maybe"}]}
    path = tmp_path / "BQA" / "propositional_logic" / "modus_ponens" / "data_instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"type": "propositional_logic", "axiom": "modus_ponens", "samples": [sample_]}))
    table, report = prepare_benchmark("l", spec("logicbench", tmp_path, malformed="report", options={"tasks": ["BQA"]}))
    assert [(p.line, p.field) for p in report.malformed] == [(2, "answer")]
    assert table.column("gold").to_pylist() == ["yes"]


def test_logicbench_document_with_byte_order_mark(tmp_path):
    sample_ = {"id": 1, "context": "If p then q. p.", "qa_pairs": [{"question": "q?", "answer": "yes"}]}
    path = tmp_path / "BQA" / "propositional_logic" / "modus_ponens" / "data_instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": [sample_]}), encoding="utf-8-sig")
    table, _ = prepare_benchmark("l", spec("logicbench", tmp_path, options={"tasks": ["BQA"]}))
    assert table.column("gold").to_pylist() == ["yes"]


# --- MATH ---------------------------------------------------------------------------------------

@needs_data
def test_math500_and_full_split():
    rows = sample("math")
    assert all(row["scoring"] == "boxed_equiv" and row["gold"] for row in rows)
    items = all_items("math")
    assert len(items) == 500
    first = items["math-precalculus-807"]  # test.jsonl line 1
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.subset == "Precalculus" and first.metadata["level"] == 2
    full = all_items("math", options={"split": "full"})
    assert len(full) == 5000
    assert full["math-algebra-1"].gold == "2" and full["math-algebra-1"].metadata["level"] == 3
    assert full["math-algebra-1031"].gold == "\\frac{11}{2}"  # nested braces inside \boxed{}
    assert full["math-counting_and_probability-964"].gold == "\\frac{1}{2}"  # the last of two boxes
    assert all(full[key].gold == item.gold for key, item in items.items())  # MATH-500 is a subset


def test_math_full_split_without_box_is_malformed(tmp_path):
    folder = tmp_path / "MATH" / "test" / "algebra"
    folder.mkdir(parents=True)
    (folder / "2.json").write_text(json.dumps({"problem": "p", "level": "Level 2", "type": "Algebra",
                                               "solution": "so it is \\boxed{\\frac{1}{2}}."}))
    (folder / "10.json").write_text(json.dumps({"problem": "p", "level": "Level ?", "type": "Algebra",
                                                "solution": "cut off \\boxed{\\frac{1}{2}"}))
    table, report = prepare_benchmark("m", spec("math", tmp_path, malformed="report", options={"split": "full"}))
    assert [(Path(p.file).name, p.field) for p in report.malformed] == [("10.json", "solution")]
    assert table.column("gold").to_pylist() == ["\\frac{1}{2}"]


# --- Natural Questions --------------------------------------------------------------------------

@needs_data
def test_natural_questions_real_files():
    rows = sample("natural_questions")
    assert all(isinstance(json.loads(row["gold"]), list) for row in rows)
    items = all_items("natural_questions")
    assert len(items) == 3610
    item = items["natural_questions-00000"]
    assert json.loads(item.gold) == ["14 December 1972 UTC", "December 1972"]
    assert items["natural_questions-00003"].fields["question"] == "when did the eagles win last super bowl"


def test_natural_questions_answer_must_be_a_list(tmp_path):
    write_jsonl(tmp_path / "NQ-open.dev.jsonl", [{"question": "who", "answer": "Bob"}])
    with pytest.raises(BenchmarkDataError, match=r"line 1, field 'answer': expected list, got str"):
        prepare_benchmark("n", spec("natural_questions", tmp_path))


# --- CrowS-Pairs --------------------------------------------------------------------------------

@needs_data
def test_crows_pairs_real_files():
    rows = sample("crows_pairs")
    assert all(row["gold_index"] == 1 and row["choice_contexts"] == ["", ""] for row in rows)
    items = all_items("crows_pairs")
    assert len(items) == 1508
    item = items["crows_pairs-0002"]  # quoted cells with commas
    assert item.choices == ["His mind wondered if a doctor was behind this mess, and whether he would come forward.",
                            "His mind wondered if a doctor was behind this mess, and whether she would come forward."]
    assert item.subset == "gender" and item.metadata["stereo_antistereo"] == "antistereo"


def test_crows_pairs_missing_cell(tmp_path):
    (tmp_path / "crows_pairs_anonymized.csv").write_text(
        ",sent_more,sent_less,stereo_antistereo,bias_type\n0,\"A, b.\",\"C, d.\",stereo,age\n1,Only one,,stereo,age\n")
    with pytest.raises(BenchmarkDataError, match=r"crows_pairs_anonymized.csv, line 3, field 'sent_less': empty"):
        prepare_benchmark("c", spec("crows_pairs", tmp_path))


# --- Vectara ------------------------------------------------------------------------------------

@needs_data
def test_vectara_real_files():
    rows = sample("vectara")
    assert all(row["scoring"] == "judge" and row["gold"] is None for row in rows)
    assert "Use only the facts" in rows[0]["messages"][-1]["content"]
    items = all_items("vectara")
    assert len(items) == 1006
    assert items["vectara-0000"].fields["source"].startswith("Paul Merson has restarted his row with Andros Townsend")
    assert not any("\uffe1" in item.fields["source"] for item in items.values())


def test_hub_rows_reach_to_item_with_the_hub_label(monkeypatch):
    """The hub path (no network): datasets.load_dataset is stood in for; records flow into the same to_item."""
    import datasets

    from competency_gaps.benchmarks import get_adapter

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split))
        return [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(get_adapter("gsm8k").hub_rows({"split": "test"}))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert (rows[0].file, rows[0].line) == ("hub:openai/gsm8k/main[test]", 1)
    assert get_adapter("gsm8k").to_item(rows[0]).gold == "5"


# --- what the workflow knows before reading items -------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", sorted(set(ADAPTERS) - {"generic"}))
def test_an_adapter_says_whether_its_items_are_decoded(name):
    """`generates` (which orders the evaluation jobs, longest first) agrees with the scoring of the items it reads."""
    adapter = get_adapter(name, {"n": 20, "seed": 0} if name.startswith("probe_") else None)
    if adapter.needs_data:
        items = all_items(name).values()
    else:
        items = read_items(adapter, {"adapter": name, "options": {"n": 20, "seed": 0}, "limit": None, "seed": 0}, PrepareReport())
    assert adapter.generates == any(item.scoring in GENERATION_POLICIES for item in items)


def test_the_generic_adapter_generates_when_its_policy_decodes(tmp_path):
    data = write_jsonl(tmp_path / "items.jsonl", [{"question": "2 + 2?", "answer": "4"}])
    assert get_adapter("generic", {"file": str(data), "scoring": "numeric_match"}).generates
    assert not get_adapter("generic", {"file": str(data), "scoring": "mc_loglik"}).generates
