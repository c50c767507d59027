"""The config slice each job depends on, shared by the Snakemake rules (as params) and the CLI.

Slices are narrow on purpose: Snakemake reruns a job when its params change, so evaluation must not
see `layers` (adding a layer reruns no evaluation) and extraction sees only its own layer.
"""

from __future__ import annotations

import json
from typing import Any


def _model_without_layers(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The model's settings minus its layers and imported scores (each job sees only its own of those)."""
    return {key: value for key, value in config["models"][model].items() if key not in ("layers", "scores_from")}


def imported_scores(config: dict[str, Any], model: str, benchmark: str) -> dict[str, Any] | None:
    """Where (model, benchmark)'s per-item scores come from when they are imported instead of computed."""
    return config["models"][model]["scores_from"].get(benchmark)


def _layer_entry(config: dict[str, Any], model: str, layer: int | str) -> dict[str, Any]:
    for entry in config["models"][model]["layers"]:
        if entry["layer"] == int(layer):
            return entry
    raise KeyError(f"layer {layer} is not configured for model {model!r}")


# Which benchmark keys each stage reads; the rest of the benchmark's config cannot rerun it.
PREPARE_KEYS = ("adapter", "data_dir", "hub", "limit", "seed", "template", "options", "malformed")
EVALUATE_KEYS = ("max_new_tokens", "judge")
EXTRACT_KEYS = ("context_policy",)


def _benchmark(config: dict[str, Any], benchmark: str, keys: tuple[str, ...]) -> dict[str, Any]:
    spec = config["benchmarks"][benchmark]
    return {key: spec[key] for key in keys if key in spec}


def _runtime(config: dict[str, Any]) -> dict[str, Any]:
    return {"device": config["device"], "dtype": config["dtype"], "seed": config["seed"]}


def job_spec(config: dict[str, Any], job: str, model: str | None = None, benchmark: str | None = None,
             layer: int | str | None = None) -> dict[str, Any]:
    """The part of `config` that job `job` (prepare, prepare_model, corpus, evaluate, sae, extract, reduce) reads."""
    if job == "prepare":
        return _benchmark(config, benchmark, PREPARE_KEYS)
    if job == "prepare_model":
        return config["models"][model]["source"]
    if job == "corpus":
        return config["sae_corpus"]
    if job == "evaluate":
        return {"model": _model_without_layers(config, model), "benchmark": _benchmark(config, benchmark, EVALUATE_KEYS),
                "import": imported_scores(config, model, benchmark), "runtime": _runtime(config)}
    if job == "sae":
        return {"model": model, "layer": int(layer), "sae": _layer_entry(config, model, layer)["sae"],
                "context_length": config["sae_corpus"]["context_length"], "runtime": _runtime(config)}
    if job == "extract":
        return {"model": _model_without_layers(config, model), "benchmark": _benchmark(config, benchmark, EXTRACT_KEYS),
                "layer": int(layer), "saliency": config["saliency"], "runtime": _runtime(config)}
    if job == "reduce":
        return {"gaps": config["gaps"], "seed": config["seed"]}
    raise ValueError(f"unknown job {job!r}")


def spec_json(config: dict[str, Any], job: str, **wildcards: Any) -> str:
    """`job_spec` as canonical JSON (sorted keys), for Snakemake params."""
    return json.dumps(job_spec(config, job, **wildcards), sort_keys=True)
