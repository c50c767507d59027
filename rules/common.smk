# Helpers shared by the rule modules: config validation, result paths, targets, job params.
import os
import sys

from snakemake.utils import validate

from competency_gaps.config import validate_config
from competency_gaps.workflow import spec_json

# The schema (with its descriptions and defaults) ships beside the code; snakemake's validate is the
# community-standard check, validate_config adds defaults deep in the model/benchmark maps and the
# checks a schema cannot express (adapter names, layer range, SAE width).
validate(config, "../resources/config.schema.yaml")
config = validate_config(config)

RESULTS = config["results"]
MODELS = sorted(config["models"])
BENCHMARKS = sorted(config["benchmarks"])
# Jobs call the `competency-gaps` CLI of the environment Snakemake runs in, as if it were activated
# (a rule's conda env, when used, comes first on PATH and brings its own).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def layers_of(model):
    return sorted(entry["layer"] for entry in config["models"][model]["layers"])


def sae_entry(model, layer):
    return next(e["sae"] for e in config["models"][model]["layers"] if e["layer"] == int(layer))


def needs_model(wildcards):
    """SAE jobs need the model (and the corpus) only when they train."""
    if "train" not in sae_entry(wildcards.model, wildcards.layer):
        return {}
    return {
        "manifest": f"{RESULTS}/models/model={wildcards.model}/manifest.json",
        "corpus": f"{RESULTS}/sae_corpus/corpus.parquet",
    }


def imported_scores_file(wildcards):
    """An imported score file is an input, so editing it reruns the import."""
    spec = config["models"][wildcards.model]["scores_from"].get(wildcards.benchmark)
    return {"imported": spec.get("table") or spec.get("lm_eval_samples")} if spec else {}


def scores_if_response(wildcards):
    if not config["saliency"]["include_response"]:
        return {}
    return {"scores": f"{RESULTS}/evaluate/model={wildcards.model}/benchmark={wildcards.benchmark}/scores.parquet"}


def all_targets():
    return [
        f"{RESULTS}/concepts/model={m}/layer={l}/{name}"
        for m in MODELS
        for l in layers_of(m)
        for name in ("concepts.parquet", "concept_benchmark.parquet", "summary.md")
    ]
