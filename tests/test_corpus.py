"""The offline SAE-training corpus: reading local text files, the sae-probes datasets, and the seeded sample."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from competency_gaps.corpus import build_corpus, collect_documents, read_text_file, sae_probes_files

MISSING_PACKAGE = "competency_gaps_no_such_package_xyz"


# ---------------------------------------------------------------- read_text_file


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First document,\nstill the first.\n\n\n  Second document.  \n\n   \n\nThird\n", encoding="utf-8")
    assert read_text_file(path) == ["First document,\nstill the first.", "Second document.", "Third"]


def test_txt_with_windows_line_endings(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert read_text_file(path) == ["one\ntwo", "three"]


def test_jsonl_text_column_without_nulls_or_blanks(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": None, "id": 2}, {"text": "   ", "id": 3}, {"text": "beta\ngamma", "id": 4}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert read_text_file(path) == ["alpha", "beta\ngamma"]


def test_csv_text_column(tmp_path):
    path = tmp_path / "docs.csv"
    pl.DataFrame({"label": [0, 1, 2], "text": ["a, quoted one", "multi\nline", ""]}).write_csv(path)
    assert read_text_file(path) == ["a, quoted one", "multi\nline"]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pl.DataFrame({"text": ["x", None, "y"], "other": ["no", "no", "no"]}).write_parquet(path)
    assert read_text_file(path) == ["x", "y"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_missing_text_column_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    frame = pl.DataFrame({"prompt": ["hello"]})
    {".jsonl": frame.write_ndjson, ".csv": frame.write_csv, ".parquet": frame.write_parquet}[suffix](path)
    with pytest.raises(ValueError, match=rf"{path.name} has no column 'text'"):
        read_text_file(path)


@pytest.mark.parametrize("name", ["docs.md", "docs.json", "docs"])
def test_unsupported_suffix_is_a_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"unsupported file type .*{name}"):
        read_text_file(path)


# ---------------------------------------------------------------- sae_probes_files / collect_documents


def test_sae_probes_files_when_the_package_is_missing():
    assert importlib.util.find_spec(MISSING_PACKAGE) is None
    with pytest.raises(FileNotFoundError, match=rf"package '{MISSING_PACKAGE}' \(sae_corpus.sae_probes_package\) is not installed"):
        sae_probes_files(MISSING_PACKAGE)


def make_package(root: Path, name: str, datasets: dict[str, list[str | None]]) -> Path:
    """An importable package laid out like the sae-probes wheel: data/cleaned_data/*.csv.zst with a `prompt` column."""
    package = root / name
    data = package / "data" / "cleaned_data"
    data.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    for stem, prompts in datasets.items():
        plain = data / f"{stem}.csv"
        pl.DataFrame({"prompt": prompts, "target": list(range(len(prompts)))}).write_csv(plain)
        subprocess.run(["zstd", "-q", "--rm", str(plain), "-o", str(data / f"{stem}.csv.zst")], check=True)
    return package


needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command writes the .csv.zst fixtures")


@needs_zstd
def test_sae_probes_files_and_documents_from_a_package(tmp_path, monkeypatch):
    name = "fake_sae_probes_for_tests"
    package = make_package(tmp_path, name, {"2_second": ["c", None, "d"], "1_first": ["a", "b"]})
    (package / "data" / "cleaned_data" / "notes.csv").write_text("prompt\nignored\n", encoding="utf-8")  # not *.csv.zst
    monkeypatch.syspath_prepend(str(tmp_path))

    files = sae_probes_files(name)
    assert [f.name for f in files] == ["1_first.csv.zst", "2_second.csv.zst"]  # sorted
    assert all(f.parent == package / "data" / "cleaned_data" for f in files)

    text_file = tmp_path / "extra.txt"
    text_file.write_text("e\n\nf", encoding="utf-8")
    assert collect_documents({"sae_probes_package": name, "text_files": [str(text_file)]}) == ["a", "b", "c", "d", "e", "f"]


def test_sae_probes_files_when_the_package_has_no_datasets(tmp_path, monkeypatch):
    name = "fake_empty_sae_probes_for_tests"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"no data/cleaned_data/\*\.csv\.zst files in package '{name}'"):
        sae_probes_files(name)


def test_installed_sae_probes_wheel_is_found():
    if importlib.util.find_spec("sae_probes") is None:
        pytest.skip("sae_probes is not installed")
    files = sae_probes_files("sae_probes")
    assert files and all(f.name.endswith(".csv.zst") for f in files)
    assert pl.read_csv(files[0], columns=["prompt"]).height > 0


def test_collect_documents_skips_sae_probes_when_unset(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo", encoding="utf-8")
    assert collect_documents({"sae_probes_package": None, "text_files": [str(path)]}) == ["one", "two"]
    assert collect_documents({"text_files": []}) == []
    with pytest.raises(FileNotFoundError, match=MISSING_PACKAGE):
        collect_documents({"sae_probes_package": MISSING_PACKAGE, "text_files": [str(path)]})


# ---------------------------------------------------------------- build_corpus


@pytest.fixture()
def text_files(tmp_path) -> list[str]:
    first = tmp_path / "first.txt"
    first.write_text("\n\n".join(f"document {i}" for i in range(30)), encoding="utf-8")
    second = tmp_path / "second.jsonl"
    # overlaps the first file on documents 25..29, and repeats itself
    rows = [{"text": f"document {i}"} for i in range(25, 40)] + [{"text": "document 39"}]
    second.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return [str(first), str(second)]


ALL_DOCUMENTS = {f"document {i}" for i in range(40)}


def corpus(spec: dict, out: Path) -> list[str]:
    count = build_corpus(spec, out)
    frame = pl.read_parquet(out)
    assert frame.columns == ["text"] and frame.schema["text"] == pl.String
    assert count == frame.height
    return frame["text"].to_list()


def test_build_corpus_samples_max_documents_distinct_documents(tmp_path, text_files):
    sample = corpus({"sae_probes_package": None, "text_files": text_files, "max_documents": 12, "seed": 0}, tmp_path / "out" / "c.parquet")
    assert len(sample) == 12
    assert len(set(sample)) == 12
    assert set(sample) <= ALL_DOCUMENTS
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c.parquet"]  # no temporary left behind


def test_build_corpus_takes_everything_when_max_exceeds_the_supply(tmp_path, text_files):
    sample = corpus({"sae_probes_package": None, "text_files": text_files, "max_documents": 1000, "seed": 0}, tmp_path / "c.parquet")
    assert len(sample) == len(ALL_DOCUMENTS)  # duplicates within and across files counted once
    assert set(sample) == ALL_DOCUMENTS


def test_build_corpus_is_deterministic_under_its_seed(tmp_path, text_files):
    spec = {"sae_probes_package": None, "text_files": text_files, "max_documents": 10, "seed": 5}
    first = corpus(spec, tmp_path / "a.parquet")
    assert corpus(spec, tmp_path / "b.parquet") == first
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert corpus({**spec, "seed": 6}, tmp_path / "c.parquet") != first
    # the seed defaults to 0
    default = {key: value for key, value in spec.items() if key != "seed"}
    assert corpus(default, tmp_path / "d.parquet") == corpus({**spec, "seed": 0}, tmp_path / "e.parquet")


def test_build_corpus_does_not_depend_on_the_order_of_the_files(tmp_path, text_files):
    spec = {"sae_probes_package": None, "max_documents": 10, "seed": 1}
    forward = corpus({**spec, "text_files": text_files}, tmp_path / "a.parquet")
    backward = corpus({**spec, "text_files": text_files[::-1]}, tmp_path / "b.parquet")
    assert forward == backward


def test_build_corpus_without_documents_fails_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n", encoding="utf-8")
    out = tmp_path / "c.parquet"
    with pytest.raises(ValueError, match="no documents found"):
        build_corpus({"sae_probes_package": None, "text_files": [str(empty)], "max_documents": 5}, out)
    with pytest.raises(ValueError, match="no documents found"):
        build_corpus({"sae_probes_package": None, "text_files": [], "max_documents": 5}, out)
    assert not out.exists()
