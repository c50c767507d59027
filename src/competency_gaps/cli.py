"""Command-line entry points, one per pipeline stage; the Snakemake rules call these.

Each stage takes the config slice it depends on as `--spec JSON` (what the rules pass) or, for running a
stage by hand while debugging, `--config config.yaml` plus the model/benchmark/layer it is for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

# The Parquet inputs of each stage (argument names), checked before the stage runs: a truncated or foreign
# shard stops the job with a message naming the file, so nothing downstream is built on it.
INPUT_TABLES = {
    "evaluate": ("items",),
    "sae": ("corpus",),
    "extract": ("items", "scores"),
    "corpus_contexts": ("corpus",),
    "labels": ("corpus_contexts", "contexts"),
    "reduce": ("saliency", "tokens", "scores", "labels"),
    "robustness": ("saliency", "tokens", "scores", "labels"),
    "figures": ("concept_benchmark", "concepts", "benchmarks", "overlap", "items", "scores", "saliency"),
    "explorer": ("concepts", "labels", "concept_map", "items", "scores", "saliency"),
}

# Job start-up is timed from here (the interpreter starts ~0.05 s earlier): see `_log_ready`.
_STARTED = time.perf_counter()
log = logging.getLogger("competency_gaps.cli")


def _config_file_spec(args: argparse.Namespace, job: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's slice and its throughput settings, read from --config (running a stage by hand)."""
    from competency_gaps.config import load_config
    from competency_gaps.workflow import job_spec, throughput

    config = load_config(args.config)
    model = getattr(args, "model", None)
    spec = job_spec(config, job, model=model, benchmark=getattr(args, "benchmark", None), layer=getattr(args, "layer", None))
    return spec["config"], throughput(config, model) if model else {}


def _spec(args: argparse.Namespace, job: str) -> dict[str, Any]:
    """The config slice of this job: from --spec (what the rules pass: {"version", "config"}) or --config."""
    if args.spec:
        return json.loads(args.spec)["config"]
    if not args.config:
        raise SystemExit(f"{job}: give --spec JSON or --config FILE")
    spec, speeds = _config_file_spec(args, job)
    for key, value in speeds.items():  # flags given on the command line win over the config file
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return spec


def _log_ready(what: str) -> None:
    """Log the job's start-up time: imports and loading, up to its first model work."""
    log.info("ready after %.1f s (imports, %s loaded)", time.perf_counter() - _STARTED, what)


def _log_finished() -> None:
    """Log the job's wall and CPU time and peak memory, measured by the process itself (Snakemake's benchmark
    files sample CPU time, which misses up to its sampling interval); bench/main_job.py reads this line."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    log.info("finished after %.1f s wall, %.1f CPU-seconds, peak RSS %.0f MB", time.perf_counter() - _STARTED,
             usage.ru_utime + usage.ru_stime, peak_mb)


def _torch_runtime(runtime: dict[str, Any]):
    """The job's device and model dtype: `read_dtype` for the jobs whose spec has one (they only read
    activations, see workflow._reading_runtime), else `dtype`."""
    from competency_gaps.models import pick_device, pick_dtype, pick_read_dtype

    # Nothing a model job computes is random (greedy decoding, deterministic extraction; SAE training
    # seeds itself from its own `seed`); the fixed seed only pins any library that samples anyway.
    random.seed(0)
    import torch

    torch.manual_seed(0)
    device = pick_device(runtime["device"])
    dtype = pick_dtype(runtime["dtype"], device)
    if "read_dtype" not in runtime:
        return device, dtype
    read_dtype = pick_read_dtype(runtime["read_dtype"], device, dtype)
    log.info("the model reads activations in %s (read_dtype: %s)", str(read_dtype).removeprefix("torch."),
             runtime["read_dtype"])
    return device, read_dtype


def cmd_prepare(args: argparse.Namespace) -> None:
    from competency_gaps.prepare import run_prepare

    run_prepare(args.benchmark, _spec(args, "prepare"), Path(args.items), Path(args.report))


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from competency_gaps.models import convert_gguf

    source = _spec(args, "convert_gguf")
    if "gguf_package" not in source:
        raise SystemExit(f"convert-gguf: model source {source} is not a gguf_package")
    convert_gguf(source["gguf_package"], source.get("file"), Path(args.out_dir))


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from competency_gaps.models import prepare_model

    prepare_model(_spec(args, "prepare_model"), Path(args.manifest), Path(args.converted) if args.converted else None)


def cmd_corpus(args: argparse.Namespace) -> None:
    from competency_gaps.corpus import build_corpus

    build_corpus(_spec(args, "corpus"), Path(args.out))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from competency_gaps.evaluate import run_evaluate, run_import
    from competency_gaps.models import load_model, load_tokenizer, read_manifest

    spec = _spec(args, "evaluate")
    if spec.get("import"):
        run_import(args.items, args.out, spec["import"])
        return
    device, dtype = _torch_runtime(spec["runtime"])
    manifest = read_manifest(args.manifest)
    model, tokenizer = load_model(manifest, device, dtype), load_tokenizer(manifest)
    _log_ready("model")
    run_evaluate(model, tokenizer, args.items, args.out, spec["model"], spec["benchmark"],
                 batch_size=args.batch_size or 8, generation_batch_size=args.generation_batch_size or 8)


def cmd_sae(args: argparse.Namespace) -> None:
    from competency_gaps.models import load_model, load_tokenizer, read_manifest
    from competency_gaps.sae import fetch_sae, train_sae_for_layer
    from competency_gaps.workflow import check_memory_request, sae_job_memory_mb

    spec = _spec(args, "sae")
    out_dir = Path(args.out_dir)
    if "train" not in spec["sae"]:
        fetch_sae(spec["sae"], out_dir, allow_pickle=spec.get("allow_pickle", False))
        return
    device, dtype = _torch_runtime(spec["runtime"])
    manifest = read_manifest(args.manifest)
    model = load_model(manifest, device, dtype)
    train = spec["sae"]["train"]
    needed = sae_job_memory_mb(sum(p.numel() for p in model.parameters()), model.config.get_text_config().hidden_size,
                               train, device.type, str(dtype).removeprefix("torch."))
    check_memory_request(needed, args.mem_mb, "SAE training")
    train_sae_for_layer(model, load_tokenizer(manifest), spec["layer"], train, Path(args.corpus), spec["context_length"],
                        spec["model"], out_dir, device, args.batch_tokens, system_prompt=spec.get("system_prompt"),
                        buffer_dir=args.buffer_dir)


def cmd_sae_quality(args: argparse.Namespace) -> None:
    from competency_gaps.sae import run_sae_quality

    spec = _spec(args, "sae_quality")
    run_sae_quality(args.fits, Path(args.summary), Path(args.out), spec["layer"])


def _model_and_sae(spec: dict[str, Any], manifest_path: str, sae_dir: str):
    """The model, its tokenizer and the layer's SAE, on the configured device, checked to fit each other."""
    from competency_gaps.models import decoder_layers, load_model, load_tokenizer, read_manifest
    from competency_gaps.sae import check_sae_fits, load_sae

    device, dtype = _torch_runtime(spec["runtime"])
    manifest = read_manifest(manifest_path)
    model = load_model(manifest, device, dtype)
    layer = spec["layer"]
    if layer >= len(decoder_layers(model)):
        raise ValueError(f"layer {layer} is out of range: the model has {len(decoder_layers(model))} decoder layers")
    sae = load_sae(sae_dir, device)
    check_sae_fits(sae, layer, model.config.get_text_config().hidden_size, f"SAE in {sae_dir}")
    tokenizer = load_tokenizer(manifest)
    _log_ready("model and SAE")
    return model, tokenizer, sae


def cmd_extract(args: argparse.Namespace) -> None:
    from competency_gaps.extract import run_extract

    spec = _spec(args, "extract")
    model, tokenizer, sae = _model_and_sae(spec, args.manifest, args.sae_dir)
    run_extract(model, tokenizer, sae, spec["layer"], args.items, args.scores, args.out, args.tokens, args.contexts,
                spec["model"], spec["benchmark"], spec["saliency"], spec["contexts"], args.benchmark,
                batch_tokens=args.batch_tokens, sae_fit_path=args.sae_fit)


def cmd_corpus_contexts(args: argparse.Namespace) -> None:
    from competency_gaps.concept_labels import run_corpus_contexts

    spec = _spec(args, "corpus_contexts")
    model, tokenizer, sae = _model_and_sae(spec, args.manifest, args.sae_dir)
    run_corpus_contexts(model, tokenizer, sae, spec["layer"], args.corpus, spec, Path(args.out), Path(args.pool),
                        batch_tokens=args.batch_tokens)


def cmd_labels(args: argparse.Namespace) -> None:
    from competency_gaps.concept_labels import run_labels

    spec = _spec(args, "labels")
    model, tokenizer, sae = _model_and_sae(spec, args.manifest, args.sae_dir)
    run_labels(model, tokenizer, sae, args.corpus_contexts, args.negative_pool, args.contexts, spec, Path(args.out_dir),
               args.title, llm_cache=args.llm_cache)


def cmd_reduce(args: argparse.Namespace) -> None:
    from competency_gaps.reduce import run_reduce

    spec = _spec(args, "reduce")
    n_concepts = json.loads((Path(args.sae_dir) / "cfg.json").read_text())["d_sae"]
    run_reduce(args.saliency, args.tokens, args.scores, n_concepts, spec["gaps"], Path(args.out_dir), args.title,
               labels_path=args.labels, stability_path=args.stability, validity_path=args.validity)


def cmd_figures(args: argparse.Namespace) -> None:
    from competency_gaps.figures import run_figures

    run_figures(args.concept_benchmark, args.concepts, args.benchmarks, args.overlap, args.thresholds, args.items,
                args.scores, args.saliency, Path(args.out_dir), args.title, labels_path=args.labels,
                top_n=args.top, n_cards=args.cards, per_side=args.examples, n_wrong=args.wrong,
                n_item_concepts=args.item_concepts)


def cmd_robustness(args: argparse.Namespace) -> None:
    from competency_gaps.robustness import run_robustness

    spec = _spec(args, "robustness")
    n_concepts = json.loads((Path(args.sae_dir) / "cfg.json").read_text())["d_sae"]
    run_robustness(args.saliency, args.tokens, args.scores, n_concepts, spec.get("robustness") or {},
                   spec.get("gaps") or {}, Path(args.out_dir), labels_path=args.labels, title=args.title)
    if args.figures:
        from competency_gaps.figures import run_robustness_figures

        run_robustness_figures(Path(args.out_dir), context=args.title)


def cmd_concept_map(args: argparse.Namespace) -> None:
    from competency_gaps.concept_map import run_concept_map

    run_concept_map(Path(args.sae_weights).parent, _spec(args, "concept_map")["explorer"], Path(args.out))


def cmd_explorer(args: argparse.Namespace) -> None:
    from competency_gaps.explorer_site import run_explorer

    spec = _spec(args, "explorer")["explorer"]
    run_explorer(Path(args.concepts).parent, Path(args.labels).parent, Path(args.sae_summary), Path(args.concept_map),
                 args.items, args.scores, args.saliency, spec, Path(args.out_dir), args.model, args.layer)


def cmd_explorer_index(args: argparse.Namespace) -> None:
    from competency_gaps.explorer_site import write_index

    write_index(json.loads(args.sites), Path(args.out_dir))


def cmd_compare(args: argparse.Namespace) -> None:
    from competency_gaps.compare import CompareOptions, read_run, run_compare

    options = CompareOptions(**_spec(args, "compare"))
    runs = [read_run(getattr(args, f"name_{side}"), getattr(args, f"saliency_{side}"), getattr(args, f"tokens_{side}"),
                     getattr(args, f"scores_{side}"), getattr(args, f"concepts_{side}"), getattr(args, f"labels_{side}"),
                     getattr(args, f"sae_dir_{side}")) for side in ("a", "b")]
    run_compare(*runs, options, Path(args.out_dir))


def cmd_flipped_sae(args: argparse.Namespace) -> None:
    from competency_gaps.compare import CompareOptions, run_flipped

    run_flipped(args.own, args.flipped, args.labels, args.sae_of, args.reader, CompareOptions(**_spec(args, "compare")),
                Path(args.out_dir))


def add_batch_tokens(command: argparse.ArgumentParser) -> None:
    """--batch-tokens, the model's batch_tokens: Snakemake passes it as a resource (speed, not results)."""
    from competency_gaps.workflow import BATCH_TOKENS

    command.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                         help=f"padded tokens per forward pass when reading activations (default {BATCH_TOKENS}, as the "
                              "config's; GPU: 32768 or more)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="competency-gaps", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, func, help_text: str, *wildcards: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name.replace("_", "-"), help=help_text, description=help_text)
        command.set_defaults(func=func)
        source = command.add_mutually_exclusive_group()
        source.add_argument("--spec", help="config slice for this job as JSON (what the Snakemake rules pass)")
        source.add_argument("--config", help="or: read the slice from this config file")
        for wildcard in wildcards:
            command.add_argument(f"--{wildcard}", required=True, type=int if wildcard == "layer" else str)
        return command

    c = stage("prepare", cmd_prepare, "read one benchmark into the normalised items table", "benchmark")
    c.add_argument("--items", required=True, help="output items Parquet")
    c.add_argument("--report", required=True, help="output JSON: rows read, malformed rows (file, line, field), items kept")

    c = stage("convert_gguf", cmd_convert_gguf, "de-quantise a packaged GGUF model into a safetensors folder", "model")
    c.add_argument("--out-dir", required=True, help="the transformers folder to write (model + tokenizer)")

    c = stage("prepare_model", cmd_prepare_model, "write a model's manifest (what from_pretrained loads; hub ids pinned to a commit)", "model")
    c.add_argument("--manifest", required=True)
    c.add_argument("--converted", help="the folder convert-gguf wrote (gguf_package models)")

    c = stage("corpus", cmd_corpus, "sample the offline SAE-training text corpus")
    c.add_argument("--out", required=True)

    c = stage("evaluate", cmd_evaluate, "score every item of one benchmark with one model (p_i), or import the scores (models.M.scores_from)", "model", "benchmark")
    c.add_argument("--manifest", required=True)
    c.add_argument("--items", required=True)
    c.add_argument("--out", required=True, help="output scores Parquet")
    c.add_argument("--batch-size", type=int, help="prompts per log-likelihood forward pass (default: the model's batch_size, else 8)")
    c.add_argument("--generation-batch-size", type=int, help="prompts decoded together (default: the model's generation_batch_size, else 8)")

    c = stage("sae", cmd_sae, "train, download or copy the SAE of one (model, layer)", "model", "layer")
    c.add_argument("--manifest", help="model manifest (needed to train)")
    c.add_argument("--corpus", help="corpus Parquet (needed to train)")
    c.add_argument("--out-dir", required=True, help="folder for cfg.json, sae_weights.safetensors, summary.json")
    add_batch_tokens(c)
    c.add_argument("--buffer-dir", help="folder for the shuffle buffer's file when it exceeds buffer_max_ram_mb (default: the temp dir)")
    c.add_argument("--mem-mb", type=int, help="host memory granted to the job (Snakemake's mem_mb): training refuses to start "
                   "when its estimate exceeds it")

    c = stage("sae_quality", cmd_sae_quality, "explained variance, L0 and dead fraction of one (model, layer)'s SAE on the "
              "benchmark prompts' counted tokens (merged from what extraction measured), beside its held-out corpus figures",
              "model", "layer")
    c.add_argument("--summary", required=True, help="the SAE's summary.json (its held-out corpus figures)")
    c.add_argument("--fits", nargs="+", required=True, help="extraction's sae_fit.json files, one per benchmark")
    c.add_argument("--out", required=True, help="output quality JSON")

    c = stage("extract", cmd_extract, "per-item concept saliency of one benchmark at one layer", "model", "benchmark", "layer")
    c.add_argument("--manifest", required=True)
    c.add_argument("--sae-dir", required=True)
    c.add_argument("--items", required=True)
    c.add_argument("--scores", help="scores Parquet (needed with saliency.include_response)")
    c.add_argument("--out", required=True, help="output saliency shard (sparse long form)")
    c.add_argument("--tokens", required=True, help="output per-item token counts")
    c.add_argument("--contexts", required=True, help="output: each concept's top contexts among the items")
    c.add_argument("--sae-fit", help="output: how well the SAE reconstructs the counted tokens (JSON, for sae_quality)")
    add_batch_tokens(c)

    c = stage("corpus_contexts", cmd_corpus_contexts, "the labels' corpus pass for one (model, layer): the SAE corpus's "
              "top contexts, a held-out activating sample and a pool of negative windows", "model", "layer")
    c.add_argument("--manifest", required=True)
    c.add_argument("--sae-dir", required=True)
    c.add_argument("--corpus", required=True, help="the SAE corpus")
    c.add_argument("--out", required=True, help="output CONTEXTS Parquet: the corpus's top contexts and the sample")
    c.add_argument("--pool", required=True, help="output safetensors: the negative pool")
    add_batch_tokens(c)

    c = stage("labels", cmd_labels, "logit lens, a label and its detection score for every concept of one (model, layer)",
              "model", "layer")
    c.add_argument("--manifest", required=True)
    c.add_argument("--sae-dir", required=True)
    c.add_argument("--corpus-contexts", required=True, help="the corpus pass's contexts (corpus-contexts --out)")
    c.add_argument("--negative-pool", required=True, help="the corpus pass's negative pool (corpus-contexts --pool)")
    c.add_argument("--contexts", nargs="*", default=[], help="top-context shards written by extraction (one per benchmark)")
    c.add_argument("--out-dir", required=True, help="folder for labels.parquet, contexts.parquet, concept_cards.md, label_quality.json")
    c.add_argument("--llm-cache", help="JSONL cache of the LLM labeller's answers (labels.llm; resumable)")
    c.add_argument("--title", default="Concept cards")

    c = stage("reduce", cmd_reduce, "concept × benchmark gap tables for one (model, layer)")
    c.add_argument("--sae-dir", required=True, help="SAE folder (its width K)")
    c.add_argument("--saliency", nargs="+", required=True)
    c.add_argument("--tokens", nargs="+", required=True)
    c.add_argument("--scores", nargs="+", required=True)
    c.add_argument("--labels", help="labels.parquet of the labels stage: concepts named with their labels in summary.md")
    c.add_argument("--stability", help="stability.json of the robustness stage: its resampling std quoted in summary.md")
    c.add_argument("--validity", help="validity.json of the robustness stage: its effects and p-values quoted in summary.md")
    c.add_argument("--out-dir", required=True)
    c.add_argument("--title", default="Competency gaps")

    c = stage("robustness", cmd_robustness, "resampling stability and predictive validity of the gap tables for one (model, layer)")
    c.add_argument("--sae-dir", required=True, help="SAE folder (its width K)")
    c.add_argument("--saliency", nargs="+", required=True)
    c.add_argument("--tokens", nargs="+", required=True)
    c.add_argument("--scores", nargs="+", required=True)
    c.add_argument("--labels", help="labels.parquet of the labels stage: concepts named with their labels in robustness.md")
    c.add_argument("--out-dir", required=True, help="folder for stability.parquet/json, validity.parquet/json and robustness.md")
    c.add_argument("--figures", action="store_true",
                   help="also render stability.png/svg and validity.png/svg from the tables, in the same folder")
    c.add_argument("--title", default="", help="context line under the figure titles (model, layer)")

    c = stage("figures", cmd_figures, "figures, ranked concept tables and example cards for one (model, layer)")
    c.add_argument("--concept-benchmark", required=True, help="concept_benchmark.parquet of the reducer")
    c.add_argument("--concepts", required=True, help="concepts.parquet of the reducer")
    c.add_argument("--benchmarks", required=True, help="benchmarks.parquet of the reducer")
    c.add_argument("--overlap", required=True, help="overlap.parquet of the reducer")
    c.add_argument("--thresholds", help="thresholds.json of the reducer (χ_bench thresholds, support filter)")
    c.add_argument("--items", nargs="+", required=True, help="items tables (benchmark categories, example prompts)")
    c.add_argument("--scores", nargs="+", required=True, help="scores tables (example cards)")
    c.add_argument("--saliency", nargs="+", required=True, help="saliency shards of this layer (example cards)")
    c.add_argument("--out-dir", required=True)
    c.add_argument("--title", default="", help="context line under every figure title (model, layer)")
    c.add_argument("--labels", help="labels.parquet of the labels stage (or any CSV/Parquet with columns concept, label)")
    c.add_argument("--top", type=int, default=25, help="concepts per ranked table")
    c.add_argument("--cards", type=int, default=10, help="weakest concepts given an example card")
    c.add_argument("--examples", type=int, default=2, help="lowest- and highest-scored items per concept and benchmark")
    c.add_argument("--wrong", type=int, default=5, help="lowest-scored wrong items per benchmark in wrong_items.md")
    c.add_argument("--item-concepts", type=int, default=5, help="top concepts by saliency shown per wrong item")

    c = stage("concept_map", cmd_concept_map, "the concept map's layout of one SAE (UMAP of its decoder directions, "
              "k-means clusters)", "model", "layer")
    c.add_argument("--sae-weights", required=True, help="the SAE's sae_weights.safetensors (its decoder directions)")
    c.add_argument("--out", required=True, help="output Parquet: concept, x, y, cluster")

    c = stage("explorer", cmd_explorer, "the interactive explorer (a static site) of one (model, layer)", "model", "layer")
    c.add_argument("--concepts", required=True, help="concepts.parquet of the reducer (its folder's tables are read)")
    c.add_argument("--labels", required=True, help="labels.parquet of the labels stage (its folder's contexts.parquet too)")
    c.add_argument("--sae-summary", required=True, help="the SAE's summary.json (its settings and quality, in the overview)")
    c.add_argument("--concept-map", required=True, help="concept_map.parquet of the concept_map stage (the map's layout)")
    c.add_argument("--items", nargs="+", required=True, help="items tables (prompts, gold answers, categories)")
    c.add_argument("--scores", nargs="+", required=True, help="scores tables (scores, responses)")
    c.add_argument("--saliency", nargs="+", required=True, help="saliency shards of this layer (items' top concepts)")
    c.add_argument("--out-dir", required=True, help="the site's folder (replaced whole)")

    c = sub.add_parser("explorer-index", help="the page linking every explorer of a run, and sites.js",
                       description="the page linking every explorer of a run, and sites.js")
    c.set_defaults(func=cmd_explorer_index)
    c.add_argument("--sites", required=True, help='JSON list of {"model", "layer", "href"} (href relative to --out-dir)')
    c.add_argument("--out-dir", required=True, help="results/explorer")

    c = stage("compare", cmd_compare, "compare two (model, layer)s: matched concepts by χ_model difference, benchmarks item by item")
    for side in ("a", "b"):
        c.add_argument(f"--name-{side}", required=True, help=f"model {side.upper()}'s name in the tables (model, layer)")
        c.add_argument(f"--sae-dir-{side}", required=True, help="its SAE folder (its width K)")
        c.add_argument(f"--saliency-{side}", nargs="+", required=True)
        c.add_argument(f"--tokens-{side}", nargs="+", required=True)
        c.add_argument(f"--scores-{side}", nargs="+", required=True)
        c.add_argument(f"--concepts-{side}", required=True, help="its concepts.parquet")
        c.add_argument(f"--labels-{side}", help="its labels.parquet")
    c.add_argument("--out-dir", required=True, help="folder for cross_model.md/.csv/.json/.png/.svg and benchmarks.csv")

    c = stage("flipped_sae", cmd_flipped_sae, "one SAE's concepts scored on its own model and on another model it reads, compared by rank")
    c.add_argument("--own", required=True, help="concepts.parquet of the SAE's own model")
    c.add_argument("--flipped", required=True, help="concepts.parquet of the other model read through the same SAE")
    c.add_argument("--labels", help="labels.parquet of the SAE's own model")
    c.add_argument("--sae-of", required=True, help="the SAE's own model (name in the tables)")
    c.add_argument("--reader", required=True, help="the model the SAE reads (name in the tables)")
    c.add_argument("--out-dir", required=True, help="folder for flipped.md/.csv/.json")
    return parser


def check_input_tables(args: argparse.Namespace) -> None:
    """Stop with DamagedTableError (naming the file and how to rebuild it) when a Parquet input is damaged."""
    from competency_gaps.tables import check_parquet

    for name in INPUT_TABLES.get(args.stage.replace("-", "_"), ()):
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if path is not None and str(path).endswith(".parquet"):
                check_parquet(path)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_input_tables(args)
    args.func(args)
    _log_finished()


if __name__ == "__main__":
    main()
