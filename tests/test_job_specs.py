"""What each job's params hold: its config slice and code version, nothing that only changes speed."""

from __future__ import annotations

import json
import re

import pytest

from competency_gaps import workflow
from competency_gaps.config import validate_config
from competency_gaps.workflow import alternatives, job_spec, spec_json, throughput


@pytest.fixture()
def config(tiny_model_dir, random_sae_dirs, tmp_path) -> dict:
    return validate_config({
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "batch_size": 3, "generation_batch_size": 5,
                            "max_length": 64, "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
        "benchmarks": {"b": {"adapter": "probe_arithmetic", "options": {"n": 2}}},
    })


def test_every_stage_carries_its_code_version(config, monkeypatch):
    for job, extra in [("prepare", {"benchmark": "b"}), ("evaluate", {"model": "tiny", "benchmark": "b"}),
                       ("extract", {"model": "tiny", "benchmark": "b", "layer": 1}), ("reduce", {}),
                       ("sae", {"model": "tiny", "layer": 1}), ("sae_quality", {"model": "tiny", "layer": 1}),
                       ("prepare_model", {"model": "tiny"}), ("corpus", {}), ("concept_map", {}), ("explorer", {})]:
        before = spec_json(config, job, **extra)
        assert json.loads(before)["version"] == workflow.STAGE_VERSIONS[job]
        # Bumping a stage's version changes its params, which is what makes Snakemake rerun it.
        monkeypatch.setitem(workflow.STAGE_VERSIONS, job, workflow.STAGE_VERSIONS[job] + 1)
        assert spec_json(config, job, **extra) != before


def test_throughput_settings_are_not_in_any_spec(config):
    evaluate = job_spec(config, "evaluate", model="tiny", benchmark="b")["config"]
    extract = job_spec(config, "extract", model="tiny", benchmark="b", layer=1)["config"]
    assert evaluate["model"] == {"system_prompt": None}  # evaluation reads the whole prompt: no max_length
    assert extract["model"] == {"system_prompt": None, "max_length": 64}
    assert throughput(config, "tiny") == {"batch_size": 3, "batch_tokens": 1024, "generation_batch_size": 5}  # the schema default
    assert "batch_tokens" not in json.dumps(extract)
    assert "batch_tokens" not in json.dumps(job_spec(config, "sae", model="tiny", layer=1))  # SAE training reads with it too


def test_no_global_seed_reaches_a_model_job(config):
    for job, extra in [("evaluate", {"model": "tiny", "benchmark": "b"}), ("sae", {"model": "tiny", "layer": 1}),
                       ("extract", {"model": "tiny", "benchmark": "b", "layer": 1})]:
        assert "seed" not in job_spec(config, job, **extra)["config"]["runtime"]
    assert job_spec(config, "reduce")["config"]["gaps"]["seed"] == 0  # the gap analysis has its own


def test_read_dtype_reruns_only_the_jobs_that_read_activations(config):
    """SAE training and the labels' corpus pass: no score or saliency value comes from them."""
    jobs = {"sae": {"model": "tiny", "layer": 1}, "corpus_contexts": {"model": "tiny", "layer": 1},
            "evaluate": {"model": "tiny", "benchmark": "b"}, "extract": {"model": "tiny", "benchmark": "b", "layer": 1},
            "labels": {"model": "tiny", "layer": 1}}
    before = {job: spec_json(config, job, **extra) for job, extra in jobs.items()}
    config["read_dtype"] = "float32"
    assert {job for job, extra in jobs.items() if spec_json(config, job, **extra) != before[job]} == {"sae", "corpus_contexts"}


def test_the_map_layout_sees_only_its_own_explorer_settings(config):
    """What the explorer shows (contexts, shard size) reruns the explorer, not the map's UMAP."""
    before = spec_json(config, "concept_map")
    config["explorer"].update(contexts=9, shard_size=64, examples_per_side=1)
    assert spec_json(config, "concept_map") == before
    config["explorer"]["umap_neighbors"] = 30
    assert spec_json(config, "concept_map") != before
    assert job_spec(config, "concept_map")["config"]["explorer"] == {
        key: config["explorer"][key] for key in ("umap_neighbors", "umap_min_dist", "clusters", "max_clusters", "seed")}


def test_slug_alternatives_match_literally():
    pattern = re.compile(f"^(?:{alternatives(['gsm8k.v2', 'bbq'])})$")
    assert pattern.match("gsm8k.v2") and pattern.match("bbq")
    assert not pattern.match("gsm8kXv2")  # '.' is a literal dot, not any character
