"""Cost of the labels at a given SAE width: the corpus pass (the corpus_contexts job: forward + SAE + top contexts),
then the labels job's context tables and logit lens + labels + detection scores, and peak memory.

Random SAE weights are fine for timing. It reads the default model and SAE corpus from a results folder (run
`make run` once first); at the default width it also merges that run's benchmark contexts.
  .venv/bin/python bench/labels.py                      # the default SAE width (4,608)
  .venv/bin/python bench/labels.py --d-sae 65536 --k 64 # the issue's 65,536-concept case
Prints seconds per step and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from competency_gaps.concept_labels import (  # noqa: E402
    TokenText,
    collect_corpus_contexts,
    context_tables,
    corpus_context_frame,
    label_concepts,
)
from competency_gaps.models import load_model, load_tokenizer, read_manifest  # noqa: E402


def random_topk_sae(d_in: int, d_sae: int, k: int, layer: int):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, d_in**-0.5)
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "results"), help="a results folder with the default model and corpus")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--corpus-tokens", type=int, default=32768)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    manifest = read_manifest(results / f"models/model={args.model}/manifest.json")
    model, tokenizer = load_model(manifest, torch.device("cpu"), torch.float32), load_tokenizer(manifest)
    sae = random_topk_sae(model.config.hidden_size, args.d_sae, args.k, args.layer)
    spec = {"labels": {"top_k": 20, "before": 12, "after": 4, "corpus_tokens": args.corpus_tokens, "n_detection": 10,
                       "negative_pool": 1000, "n_tokens": 10, "seed": 0, "llm": None},
            "neuronpedia": None, "layer": args.layer, "context_length": 128}
    steps = {}
    start = time.perf_counter()
    collected = collect_corpus_contexts(model, tokenizer, sae, args.layer, str(results / "sae_corpus/corpus.parquet"),
                                        spec, args.batch_tokens)
    steps["corpus pass (forward + SAE + top contexts)"] = time.perf_counter() - start
    start = time.perf_counter()
    text = TokenText(tokenizer)
    benchmark_contexts = sorted(str(p) for p in results.glob(f"extract/model={args.model}/benchmark=*/layer={args.layer}/contexts.parquet")) \
        if args.d_sae == 4608 else []
    top, sample = context_tables(corpus_context_frame(collected, text), benchmark_contexts, 20)
    steps["context tables (decode, merge)"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = label_concepts(model, sae, top, sample, collected.pool, text, spec)
    steps["logit lens + labels + detection"] = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"labels stage, {args.d_sae:,} concepts (TopK k {args.k}, random weights), {args.corpus_tokens:,} corpus tokens, "
          f"{torch.get_num_threads()} threads")
    for name, seconds in steps.items():
        print(f"  {name:<45}{seconds:>8.1f} s")
    print(f"  {'total':<45}{sum(steps.values()):>8.1f} s")
    print(f"  live concepts {int(labels['live'].sum()):,}; {top.height:,} top and {sample.height:,} sampled contexts; "
          f"peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
