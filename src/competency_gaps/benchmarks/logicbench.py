"""LogicBench(Eval): `<task>/<logic_type>/<axiom>/data_instances.json`, one JSON document per axiom.

BQA samples hold several yes/no questions about one context (one item per question, scored on the
generated yes/no); MCQA samples hold one question with `choice_1`..`choice_4` (option log-likelihood).
Both tasks share one template, so BQA items list "yes" and "no" as their options.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from competency_gaps.benchmarks.base import Adapter, Item, MalformedRow, SourceRow, require
from competency_gaps.benchmarks.common import format_options, option_texts, read_json_document

TASKS = ("BQA", "MCQA")


def choice_keys(choices: dict[str, Any]) -> list[str]:
    """The `choice_<n>` keys in number order, leaving out empty ones.

    One official MCQA sample (nm_logic/default_reasoning_several, id 18) has an empty `choice_1` and a
    fifth `choice_5`; its four real options are kept and relettered A-D.
    """
    keys = sorted((k for k in choices if re.fullmatch(r"choice_\d+", k)), key=lambda k: int(k.split("_")[1]))
    keys = [k for k in keys if not (isinstance(choices[k], str) and not choices[k].strip())]
    if len(keys) < 2:
        raise MalformedRow("choices", "fewer than two non-empty choice_<n> options")
    return keys


class LogicBench(Adapter):
    name = "logicbench"
    generates = True  # yes/no tasks are decoded; the multiple-choice ones scored by log-likelihood
    category = "Reasoning"
    description = "Propositional, first-order and non-monotonic logic; yes/no (BQA) and 4-way (MCQA) questions."

    def tasks(self) -> list[str]:
        tasks = list(self.options.get("tasks", TASKS))
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"logicbench option 'tasks': unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
        return tasks

    def local_rows(self, data_dir: Path) -> Iterator[SourceRow]:
        for task in self.tasks():
            files = sorted((data_dir / task).glob("*/*/data_instances.json"))
            if not files:
                raise FileNotFoundError(f"no {task}/<logic_type>/<axiom>/data_instances.json under {data_dir}")
            for path in files:
                yield from self.file_rows(task, path)

    def file_rows(self, task: str, path: Path) -> Iterator[SourceRow]:
        """One row per BQA question or MCQA sample; `line` counts them within the file (1-based)."""
        document = read_json_document(path)
        if isinstance(document, str) or not isinstance(document.get("samples"), list):
            yield SourceRow(str(path), 1, {"__error__": document if isinstance(document, str) else "no 'samples' list"})
            return
        where = {"task": task, "logic_type": path.parent.parent.name, "axiom": path.parent.name}
        count = 0
        for sample in document["samples"]:
            if not isinstance(sample, dict):
                count += 1
                yield SourceRow(str(path), count, {"__error__": "sample is not a JSON object"})
                continue
            pairs = sample.get("qa_pairs") if task == "BQA" else [None]
            if not isinstance(pairs, list):
                count += 1
                yield SourceRow(str(path), count, {**sample, **where, "question_number": 1})
                continue
            for number, pair in enumerate(pairs, start=1):
                count += 1
                qa = pair if isinstance(pair, dict) else {}
                yield SourceRow(str(path), count, {**sample, **qa, **where, "question_number": number})

    def to_item(self, row: SourceRow) -> Item:
        record = row.record
        task = record["task"]
        subset = f"{task}/{record['logic_type']}/{record['axiom']}"
        sample_id = require(record, "id", (int, str))
        fields = {"context": require(record, "context").strip(), "question": require(record, "question").strip()}
        metadata = {"task": task, "logic_type": record["logic_type"], "axiom": record["axiom"], "sample_id": sample_id}
        if task == "BQA":
            if "qa_pairs" not in record:
                raise MalformedRow("qa_pairs", "missing")
            answer = require(record, "answer").strip().lower()
            if answer not in ("yes", "no"):
                raise MalformedRow("answer", f"expected 'yes' or 'no', got {answer!r}")
            return Item(
                item_id=f"logicbench-{subset}-{sample_id}-q{record['question_number']}",
                fields={**fields, "options": format_options(["yes", "no"])},
                scoring="yes_no", gold=answer, subset=subset, metadata=metadata,
            )
        keys = choice_keys(require(record, "choices", dict))
        options = option_texts(record["choices"], keys)
        answer = require(record, "answer").strip()
        if answer not in keys:
            raise MalformedRow("answer", f"expected one of {', '.join(keys)}, got {answer!r}")
        return Item(
            item_id=f"logicbench-{subset}-{sample_id}",
            fields={**fields, "options": format_options(options)},
            scoring="mc_loglik", choices=options, gold_index=keys.index(answer), subset=subset, metadata=metadata,
        )
