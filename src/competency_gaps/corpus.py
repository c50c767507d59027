"""The offline text corpus SAEs are trained on: a seeded sample of documents from locally available text."""

from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path
from typing import Any

import polars as pl

from competency_gaps.tables import atomic_path

log = logging.getLogger(__name__)


def sae_probes_files(package: str) -> list[Path]:
    """The sae-probes wheel's text datasets (data/cleaned_data/*.csv.zst), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} (sae_corpus.sae_probes_package) is not installed")
    files = sorted((Path(spec.origin).parent / "data" / "cleaned_data").glob("*.csv.zst"))
    if not files:
        raise FileNotFoundError(f"no data/cleaned_data/*.csv.zst files in package {package!r}")
    return files


def read_text_file(path: Path) -> list[str]:
    """Documents of one local file: .txt (blank-line separated), .jsonl/.csv/.parquet (column `text`)."""
    if path.suffix == ".txt":
        return [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    readers = {".jsonl": pl.read_ndjson, ".csv": pl.read_csv, ".parquet": pl.read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"sae_corpus.text_files: unsupported file type {path}")
    frame = readers[path.suffix](path)
    if "text" not in frame.columns:
        raise ValueError(f"sae_corpus.text_files: {path} has no column 'text'")
    return [text for text in frame["text"].drop_nulls().to_list() if text.strip()]


def collect_documents(spec: dict[str, Any]) -> list[str]:
    documents: list[str] = []
    if spec.get("sae_probes_package"):
        for path in sae_probes_files(spec["sae_probes_package"]):
            documents += pl.read_csv(path, columns=["prompt"])["prompt"].drop_nulls().to_list()
    for name in spec.get("text_files", []):
        documents += read_text_file(Path(name))
    return documents


def build_corpus(spec: dict[str, Any], out_path: Path) -> int:
    """Write a seeded sample of `max_documents` distinct documents to Parquet (column `text`)."""
    documents = sorted(set(collect_documents(spec)))  # sorted: independent of file listing order
    if not documents:
        raise ValueError("sae_corpus: no documents found (set sae_probes_package or text_files)")
    sample = random.Random(spec.get("seed", 0)).sample(documents, min(spec["max_documents"], len(documents)))
    log.info("corpus: %d documents sampled from %d", len(sample), len(documents))
    with atomic_path(out_path) as temporary:
        pl.DataFrame({"text": sample}).write_parquet(temporary)
    return len(sample)
