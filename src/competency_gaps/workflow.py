"""The config slice each job depends on, shared by the Snakemake rules (as params) and the CLI.

Slices are narrow on purpose: Snakemake reruns a job when its params change, so evaluation must not
see `layers` (adding a layer reruns no evaluation) and extraction sees only its own layer. Settings that
change how fast a job runs but not what it writes (batch sizes, threads) are kept out of the slices and
passed to the CLI as flags (`throughput`), so tuning them reruns nothing.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# The code version of each stage: bump a stage's number whenever a change to the package alters what
# that stage writes (a scoring fix, a masking fix, a new column). It is part of the stage's params, so
# upgrading the package reruns exactly the stages whose output changed, and everything downstream.
STAGE_VERSIONS = {
    "prepare": 2,  # 2: only the item's text counts (option letters, "Options:", AGIEval separator, palindrome instruction); BOM-tolerant readers
    "convert_gguf": 1,
    "prepare_model": 2,  # 2: manifest paths relative to the manifest; hub revisions pinned
    "corpus": 1,
    "evaluate": 2,  # 2: cut-off responses, stop tokens, ties, short answers, option letters, CrowS-Pairs start, system prompt merged
    "sae": 5,  # 2: streamed through a shuffle buffer; chat-formatted documents in the training mix (chat_fraction); mse; 3: massive activations left out of training and held-out figures; 4: training decodes only the k active latents (sae-lens's losses, other float rounding: an SAE of the same quality, other weights); 5: a fused Adam (other float rounding), and corpus rows and chat documents mixed in chunks of 2,048 vectors (an order batch_tokens does not change)
    "sae_quality": 2,  # 2: merged from extraction's measurement on every extracted item (was a sample, read again)
    "extract": 5,  # 2: truncation keeps the prompt's prefix; skipped items reported; system prompt merged; total_tokens untruncated; 3: top contexts; 4: sae_fit.json; 5: massive activations not read; a token holding part of a character shown as its bytes
    "corpus_contexts": 1,  # the labels' corpus pass (was inside labels, version 4)
    "labels": 5,  # 2: at most two promoted tokens in heuristic labels; cards show the strongest contexts first; 3: cards escaped by markdown_escape; 4: massive activations (attention sinks) in corpus rows not read; partial characters shown as bytes; 5: the corpus pass is the corpus_contexts job
    "reduce": 5,  # 2: scored support/ESS filters, CI support floor, cut-off and skip reporting, rankings; 3: summary findings first; 4: labels; 5: kappa from each benchmark's own score variance
    "robustness": 2,  # 2: robustness.md with labels
    "figures": 2,  # 2: labels in every table and card
    "concept_map": 1,
    "explorer": 2,  # 2: the map's layout read from the concept_map stage
    "compare": 1,
}

# Which model keys each stage's output depends on (batch sizes are throughput, not results).
EVALUATE_MODEL_KEYS = ("system_prompt",)
EXTRACT_MODEL_KEYS = ("system_prompt", "max_length")
SAE_MODEL_KEYS = ("system_prompt",)  # chat-formatted training documents are rendered as the benchmarks are
THROUGHPUT_KEYS = ("batch_size", "batch_tokens", "generation_batch_size")
# Padded tokens per forward pass reading activations: the schema's default for models.<m>.batch_tokens, and the
# stages' own when called without it. On a CPU 1024 read faster than 4096 (bench/README.md); a GPU wants 32768 or more.
BATCH_TOKENS = 1024

# Which benchmark keys each stage reads; the rest of the benchmark's config cannot rerun it.
PREPARE_KEYS = ("adapter", "data_dir", "hub", "limit", "seed", "template", "options", "malformed")
EVALUATE_KEYS = ("max_new_tokens", "judge")
EXTRACT_KEYS = ("context_policy",)
CONTEXT_KEYS = ("top_k", "before", "after")  # of `labels`: the benchmark contexts extraction collects
CORPUS_PASS_KEYS = CONTEXT_KEYS + ("corpus_tokens", "n_detection", "negative_pool", "seed")  # of `labels`: the corpus pass
MAP_KEYS = ("umap_neighbors", "umap_min_dist", "clusters", "max_clusters", "seed")  # of `explorer`: the map's layout


def _pick(mapping: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: mapping[key] for key in keys if key in mapping}


def imported_scores(config: dict[str, Any], model: str, benchmark: str) -> dict[str, Any] | None:
    """Where (model, benchmark)'s per-item scores come from when they are imported instead of computed."""
    return config["models"][model]["scores_from"].get(benchmark)


def _layer_entry(config: dict[str, Any], model: str, layer: int | str) -> dict[str, Any]:
    for entry in config["models"][model]["layers"]:
        if entry["layer"] == int(layer):
            return entry
    raise KeyError(f"layer {layer} is not configured for model {model!r}")


def _benchmark(config: dict[str, Any], benchmark: str, keys: tuple[str, ...]) -> dict[str, Any]:
    return _pick(config["benchmarks"][benchmark], keys)


def _runtime(config: dict[str, Any]) -> dict[str, Any]:
    """Device and dtype (`device: auto` is resolved when the workflow is parsed, see config.resolve_device)."""
    return {"device": config["device"], "dtype": config["dtype"]}


def _reading_runtime(config: dict[str, Any]) -> dict[str, Any]:
    """`_runtime` and `read_dtype`, for the jobs that only read activations (SAE training, the labels' corpus
    pass): the model jobs whose outputs scores and saliency come from keep their specs, and their results."""
    return {**_runtime(config), "read_dtype": config["read_dtype"]}


def _permissions(model_config: dict[str, Any]) -> dict[str, bool]:
    """The model's loading permissions that are turned on (trust_remote_code, allow_pickle; both off by default)."""
    return {key: True for key in ("trust_remote_code", "allow_pickle") if model_config.get(key)}


def _slice(config: dict[str, Any], job: str, model: str | None, benchmark: str | None, layer: int | str | None) -> Any:
    if job == "prepare":
        return _benchmark(config, benchmark, PREPARE_KEYS)
    if job == "convert_gguf":
        return config["models"][model]["source"]
    if job == "prepare_model":  # the loading policy only when turned on, so existing manifests stay current
        return {**config["models"][model]["source"], **_permissions(config["models"][model])}
    if job == "corpus":
        return config["sae_corpus"]
    if job == "evaluate":
        return {"model": _pick(config["models"][model], EVALUATE_MODEL_KEYS),
                "benchmark": _benchmark(config, benchmark, EVALUATE_KEYS),
                "import": imported_scores(config, model, benchmark), "runtime": _runtime(config)}
    if job == "sae":
        return {"model": model, "layer": int(layer), "sae": _layer_entry(config, model, layer)["sae"],
                "context_length": config["sae_corpus"]["context_length"], "runtime": _reading_runtime(config),
                **_pick(_permissions(config["models"][model]), ("allow_pickle",)),
                **_pick(config["models"][model], SAE_MODEL_KEYS)}
    if job == "sae_quality":
        return {"model": model, "layer": int(layer)}
    if job == "extract":
        return {"model": _pick(config["models"][model], EXTRACT_MODEL_KEYS),
                "benchmark": _benchmark(config, benchmark, EXTRACT_KEYS),
                "layer": int(layer), "saliency": config["saliency"], "contexts": _pick(config["labels"], CONTEXT_KEYS),
                "runtime": _runtime(config)}
    if job == "corpus_contexts":
        return {"labels": _pick(config["labels"], CORPUS_PASS_KEYS), "layer": int(layer),
                "context_length": config["sae_corpus"]["context_length"], "runtime": _reading_runtime(config)}
    if job == "labels":
        labels = {key: value for key, value in config["labels"].items() if key != "neuronpedia"}
        return {"labels": labels, "neuronpedia": config["labels"]["neuronpedia"].get(f"{model}/{layer}"),
                "layer": int(layer), "runtime": _runtime(config)}  # the corpus pass reads the corpus: not these
    if job == "reduce":
        return {"gaps": config["gaps"]}
    if job == "figures":
        return {}
    if job == "concept_map":
        return {"explorer": _pick(config["explorer"], MAP_KEYS)}
    if job == "explorer":
        return {"explorer": config["explorer"]}
    if job == "compare":  # flipped_sae decides which jobs exist, not what one writes
        return {key: value for key, value in config["compare"].items() if key != "flipped_sae"}
    if job == "robustness":
        return {"robustness": config["robustness"],
                "gaps": _pick(config["gaps"], ("pooling", "min_benchmarks", "min_support"))}
    raise ValueError(f"unknown job {job!r}")


def job_spec(config: dict[str, Any], job: str, model: str | None = None, benchmark: str | None = None,
             layer: int | str | None = None) -> dict[str, Any]:
    """The part of `config` that job `job` (prepare, prepare_model, corpus, evaluate, sae, extract, labels, reduce, …)
    reads, with the stage's code version: {"version": N, "config": slice}."""
    return {"version": STAGE_VERSIONS[job], "config": _slice(config, job, model, benchmark, layer)}


def spec_json(config: dict[str, Any], job: str, **wildcards: Any) -> str:
    """`job_spec` as canonical JSON (sorted keys), for Snakemake params."""
    return json.dumps(job_spec(config, job, **wildcards), sort_keys=True)


def throughput(config: dict[str, Any], model: str) -> dict[str, int]:
    """Batch sizes of `model`'s jobs: how fast, not what; passed as CLI flags, never as params."""
    return _pick(config["models"][model], THROUGHPUT_KEYS)


def alternatives(names: list[str]) -> str:
    """A regex matching exactly one of `names` (for wildcard_constraints; '.' in a slug is literal)."""
    return "|".join(re.escape(name) for name in names)


# Memory requests (mem_mb) follow from the model's size. On CPU a job holds the weights plus room for
# activations and logits (measured: SmolLM2-135M fp32, 538 MB of weights, peaked at 2.9 GB in AGIEval's
# evaluation); on a GPU the weights load straight onto the device, so host memory stays small.
UNKNOWN_MODEL_MB = 16000  # a hub model whose config is not cached yet


def _weights_mb(n_params: int, device: str, dtype: str) -> float:
    resolved = dtype if dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    return n_params * (4 if resolved == "float32" else 2) / 2**20


def model_job_memory_mb(n_params: int | None, device: str, dtype: str) -> int:
    """Host memory (MB) to request for a job that loads the model (evaluate, extract)."""
    if n_params is None:
        return UNKNOWN_MODEL_MB
    weights = _weights_mb(n_params, device, dtype)
    return int(2500 + (2.0 * weights if device == "cpu" else 0.1 * weights + 1500))


# SAE training (sae.train_sae_for_layer) holds, besides the model job's memory: the shuffle buffer (fixed
# when it is made), the first batches that set the decoder bias and norm scale (kept, then concatenated:
# twice), and on CPU the SAE with its gradients and Adam's two moments. Nothing grows with training_tokens.
# Settings of `sae.train` that older configs lack (the schema gives them the same defaults).
SAE_TRAIN_DEFAULTS: dict[str, Any] = {"chat_fraction": 0.5, "buffer_vectors": 131072, "buffer_max_ram_mb": 4096, "epochs": 1,
                                      "autocast": "auto"}
NORM_SAMPLE = 20000  # vectors that set the decoder bias and the activation-norm scale before training


def train_setting(train: dict[str, Any], key: str) -> Any:
    return train.get(key, SAE_TRAIN_DEFAULTS[key])


def sae_read_tokens(train: dict[str, Any]) -> int:
    """Tokens whose activations the model produces for training: training_tokens over `epochs` (the further
    epochs replay them from a cache)."""
    return math.ceil(train["training_tokens"] / train_setting(train, "epochs"))


def sae_replay_mb(train: dict[str, Any], d_model: int) -> float:
    """Host memory of the replay cache (float16, in RAM or as the pages of its file): none for one epoch."""
    return sae_read_tokens(train) * d_model * 2 / 2**20 if train_setting(train, "epochs") > 1 else 0.0


def sae_buffer_vectors(train: dict[str, Any]) -> int:
    """Shuffle-buffer size: the configured one, capped at training_tokens, at least two batches."""
    return max(2 * train["batch_size"], min(train_setting(train, "buffer_vectors"), train["training_tokens"]))


def sae_buffer_mb(train: dict[str, Any], d_model: int) -> float:
    """Host memory of the buffer: float32 in RAM, or float16 pages of its memory-mapped file (counted too:
    dirty page cache counts against a job's memory limit until written back)."""
    float32 = sae_buffer_vectors(train) * d_model * 4
    on_disk = float32 > train_setting(train, "buffer_max_ram_mb") * 2**20
    return (float32 / 2 if on_disk else float32) / 2**20


def sae_job_memory_mb(n_params: int | None, d_model: int | None, train: dict[str, Any], device: str, dtype: str) -> int:
    """Host memory (MB) for SAE training: the model job's, plus the buffer, the replay cache, the norm sample
    and (on CPU) the SAE's training state (weights, gradients, two Adam moments; on a GPU they live on the
    device)."""
    base = model_job_memory_mb(n_params, device, dtype)
    if d_model is None:
        return base
    sample = 2 * min(NORM_SAMPLE, train["training_tokens"]) * d_model * 4 / 2**20
    sae_state = 4 * 2 * d_model * train["d_sae"] * 4 / 2**20 if device == "cpu" else 0
    return int(base + sae_buffer_mb(train, d_model) + sae_replay_mb(train, d_model) + sample + sae_state)


# Runtime requests (minutes): model forward passes dominate SAE training, so seconds per token per model
# parameter, measured and taken 4x (shared or slower machines): CPU, SmolLM2-135M, 300k tokens in 228 s on 2
# quiet cores (5.3e-12); H100, a 1.2B random-weight Llama streamed at 42,600 vectors/s (1.9e-14, bench/README.md).
SECONDS_PER_TOKEN_PARAM = {"cpu": 2e-11, "cuda": 8e-14}


def sae_job_runtime_min(n_params: int | None, train: dict[str, Any], device: str) -> int:
    """Minutes to request for SAE training: start-up, then training and held-out tokens through the model."""
    if n_params is None:
        return 240
    # A replayed vector skips the model and costs training only: about half a model token's time, measured
    # for SmolLM2-135M on CPU (less for larger models, so this errs long).
    read = sae_read_tokens(train)
    tokens = read + train["heldout_tokens"] + (train["training_tokens"] - read) / 2
    seconds = tokens * n_params * SECONDS_PER_TOKEN_PARAM.get(device, SECONDS_PER_TOKEN_PARAM["cpu"])
    return int(10 + seconds / 60)


def check_memory_request(needed_mb: int, requested_mb: int | None, job: str) -> None:
    """Refuse to start a job whose estimated peak exceeds the memory it was granted (Snakemake's mem_mb,
    passed as --mem-mb): better a clear message now than an out-of-memory kill hours in."""
    if requested_mb is not None and needed_mb > requested_mb:
        raise MemoryError(f"{job} needs about {needed_mb} MB of host memory but was granted mem_mb={requested_mb}: "
                          "raise it (snakemake --set-resources) or lower the buffer (buffer_vectors, buffer_max_ram_mb)")
