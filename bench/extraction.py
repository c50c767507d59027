"""Extraction throughput: the pipeline's device-resident saliency vs the naive approach, on the same prompts.

Naive: full forward with `output_hidden_states=True`, `SAE.encode` on every token of the padded batch, a dense
per-item mean vector copied to the host. Pipeline: `saliency.batch_saliency` (forward stopped at the hooked
layer, only counted tokens encoded, per-item aggregation on the device, only non-zero pairs copied back), at
the same batch sizes and also batched by token budget as the workflow runs it.

Models and SAEs have random weights of a real shape, so nothing is downloaded:
  .venv/bin/python bench/extraction.py                          # CPU: SmolLM2-135M shape, 4,608-concept SAE
  python bench/extraction.py --shape llama-1b --d-sae 65536 --k 64 --layer 8 --n-prompts 512 --batch-sizes 8,32
                                                                # GPU: the issue's H100 setup (bf16)
Prints tokens/s, peak device memory and the fraction of the roofline (FLOPs of the layers up to the hooked
one plus the SAE encoder, over the measured matmul rate of this machine). `--shared-head N` gives every prompt
the same first N uncounted tokens, as a chat template's system turn and a benchmark's instruction do (37-60 of
the default benchmarks' 59-135 SmolLM2 tokens), and adds the workflow's reading of them: once, each batch
starting from their key/value cache (`concept_labels.read_prompts`). Its tokens/s counts every prompt token, the
head's included, so it can pass the roofline of reading them all.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from competency_gaps.concept_labels import read_prompts  # noqa: E402
from competency_gaps.extract import ShardRows  # noqa: E402
from competency_gaps.models import decoder_layers  # noqa: E402
from competency_gaps.prompts import EncodedPrompt  # noqa: E402
from competency_gaps.labels import TopContexts, feed  # noqa: E402
from competency_gaps.saliency import batch_saliency, length_batches, pad_right  # noqa: E402

SHAPES = {  # transformers LlamaConfig fields of real models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
TEMPLATE_TOKENS = 6  # leading tokens not counted, like a chat template's scaffolding


def random_model(shape: str, device: torch.device, dtype: torch.dtype, **config_fields):
    """A seeded random-weight Llama of `shape`; `config_fields` override LlamaConfig fields (say the vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES[shape], **config_fields}, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def random_sae(d_in: int, d_sae: int, k: int, layer: int, device: torch.device, dtype: torch.dtype):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=str(dtype).removeprefix("torch."), device=str(device))
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, d_in**-0.5)
    return sae.to(device=device, dtype=dtype)


def random_prompts(n: int, shortest: int, longest: int, vocab: int, shared_head: int = 0) -> list[EncodedPrompt]:
    """Random token ids; the first max(TEMPLATE_TOKENS, shared_head) are not counted, and the first `shared_head`
    are the same in every prompt."""
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=generator).tolist()
    head = torch.randint(10, vocab, (shared_head,), generator=generator).tolist()
    uncounted = max(TEMPLATE_TOKENS, shared_head)
    return [EncodedPrompt(input_ids=head + torch.randint(10, vocab, (length - shared_head,), generator=generator).tolist(),
                          counted=[i >= uncounted for i in range(length)]) for length in lengths]


@torch.inference_mode()
def naive_batch(model, sae, layer: int, prompts: list[EncodedPrompt], pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, attention, counted = (t.to(device) for t in pad_right(prompts, pad_id))
    hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[layer + 1]
    acts_BLK = sae.encode(hidden)
    weights = counted.to(acts_BLK.dtype)
    mean_BK = torch.einsum("blk,bl->bk", acts_BLK, weights) / weights.sum(1, keepdim=True)
    return mean_BK.float().cpu()


@torch.inference_mode()
def host_aggregated_batch(model, sae, layer: int, prompts: list[EncodedPrompt], pad_id: int, chunk: int = 4096):
    """The extractor before it became device-resident (kept here as the baseline): every encoded chunk is
    copied to the host and aggregated there."""
    from competency_gaps.hooks import residual_stream

    device = next(model.parameters()).device
    ids, attention, counted = pad_right(prompts, pad_id)
    resid = residual_stream(model, layer, ids.to(device), attention.to(device))
    rows, cols = counted.nonzero(as_tuple=True)
    vectors = resid[rows.to(device), cols.to(device)]
    total = torch.zeros(len(prompts), sae.cfg.d_sae)
    for start in range(0, len(rows), chunk):
        acts = sae.encode(vectors[start : start + chunk]).float().clamp_min(0).cpu()
        total.index_add_(0, rows[start : start + chunk], acts)
    return total / counted.sum(1, keepdim=True)


def largest_difference(model, sae, layer: int, prompts: list[EncodedPrompt], pad_id: int) -> float:
    """max |pipeline saliency − naive mean| over one batch (both in the model's dtype)."""
    dense = naive_batch(model, sae, layer, prompts, pad_id)
    sparse = batch_saliency(model, sae, layer, prompts, pad_id)
    ours = torch.zeros_like(dense)
    ours[sparse.row, sparse.concept] = sparse.saliency
    return (ours - dense).abs().max().item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(run_batch: Callable[[list[EncodedPrompt]], object], batches: list[list[EncodedPrompt]],
            device: torch.device) -> tuple[float, float]:
    """tokens/s over all batches and peak device memory in GiB (CUDA only). A first, untimed pass over every
    batch warms each shape up (cuBLAS and attention pick kernels per shape; the first method run would pay it)."""
    for batch in batches:
        run_batch(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = sum(len(p.input_ids) for batch in batches for p in batch)
    start = time.perf_counter()
    for batch in batches:
        run_batch(batch)
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return tokens / elapsed, peak


def matmul_rate(device: torch.device, dtype: torch.dtype, d_model: int, rounds: int = 5) -> float:
    """FLOP/s of a (4096 × d) @ (d × 4d) product, the shape of the model's MLP matmuls: the best of `rounds`
    rounds of 20, since the peak is what the roofline needs and a VM's neighbours only ever slow a round down
    (one round measured 44-83 GFLOP/s on a 2-vCPU VM whose hypervisor took a fifth of its time)."""
    a = torch.randn(4096, d_model, device=device, dtype=dtype)
    b = torch.randn(d_model, 4 * d_model, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats, best = 20, 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, repeats * 2 * 4096 * d_model * 4 * d_model / (time.perf_counter() - start))
    return best


def cpu_matmul_gflops(threads: int | None = None) -> float:
    """This machine's fp32 matmul rate on the CPU in GFLOP/s (SmolLM2's MLP shape), on `threads` threads (None:
    torch's default, every usable core): the figure that makes timings from different machines comparable."""
    if threads:
        torch.set_num_threads(threads)
    return matmul_rate(torch.device("cpu"), torch.float32, 576) / 1e9


def flops_per_token(model, layer: int, d_sae: int, mean_length: float) -> float:
    """Matmul FLOPs per counted token: the weights of decoder layers 0..layer, attention over the prompt, and
    the SAE encoder (an upper bound of the useful work: template tokens are computed but not counted)."""
    layers = decoder_layers(model)[: layer + 1]
    weights = sum(p.numel() for block in layers for name, p in block.named_parameters() if p.dim() == 2)
    d_model = model.config.hidden_size
    attention = 2 * 2 * mean_length / 2 * d_model * (layer + 1)  # QK^T and AV, causal: half the prompt on average
    return 2 * weights + attention + 2 * d_model * d_sae


def item_batches(prompts: list[EncodedPrompt], batch_size: int) -> list[list[EncodedPrompt]]:
    ordered = sorted(prompts, key=lambda p: len(p.input_ids))  # both approaches get the same length-sorted batches
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--n-prompts", type=int, default=48)
    parser.add_argument("--shortest", type=int, default=80)
    parser.add_argument("--longest", type=int, default=400)
    parser.add_argument("--batch-sizes", default="8", help="comma-separated prompts per batch, e.g. 8,32")
    parser.add_argument("--batch-tokens", type=int, default=0, help="also run the token-budget batching (0: 1024 on CPU, the default config's, 32768 on GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--shared-head", type=int, default=0,
                        help="uncounted tokens every prompt starts with (default benchmarks: 37-60); adds a row reading them once")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    model = random_model(args.shape, device, dtype)
    sae = random_sae(model.config.hidden_size, args.d_sae, args.k, args.layer, device, dtype)
    if not 0 <= args.shared_head < args.shortest:
        parser.error("--shared-head must be below --shortest (every prompt needs a token of its own)")
    prompts = random_prompts(args.n_prompts, args.shortest, args.longest, model.config.vocab_size, args.shared_head)
    tokens = sum(len(p.input_ids) for p in prompts)
    mean_length = tokens / len(prompts)
    rate = matmul_rate(device, dtype, model.config.hidden_size)
    per_token = flops_per_token(model, args.layer, args.d_sae, mean_length)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, {dtype}; model {args.shape} (random weights), layer {args.layer}; TopK SAE "
          f"{args.d_sae} × k {args.k}; {len(prompts)} prompts, {tokens} tokens ({args.shortest}–{args.longest})")
    print(f"matmul rate {rate / 1e12:.1f} TFLOP/s; {per_token / 1e9:.2f} GFLOP per token → roofline "
          f"{rate / per_token:,.0f} tokens/s\n")
    print(f"{'batching':<26}{'method':<16}{'tokens/s':>12}{'× naive':>9}{'roofline':>10}{'peak GiB':>10}")
    pad_id = 0
    budget = args.batch_tokens or (32768 if device.type == "cuda" else 1024)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batches = item_batches(prompts, batch_size)
        naive, naive_peak = measure(lambda b: naive_batch(model, sae, args.layer, b, pad_id), batches, device)
        host, host_peak = measure(lambda b: host_aggregated_batch(model, sae, args.layer, b, pad_id), batches, device)
        ours, ours_peak = measure(lambda b: batch_saliency(model, sae, args.layer, b, pad_id), batches, device)
        for method, value, peak in (("naive", naive, naive_peak), ("host-aggregated", host, host_peak),
                                    ("pipeline", ours, ours_peak)):
            print(f"{f'{batch_size} prompts':<26}{method:<16}{value:>12,.0f}{value / naive:>9.2f}"
                  f"{value * per_token / rate:>10.0%}{peak:>10.2f}")
    budget_batches = [[prompts[i] for i in batch] for batch in length_batches([len(p.input_ids) for p in prompts], budget)]
    ours, peak = measure(lambda b: batch_saliency(model, sae, args.layer, b, pad_id), budget_batches, device)
    print(f"{f'{budget} tokens (workflow)':<26}{'pipeline':<16}{ours:>12,.0f}{'':>9}{ours * per_token / rate:>10.0%}{peak:>10.2f}")
    contexts = TopContexts(args.d_sae, k=20, before=12, after=4)
    rows_of = {id(batch): torch.arange(i * 10_000, i * 10_000 + len(batch)) for i, batch in enumerate(budget_batches)}
    with_contexts, peak = measure(lambda b: batch_saliency(model, sae, args.layer, b, pad_id,
                                                           lambda acts: feed([contexts], None, acts, rows_of[id(b)])),
                                  budget_batches, device)
    print(f"{'  + top-20 contexts':<26}{'pipeline':<16}{with_contexts:>12,.0f}{'':>9}"
          f"{with_contexts * per_token / rate:>10.0%}{peak:>10.2f}   (labels: {contexts.n_rows:,} contexts kept)")
    shard = ShardRows()  # what extraction keeps of each batch for the benchmark's shard
    positions = {id(batch): list(range(i * 10_000, i * 10_000 + len(batch))) for i, batch in enumerate(budget_batches)}
    with_rows, peak = measure(lambda b: shard.add(positions[id(b)], batch_saliency(model, sae, args.layer, b, pad_id)),
                              budget_batches, device)
    print(f"{'  + shard rows kept':<26}{'pipeline':<16}{with_rows:>12,.0f}{'':>9}"
          f"{with_rows * per_token / rate:>10.0%}{peak:>10.2f}   (extract.ShardRows)")
    if args.shared_head:
        # As extraction reads a benchmark (concept_labels.read_prompts): the head once, then every batch after it.
        with_head, peak = measure(lambda batch: list(read_prompts(model, sae, args.layer, batch, pad_id, budget, [])),
                                  [prompts], device)
        print(f"{'  + head read once':<26}{'pipeline':<16}{with_head:>12,.0f}{'':>9}"
              f"{with_head * per_token / rate:>10.0%}{peak:>10.2f}   ({args.shared_head} tokens of every prompt)")
    print(f"\nStopping at layer {args.layer} of {model.config.num_hidden_layers} skips "
          f"{1 - (args.layer + 1) / model.config.num_hidden_layers:.0%} of the layers: the forward pass alone gains at most "
          f"{model.config.num_hidden_layers / (args.layer + 1):.2f}× over the naive full forward; beyond that the gain "
          "comes from encoding only counted tokens and aggregating on the device.")
    difference = largest_difference(model, sae, args.layer, item_batches(prompts, 8)[0], pad_id)
    print(f"\nlargest |pipeline − naive| saliency on one batch: {difference:.2e} ({dtype})")


if __name__ == "__main__":
    main()
