"""Per-item scores brought from elsewhere, as a SCORES-shaped table for the items of one benchmark.

Two sources: a plain table of (item id, score) in CSV, Parquet or JSONL (`from_table`), and the
per-sample log of lm-evaluation-harness (`--log_samples`, files named samples_<task>_<time>.jsonl;
`from_lm_eval_samples`). Both return one row per item of `items`, in the items' order, with the
SCORES columns (item_id, scoring, score, prediction, response, choice_logprobs); `scoring` is the
item's own policy. An item without a score is an error listing a few ids, unless missing="null",
which leaves its score null (coverage only). Scores must be numbers in [0, 1].
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from competency_gaps.benchmarks.base import read_jsonl
from competency_gaps.tables import SCORES, table_from_rows

log = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "null")
TEXT_LIMIT = 200  # characters of a prediction kept from lm-eval's filtered responses
SHOWN_IDS = 5


class ImportScoresError(ValueError):
    """Imported scores that cannot be trusted or joined to the items."""


# --- shared checks and output ------------------------------------------------------------------


def parse_score(value: Any, where: str) -> float:
    """A score in [0, 1] from a number, a bool or numeric text; `where` names file, row and item for errors."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ImportScoresError(f"{where}: score {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise ImportScoresError(f"{where}: score {value!r} is not a number")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ImportScoresError(f"{where}: score {value!r} is outside [0, 1]")
    return float(value)


def check_missing(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")


def scores_frame(items: pl.DataFrame, found: Mapping[str, dict[str, Any]], extra: int, path: Path,
                 missing: str, first_unmatched: str | None = None) -> pl.DataFrame:
    """One SCORES row per item in the items' order, from `found` (item id -> score, prediction, ...);
    `extra` counts the scored ids that are not items (ignored, reported in a warning), `first_unmatched`
    names the first of them (file, row, id), shown when items lack a score: the ids may just be spelled otherwise."""
    ids = items["item_id"].to_list()
    absent = [item_id for item_id in ids if item_id not in found]
    if absent and missing == "error":
        shown = ", ".join(repr(item_id) for item_id in absent[:SHOWN_IDS])
        more = f" and {len(absent) - SHOWN_IDS} more" if len(absent) > SHOWN_IDS else ""
        unmatched = f"; {extra} scored id(s) match no item, the first at {first_unmatched}" if first_unmatched else ""
        raise ImportScoresError(
            f"{path}: no score for {len(absent)} of {len(ids)} items: {shown}{more}{unmatched} "
            "(missing='null' keeps them unscored)"
        )
    if absent:
        log.warning("%s: %d of %d items have no score; their scores are null", path, len(absent), len(ids))
    if extra:
        log.warning("%s: %d scored id(s) are not among the %d items and were ignored", path, extra, len(ids))
    policies = items["scoring"].to_list() if "scoring" in items.columns else [None] * len(ids)
    rows = [{"item_id": item_id, "scoring": policy, **found.get(item_id, {})}
            for item_id, policy in zip(ids, policies)]
    return pl.from_arrow(table_from_rows(rows, SCORES))


# --- plain tables ------------------------------------------------------------------------------


def read_table(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The table's records and the line of its first record (2 for CSV: line 1 is the header)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return [record for _, record in read_json_lines(path)], 1
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ImportScoresError(f"{path}: expected a .csv, .parquet or .jsonl score table")
    try:
        if suffix == ".csv":
            # Every cell as text: ids such as "007" must not turn into numbers.
            return pl.read_csv(path, infer_schema=False).to_dicts(), 2
        return pl.read_parquet(path).to_dicts(), 1
    except (pl.exceptions.PolarsError, OSError) as error:  # ragged or non-UTF-8 CSV, truncated Parquet
        raise ImportScoresError(f"{path}: cannot read the score table: {error}") from None


def from_table(
    path: str | Path,
    items: pl.DataFrame,
    id_column: str = "item_id",
    score_column: str = "score",
    missing: str = "error",
) -> pl.DataFrame:
    """Scores for `items` from a CSV/Parquet/JSONL table of item ids and scores in [0, 1].

    Optional `prediction` and `response` columns are carried over. Ids not among the items are
    ignored (and counted in a warning); a duplicated id, a non-numeric score or one outside [0, 1]
    is an error naming the file, the row and the item.
    """
    path = Path(path)
    check_missing(missing)
    records, first_line = read_table(path)
    if records and (id_column not in records[0] or score_column not in records[0]):
        raise ImportScoresError(f"{path}: needs columns {id_column!r} and {score_column!r}; has {sorted(records[0])}")
    wanted = set(items["item_id"].to_list())
    found: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    first_unmatched: str | None = None
    unit = "line" if first_line == 2 else "row"
    for offset, record in enumerate(records):
        raw_id = record.get(id_column)
        where = f"{path}, {unit} {offset + first_line}"
        if raw_id is None or not str(raw_id).strip():
            raise ImportScoresError(f"{where}: empty {id_column!r}")
        item_id = str(raw_id).strip()
        where += f", item {item_id!r}"
        if item_id in seen:
            raise ImportScoresError(f"{where}: item id appears twice in the table")
        seen.add(item_id)
        score = parse_score(record.get(score_column), where)  # checked even for ids we ignore
        if item_id not in wanted:
            first_unmatched = first_unmatched or where
            continue
        found[item_id] = {
            "score": score,
            "prediction": optional_text(record.get("prediction")),
            "response": optional_text(record.get("response")),
        }
    return scores_frame(items, found, len(seen) - len(found), path, missing, first_unmatched)


def optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


# --- lm-evaluation-harness samples -------------------------------------------------------------


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; anything but a JSON object is an error."""
    for row in read_jsonl(path):
        if "__error__" in row.record:
            raise ImportScoresError(f"{path}, line {row.line}: {row.record['__error__']}")
        yield row.line, row.record


def normalise_text(text: str) -> str:
    return " ".join(text.split())


def common_prefix(item_ids: list[str]) -> str:
    """The shared "<name>-" of ids like "gsm8k-00012", so doc_id matching needs no prefix option."""
    prefixes = {match.group(1) for match in (re.fullmatch(r"(.*?)\d{5,}", i) for i in item_ids) if match}
    if len(prefixes) != 1 or any(not re.fullmatch(r".*?\d{5,}", i) for i in item_ids):
        raise ValueError("cannot infer the item id prefix for doc_id matching; pass prefix= (e.g. 'gsm8k-')")
    return prefixes.pop()


def user_texts(items: pl.DataFrame) -> dict[str, str]:
    """Item id -> the whitespace-normalised content of its first user message."""
    texts = {}
    for row in items.select("item_id", "messages").iter_rows(named=True):
        user = next((m["content"] for m in row["messages"] or [] if m["role"] == "user"), "")
        texts[row["item_id"]] = normalise_text(user)
    return texts


class FieldMatcher:
    """Finds the item whose first user message contains a doc's text field (whitespace-normalised)."""

    def __init__(self, items: pl.DataFrame):
        self.texts = user_texts(items)

    def __call__(self, text: str) -> list[str]:
        needle = normalise_text(text)
        return [item_id for item_id, haystack in self.texts.items() if needle and needle in haystack]


def lm_eval_response(resps: Any) -> str | None:
    """The first generated text: `resps` is [[text]] for generation tasks; log-likelihood tasks have
    [[[logprob, is_greedy]], ...] there, which is no response text."""
    first = resps[0] if isinstance(resps, list) and resps else None
    first = first[0] if isinstance(first, list) and first else first
    return first if isinstance(first, str) else None


def lm_eval_logprobs(filtered: Any) -> list[float] | None:
    """Per-choice log-likelihoods from filtered_resps of a multiple-choice task ([[logprob, is_greedy], ...])."""
    if not isinstance(filtered, list) or not filtered:
        return None
    values = []
    for entry in filtered:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            return None
        try:
            values.append(float(entry[0]))
        except (TypeError, ValueError):
            return None
    return values


def from_lm_eval_samples(
    path: str | Path,
    items: pl.DataFrame,
    metric: str = "acc",
    match: str = "doc_id",
    prefix: str | None = None,
    doc_field: str = "question",
    doc_id_map: Mapping[int, str] | None = None,
    filter_name: str | None = None,
    missing: str = "error",
) -> pl.DataFrame:
    """Scores for `items` from an lm-evaluation-harness samples file (`--log_samples` JSONL).

    match="doc_id": the doc with `doc_id` d is item f"{prefix}{d:05d}" (prefix inferred from the item
    ids when not given, e.g. "gsm8k-": our GSM8K ids are 0-based test-file lines, as lm-eval's doc_ids),
    or `doc_id_map[d]` when a map is given. match="field": the item whose first user message contains
    `doc[doc_field]` (whitespace-normalised; exactly one item must). score = float(sample[metric]);
    prediction = str(filtered_resps) cut to 200 characters; response = the first generated text.
    Tasks logged under several filters (GSM8K: strict-match, flexible-extract) need `filter_name`.
    """
    path = Path(path)
    check_missing(missing)
    if match not in ("doc_id", "field"):
        raise ValueError(f"match must be 'doc_id' or 'field', got {match!r}")
    samples = list(read_json_lines(path))
    filters = sorted({str(s.get("filter")) for _, s in samples if s.get("filter") is not None})
    if filter_name is not None:
        if filter_name not in filters:
            raise ImportScoresError(f"{path}: no samples under filter {filter_name!r}; filters: {', '.join(filters)}")
        samples = [(n, s) for n, s in samples if s.get("filter") == filter_name]
    elif len(filters) > 1:
        raise ImportScoresError(f"{path}: samples under several filters ({', '.join(filters)}); pass filter_name")
    locate = sample_locator(path, items, match, prefix, doc_field, doc_id_map)
    wanted = set(items["item_id"].to_list())
    found: dict[str, dict[str, Any]] = {}
    seen_at: dict[str, int] = {}
    extra = 0
    first_unmatched: str | None = None
    for number, sample in samples:
        item_id = locate(number, sample)
        if item_id is None or item_id not in wanted:
            extra += 1  # a doc of the full benchmark that our (sampled) items do not include
            first_unmatched = first_unmatched or f"{path}, line {number}, doc_id {sample.get('doc_id')!r}"
            continue
        where = f"{path}, line {number}, doc_id {sample.get('doc_id')!r}, item {item_id!r}"
        if metric not in sample:
            raise ImportScoresError(f"{where}: no metric {metric!r} (keys: {', '.join(sorted(sample))})")
        if item_id in seen_at:
            raise ImportScoresError(f"{where}: item already matched by the sample at line {seen_at[item_id]}")
        seen_at[item_id] = number
        filtered = sample.get("filtered_resps")
        found[item_id] = {
            "score": parse_score(sample[metric], where),
            "prediction": None if filtered is None else str(filtered)[:TEXT_LIMIT],
            "response": lm_eval_response(sample.get("resps")),
            "choice_logprobs": lm_eval_logprobs(filtered),
        }
    return scores_frame(items, found, extra, path, missing, first_unmatched)


def sample_locator(path: Path, items: pl.DataFrame, match: str, prefix: str | None, doc_field: str,
                   doc_id_map: Mapping[int, str] | None):
    """A function (line number, sample) -> our item id (None when the doc matches no item)."""
    if match == "field":
        matcher = FieldMatcher(items)

        def by_field(number: int, sample: dict[str, Any]) -> str | None:
            doc = sample.get("doc")
            text = doc.get(doc_field) if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise ImportScoresError(f"{path}, line {number}: doc has no text field {doc_field!r}")
            hits = matcher(text)
            if len(hits) > 1:
                raise ImportScoresError(f"{path}, line {number}: doc field {doc_field!r} matches several items: "
                                        f"{', '.join(hits[:SHOWN_IDS])}")
            return hits[0] if hits else None

        return by_field
    if doc_id_map is None and prefix is None:
        prefix = common_prefix(items["item_id"].to_list())

    def by_doc_id(number: int, sample: dict[str, Any]) -> str | None:
        doc_id = sample.get("doc_id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, int):
            raise ImportScoresError(f"{path}, line {number}: doc_id {doc_id!r} is not an integer")
        if doc_id_map is not None:
            return doc_id_map.get(doc_id)
        return f"{prefix}{doc_id:05d}"

    return by_doc_id


# --- config-driven entry -----------------------------------------------------------------------


def import_scores(spec: Mapping[str, Any], items: pl.DataFrame) -> pl.DataFrame:
    """Scores as a config slice describes them: {"table": path, ...from_table options} or
    {"lm_eval_samples": path, ...from_lm_eval_samples options}."""
    options = {key: value for key, value in spec.items() if key not in ("table", "lm_eval_samples")}
    if "table" in spec:
        return from_table(spec["table"], items, **options)
    if "lm_eval_samples" in spec:
        return from_lm_eval_samples(spec["lm_eval_samples"], items, **options)
    raise ValueError("imported scores need a 'table' or an 'lm_eval_samples' path")
