"""The `sae` stage's two costs: collecting residual-stream activations, and training the TopK SAE on them.

Usage: .venv/bin/python bench/sae_training.py [--n-vectors 20000] [--random] [--collect-vectors N]
(about 1 minute on 2 CPU cores with the defaults; run `make run` first: it needs the converted model and the
SAE corpus)
       python bench/sae_training.py --stream --shape llama-1b --device cuda --n-vectors 20000000 ...
(the stage's streamed path on a random-weight model, no results/ needed: see `--stream` below)

- Collection: `sae.collect_activations` on the pipeline's model (results/models/model=smollm2-135m) over rows
  of results/sae_corpus/corpus.parquet cut by `sae.token_chunks` (context length 128, batches of 8 rows, as
  the stage runs it), the model in the stage's `read_dtype` (auto: bfloat16 on a CPU with AVX512-BF16 or AMX;
  `--read-dtype float32` for the model jobs' precision); tokens/s counts every token the model reads (position 0
  of each row is read, not kept).
- Training: `sae.train_topk_sae` (sae-lens's SAETrainer, the default config's settings: d_sae 4608, k 256, batch
  1024, lr 2e-3, `autocast` auto) on the collected vectors, or on random vectors of the model's width with --random (with
  --collect-vectors 0 nothing is read from results/); activation vectors/s = training vectors / seconds of the whole `train_topk_sae` call (set-up
  and norm scale included, as in the stage). Trained twice on the same vectors: as the stage trains, decoding
  only the k active latents (`sae_topk.GatheredTopKTrainingSAE`) and stepping a fused Adam
  (`sae_topk.FusedAdamTrainer`), and with sae-lens's own TopKTrainingSAE (dense decode) and SAETrainer (plain
  Adam); the ratio of their rates is printed last. The default config trains on 300k vectors; 20k keeps this run short.
- `--stream`: the stage's streamed path end to end: `sae.row_activations` of a random-weight model of a real
  model's shape (bench/extraction.py's SHAPES) over random token rows, through the `ShuffleBuffer` (in GPU
  memory on cuda when it fits in a quarter of the free memory, else host memory), into `train_topk_sae`.
  Prints vectors/s of the whole run (forward passes + buffer + training) and the process's resident memory
  (VmRSS) at every tenth of the stream, to show it stays flat as tokens grow.
"""

from __future__ import annotations

import argparse
import logging
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

from competency_gaps.models import load_model, load_tokenizer, pick_read_dtype, read_manifest  # noqa: E402
from competency_gaps.sae import collect_activations, evaluate_sae, token_chunks, train_topk_sae, training_autocast  # noqa: E402

DEFAULT_MANIFEST = REPO / "results" / "models" / "model=smollm2-135m" / "manifest.json"
DEFAULT_CORPUS = REPO / "results" / "sae_corpus" / "corpus.parquet"
D_MODEL = 576  # SmolLM2-135M's residual width (the --random vectors' width)


def corpus_chunks(tokenizer, corpus: Path, n_vectors: int, context_length: int, seed: int) -> torch.Tensor:
    """Rows of `context_length` tokens for n_vectors, cut by the stage's `token_chunks` from a seeded sample of
    the corpus documents (tokenizing all 20k documents would take longer than the collection measured)."""
    import polars as pl

    texts = pl.read_parquet(corpus)["text"].to_list()
    tokens_needed = -(-n_vectors // (context_length - 1)) * context_length
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, tokens = [], 0
    for index in order:
        chosen.append(texts[index])
        tokens += len(tokenizer(texts[index], add_special_tokens=False)["input_ids"]) + 1  # + the EOS separator
        if tokens >= tokens_needed:
            break
    return token_chunks(tokenizer, chosen, context_length)


def time_collection(model, layer: int, chunks: torch.Tensor, n_vectors: int, batch_size: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    acts = collect_activations(model, layer, chunks, n_vectors, batch_size, torch.device("cpu"))
    return acts, time.perf_counter() - start


def time_training(acts: torch.Tensor, spec: dict, layer: int, sae_lens_own: bool = False) -> tuple[float, float]:
    """Seconds of `train_topk_sae` and the trained SAE's explained variance on the last 4,096 vectors (seen in
    training: a check that both SAEs learned alike, not a held-out figure)."""
    start = time.perf_counter()
    sae = train_topk_sae(acts, spec, layer, "bench", torch.device("cpu"), sae_lens_own)
    seconds = time.perf_counter() - start
    return seconds, evaluate_sae(sae, acts[-4096:])["explained_variance"]


def random_vectors(n: int, d_model: int, seed: int) -> torch.Tensor:
    """Gaussian vectors with a shared mean direction (the residual stream has a large mean component)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_model, generator=generator) + 3 * torch.randn(d_model, generator=generator)


def resident_mb() -> float:
    """The process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_model_on(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of `shape`, built on `device` directly (no full-size copy in host memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from extraction import SHAPES

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096))
    return model.to(dtype).eval()


def stream_benchmark(args: argparse.Namespace) -> None:
    """The streamed stage path on random token rows; see the module doc (`--stream`)."""
    from competency_gaps.activation_buffer import ShuffleBuffer
    from competency_gaps.sae import row_activations

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model_on(args.shape, device, dtype)
    d_model, vocab = model.config.hidden_size, model.config.vocab_size
    spec = {"d_sae": args.d_sae, "k": args.k, "training_tokens": args.n_vectors, "batch_size": args.batch_size,
            "lr": args.lr, "seed": 0}
    per_row = args.context_length - 1
    import sae_lens  # noqa: F401  (imported once here, outside the timing)

    marks = [args.n_vectors * i // 10 for i in range(1, 11)]
    samples: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    def one_pass(epoch: int):
        generator = torch.Generator().manual_seed(epoch)
        done = 0
        while done < args.n_vectors:
            rows = torch.randint(vocab, (args.collect_batch, args.context_length), generator=generator)
            for chunk in row_activations(model, args.layer, rows, min(args.n_vectors - done, len(rows) * per_row),
                                         args.collect_batch, device):
                done += len(chunk)
                while marks and done >= marks[0]:
                    samples.append((marks.pop(0), resident_mb(), time.perf_counter() - start))
                yield chunk

    capacity = max(2 * args.batch_size, min(args.buffer_vectors, args.n_vectors))
    with ShuffleBuffer(d_model, capacity, args.batch_size, seed=2, device=device) as buffer:
        train_topk_sae(buffer.epochs(one_pass), spec, args.layer, "bench", device)
    seconds = time.perf_counter() - start
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{args.shape} (d_model {d_model}, {str(dtype).removeprefix('torch.')}, random weights) layer {args.layer} on "
          f"{device}: {args.n_vectors:,} vectors ({args.collect_batch} rows × {args.context_length} per forward), "
          f"buffer {capacity:,} vectors ({capacity * d_model * 4 / 2**20:,.0f} MB), SAE {d_model} → {args.d_sae}, k {args.k}, "
          f"batch {args.batch_size}: {seconds:.0f} s, **{args.n_vectors / seconds:,.0f} vectors/s**, peak RSS {peak:,.0f} MB{gpu}")
    print()
    print("| vectors streamed | RSS MB | elapsed s |")
    print("| ---: | ---: | ---: |")
    for vectors, rss, elapsed in samples:
        print(f"| {vectors:,} | {rss:,.0f} | {elapsed:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-vectors", type=int, default=20000, help="training vectors (the default config: 300,000)")
    parser.add_argument("--collect-vectors", type=int, default=None,
                        help="vectors collected (default: --n-vectors, or 4,096 with --random; 0: skip collection)")
    parser.add_argument("--random", action="store_true", help="train on random vectors instead of the collected ones")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1024, help="training batch (the stage's batch_size)")
    parser.add_argument("--collect-batch", type=int, default=8, help="corpus rows per forward (the stage's at batch_tokens 1024)")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream", action="store_true", help="the streamed stage path on a random-weight model (see above)")
    parser.add_argument("--shape", default="smollm2-135m", help="--stream: the model shape (bench/extraction.py's SHAPES)")
    parser.add_argument("--device", default="cpu", help="--stream: cpu or cuda")
    parser.add_argument("--buffer-vectors", type=int, default=131072, help="--stream: the shuffle buffer (the stage's default)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--read-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the model's dtype while collecting (the config's read_dtype; auto as the stage picks it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)  # sae-lens's progress bars and per-step logs stay quiet
    if args.stream:
        stream_benchmark(args)
        return
    collect = args.collect_vectors if args.collect_vectors is not None else (4096 if args.random else args.n_vectors)
    if not args.random and collect < args.n_vectors:
        parser.error("training on collected vectors needs --collect-vectors >= --n-vectors (or --random)")

    spec = {"d_sae": args.d_sae, "k": args.k, "training_tokens": args.n_vectors, "batch_size": args.batch_size,
            "lr": args.lr, "seed": 0}
    read_dtype = pick_read_dtype(args.read_dtype, torch.device("cpu"), torch.float32)
    autocast = training_autocast(spec, torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU; collection in {str(read_dtype).removeprefix('torch.')}, "
          f"training {'under bfloat16 autocast (sae.train.autocast: auto)' if autocast else 'in float32'}")
    print()
    print("| step | size | seconds | rate |")
    print("| --- | --- | ---: | ---: |")
    acts = None
    if collect:
        manifest = read_manifest(args.manifest)
        model, tokenizer = load_model(manifest, torch.device("cpu"), read_dtype), load_tokenizer(manifest)
        chunks = corpus_chunks(tokenizer, Path(args.corpus), collect, args.context_length, seed=0)
        collect_activations(model, args.layer, chunks[: args.collect_batch], 1, args.collect_batch, torch.device("cpu"))  # warm-up
        acts, seconds = time_collection(model, args.layer, chunks, collect, args.collect_batch)
        rows = -(-collect // (args.context_length - 1))
        print(f"| activation collection (`collect_activations`, layer {args.layer}) | {rows} rows × {args.context_length} "
              f"tokens, batch {args.collect_batch} | {seconds:.1f} | {rows * args.context_length / seconds:,.0f} tokens/s "
              f"({collect / seconds:,.0f} vectors kept/s) |")
        del model
    train = random_vectors(args.n_vectors, D_MODEL if acts is None else acts.shape[1], seed=0) if args.random else acts[: args.n_vectors]
    source = "random" if args.random else "collected"
    size = (f"{args.n_vectors:,} {source} vectors, d_model {train.shape[1]}, d_sae {args.d_sae}, k {args.k}, "
            f"batch {args.batch_size} ({args.n_vectors // args.batch_size} steps)")
    rates = {}
    for name, sae_lens_own in (("the stage's (`train_topk_sae`: decodes the k active latents, fused Adam)", False),
                               ("sae-lens's own TopKTrainingSAE and SAETrainer (dense decode, plain Adam)", True)):
        seconds, explained = time_training(train, spec, args.layer, sae_lens_own)
        rates[name] = args.n_vectors / seconds
        print(f"| SAE training, {name} | {size} | {seconds:.1f} | {rates[name]:,.0f} vectors/s (EV {explained:.4f} on "
              "its last 4,096 training vectors) |")
    ours, dense = rates.values()
    print(f"\nSAE training: {ours / dense:.2f}× the vectors/s of sae-lens's own TopK training")


if __name__ == "__main__":
    main()
