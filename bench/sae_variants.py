"""SAE quality against training settings, on the `sae` stage's own training stream, read through the model once.

Usage: .venv/bin/python bench/sae_variants.py [--read-tokens 300000] [--variant "epochs=1 training_tokens=300000" ...]
(run `make run` first: it needs the converted model, the SAE corpus and the benchmarks' items; about 9 minutes
to collect 300k tokens on 2 CPU cores, then about 1.2 minutes per 300k vectors trained)

- Collects, once: the stage's first pass (`sae.training_data(...).first_pass`, the default config's model, layer,
  corpus, chat_fraction and seed) over --read-tokens tokens, the model in the stage's `read_dtype` (auto:
  bfloat16 on a CPU with AVX512-BF16 or AMX; `--read-dtype float32` to compare), float16 in memory; the held-out
  corpus rows (`TrainingData.heldout`) and every default benchmark's counted tokens, read in float32 as extraction
  reads the benchmarks, so every variant is measured against the same vectors.
- Trains each variant (key=value over the default config's `sae.train`) with `sae.train_topk_sae` on the first
  training_tokens / epochs collected vectors, held in memory and reshuffled each epoch (the stage mixes
  within its shuffle buffer of 131,072 vectors and replays later epochs from its cache).
- Prints, per variant: held-out corpus explained variance and dead fraction, the same pooled over the
  benchmarks' counted tokens and per benchmark, and the training seconds. Massive activations (attention
  sinks) are left out of the corpus vectors, as the stage does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from competency_gaps.config import load_config  # noqa: E402
from competency_gaps.models import load_model, load_tokenizer, pick_read_dtype, read_manifest  # noqa: E402
from competency_gaps.prompts import encode_item  # noqa: E402
from competency_gaps.sae import evaluate_sae, prompt_activations, train_topk_sae, training_data  # noqa: E402
from competency_gaps.workflow import sae_read_tokens, train_setting  # noqa: E402

DEFAULT_VARIANTS = ["epochs=1 training_tokens=300000", "epochs=1 training_tokens=150000",
                    "epochs=2 training_tokens=300000", "epochs=3 training_tokens=450000"]


def parse_variant(text: str, base: dict) -> dict:
    spec = dict(base)
    for pair in text.split():
        key, value = pair.split("=")
        spec[key] = float(value) if key in ("lr", "chat_fraction") else int(value)
    return spec


def collect(config: dict, read_tokens: int, batch_tokens: int, read_dtype: torch.dtype) -> tuple[int, dict, torch.Tensor, torch.Tensor, dict]:
    """The default model's layer, its train spec, the first pass (the model in `read_dtype`), and the held-out
    vectors and each benchmark's (the model in float32, as extraction reads the benchmarks on a CPU)."""
    import polars as pl

    results = REPO / config["results"]
    model_name, model_cfg = next(iter(config["models"].items()))
    layer_cfg = model_cfg["layers"][0]
    spec = {**layer_cfg["sae"]["train"], "training_tokens": read_tokens, "epochs": 1}
    manifest = read_manifest(results / "models" / f"model={model_name}" / "manifest.json")
    model = load_model(manifest, torch.device("cpu"), torch.float32)
    reader = model if read_dtype == torch.float32 else load_model(manifest, torch.device("cpu"), read_dtype)
    tokenizer = load_tokenizer(manifest)
    texts = pl.read_parquet(results / "sae_corpus" / "corpus.parquet")["text"].to_list()
    data = training_data(tokenizer, texts, spec, config["sae_corpus"]["context_length"], model_cfg.get("system_prompt"))
    layer, cpu = layer_cfg["layer"], torch.device("cpu")
    start = time.perf_counter()
    train = torch.cat([chunk.half() for chunk in data.first_pass(reader, layer, batch_tokens, cpu)])
    read_s = time.perf_counter() - start
    heldout = torch.cat(list(data.heldout(model, layer, spec["heldout_tokens"], batch_tokens, cpu)))
    print(f"collected {len(train):,} training vectors ({read_dtype}) in {read_s:.0f} s and {len(heldout):,} held-out "
          f"(float32) in {time.perf_counter() - start - read_s:.0f} s", flush=True)
    benchmarks = {}
    for name in config["benchmarks"]:
        items = pl.read_parquet(results / "benchmarks" / f"benchmark={name}" / "items.parquet").to_dicts()
        prompts = [encode_item(tokenizer, item, config["saliency"]["tokens"], model_cfg.get("system_prompt"), None,
                               model_cfg["max_length"]) for item in items]
        benchmarks[name] = torch.cat(list(prompt_activations(model, layer, prompts, batch_tokens=4096)))
    return layer, spec, train, heldout, benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--read-tokens", type=int, default=300_000, help="vectors collected (the largest variant's read)")
    parser.add_argument("--variant", action="append", help=f"key=value ... over sae.train (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--read-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the model's dtype while it reads the training vectors (the config's read_dtype; auto as "
                             "the stage picks it); held-out and benchmarks: float32")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per forward pass (the default model's batch_tokens)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(args.config)
    layer, base, train, heldout, benchmarks = collect(config, args.read_tokens, args.batch_tokens,
                                                         pick_read_dtype(args.read_dtype, torch.device("cpu"), torch.float32))
    pooled = torch.cat(list(benchmarks.values()))
    print("| variant | read | trained | held-out EV | dead | benchmarks EV | dead | per benchmark EV | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for text in args.variant or DEFAULT_VARIANTS:
        spec = parse_variant(text, base)
        read = sae_read_tokens(spec)
        if read > len(train):
            print(f"| {text} | {read:,} | skipped: more than the {len(train):,} vectors collected (--read-tokens) |")
            continue
        start = time.perf_counter()
        sae = train_topk_sae(train[:read].float(), spec, layer, "bench", torch.device("cpu"))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            held, bench = evaluate_sae(sae, heldout), evaluate_sae(sae, pooled)
            each = " ".join(f"{name} {evaluate_sae(sae, x)['explained_variance']:.3f}" for name, x in benchmarks.items())
        print(f"| {text} | {read:,} | {spec['training_tokens']:,} | {held['explained_variance']:.3f} | "
              f"{held['dead_fraction']:.1%} | {bench['explained_variance']:.3f} | {bench['dead_fraction']:.1%} | {each} | "
              f"{seconds:.0f} |", flush=True)
    print(f"(layer {layer}, k {base['k']}, d_sae {base['d_sae']}, batch {base['batch_size']}, lr {base['lr']}, "
          f"chat_fraction {train_setting(base, 'chat_fraction')} unless the variant says otherwise)")


if __name__ == "__main__":
    main()
