"""Config validation: the shipped config is valid; bad configs fail before any job runs, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from competency_gaps.config import ConfigError, load_config, validate_config
from competency_gaps.workflow import BATCH_TOKENS
from conftest import REPO, SHARED_BENCHMARKS, save_random_sae


@pytest.fixture()
def good_config(tiny_model_dir, random_sae_dirs) -> dict:
    return {
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)},
                            "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
        "benchmarks": {"gsm8k": {"adapter": "gsm8k", "data_dir": str(REPO)}},
    }


def rejected(config: dict) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    return str(error.value)


@pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="../shared/benchmarks not present")
def test_shipped_config_validates_with_defaults_filled(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "config.yaml")
    assert config["saliency"] == {"tokens": "fields", "include_response": False}
    assert config["benchmarks"]["gsm8k"]["malformed"] == "fail"
    assert config["models"]["smollm2-135m"]["layers"][0]["sae"]["train"]["k"] == 256


def test_good_config_passes_and_gets_defaults(good_config):
    config = validate_config(good_config)
    assert config["models"]["tiny"]["batch_size"] == 8
    assert config["models"]["tiny"]["batch_tokens"] == BATCH_TOKENS  # the stages' and the CLI's default too
    assert config["benchmarks"]["gsm8k"]["limit"] is None
    assert config["gaps"]["pooling"] == "pooled"


def test_unknown_key_is_named(good_config):
    good_config["benchmarks"]["gsm8k"]["limt"] = 5
    message = rejected(good_config)
    assert "benchmarks.gsm8k" in message and "'limt' was unexpected" in message


def test_wrong_type_is_named(good_config):
    good_config["models"]["tiny"]["batch_size"] = "eight"
    assert "models.tiny.batch_size" in rejected(good_config)


def test_wrong_type_inside_sae_training_branch_is_named(good_config):
    good_config["models"]["tiny"]["layers"][0]["sae"] = {"train": {"d_sae": "wide"}}
    assert "models.tiny.layers[0].sae.train.d_sae" in rejected(good_config)


def test_unknown_adapter_is_named(good_config):
    good_config["benchmarks"]["gsm8k"]["adapter"] = "gsm9k"
    message = rejected(good_config)
    assert "benchmarks.gsm8k.adapter" in message and "gsm9k" in message


def test_layer_out_of_range_is_named(good_config):
    good_config["models"]["tiny"]["layers"][0]["layer"] = 7
    message = rejected(good_config)
    assert "models.tiny.layers[0].layer" in message and "out of range" in message and "4 layers" in message


def test_duplicate_layer_is_named(good_config):
    layers = good_config["models"]["tiny"]["layers"]
    layers.append(copy.deepcopy(layers[0]))
    assert "models.tiny.layers[1].layer" in rejected(good_config)


def test_sae_width_mismatch_is_named(good_config, tmp_path):
    narrow = save_random_sae(tmp_path / "narrow", layer=1, d_in=16)
    good_config["models"]["tiny"]["layers"][0]["sae"] = {"path": str(narrow)}
    message = rejected(good_config)
    assert "models.tiny.layers[0].sae.path" in message and "d_in=16" in message and "32" in message


def test_missing_data_dir_is_named(good_config):
    good_config["benchmarks"]["gsm8k"]["data_dir"] = "/nonexistent/gsm8k"
    assert "benchmarks.gsm8k.data_dir" in rejected(good_config)


def test_bad_slug_is_named(good_config):
    good_config["benchmarks"]["GSM/8k"] = good_config["benchmarks"].pop("gsm8k")
    assert "GSM/8k" in rejected(good_config)


def test_snakemake_refuses_a_bad_config_before_any_job(good_config, tmp_path):
    good_config["models"]["tiny"]["layers"][0]["layer"] = 9
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(good_config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "models.tiny.layers[0].layer" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()
