"""Greedy generation: the pipeline's `evaluate.greedy_decode` against a plain `model.generate` loop.

Usage: .venv/bin/python bench/generation.py [--n-prompts 40] [--batch-size 40] [--max-new-tokens 512]
(the defaults are the evaluate stage's on GSM8K: about 7 minutes on 2 idle CPU cores, one repeat; run `make run`
first: it needs the converted model)

Both decode the same prompts greedily in the same batches, left padded, with the same stop tokens
(`evaluate.stop_token_ids`) and the same max_new_tokens; the pipeline drops a row from the batch (and its
key/value cache) once it stops, `generate` decodes it until the batch's longest row stops. Prompts are GSM8K items
of results/benchmarks/benchmark=gsm8k/items.parquet rendered by the pipeline's own `prompt_text` (what the
evaluate stage decodes), the model is the pipeline's SmolLM2 (results/models/model=smollm2-135m/manifest.json).
New tokens are counted the same way for both, from the generated ids: per row, up to and including its first
stop token (each is one decoding step), or max_new_tokens when it has none; the padding after a stop is not
counted. The two run batch by batch in alternating order, every batch --repeats times (default 1), so that a
drift of the VM's speed hits both alike; tokens/s is given over all runs and over each batch's fastest repeat
(on the shared 2-core VM a burst of other work slowed one decoding run up to 15×, the other not at all).
Prints new tokens/s, decoding steps, the rows decoded over them and whether the decoded texts (and token ids)
are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import polars as pl  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from competency_gaps import evaluate  # noqa: E402
from competency_gaps.models import load_model, load_tokenizer, read_manifest  # noqa: E402
from competency_gaps.prompts import prompt_text  # noqa: E402

DEFAULT_MANIFEST = REPO / "results" / "models" / "model=smollm2-135m" / "manifest.json"
DEFAULT_ITEMS = REPO / "results" / "benchmarks" / "benchmark=gsm8k" / "items.parquet"


def encode_batch(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left padded, no special tokens added: the rendered chat prompt already holds them (as in the pipeline)."""
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.inference_mode()
def plain_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   stop_ids: list[int]) -> tuple[list[str], list[list[int]]]:
    """What one would write by hand: tokenize, `generate`, decode the new tokens."""
    encoded = encode_batch(tokenizer, prompts)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                            pad_token_id=tokenizer.pad_token_id)
    new = output[:, encoded["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True), [evaluate.until_stop(row, stop_ids) for row in new.tolist()]


def pipeline_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                      stop_ids: list[int]) -> tuple[list[str], list[list[int]]]:
    """The evaluate stage's decoding of one batch (`evaluate.greedy_decode`: a row leaves the batch when it stops),
    its texts decoded as `evaluate.greedy_responses` decodes them."""
    encoded = encode_batch(tokenizer, prompts)
    rows = evaluate.greedy_decode(model, encoded["input_ids"], encoded["attention_mask"], stop_ids, max_new_tokens)
    return tokenizer.batch_decode(rows, skip_special_tokens=True), rows


Method = Callable[[list[str]], tuple[list[str], list[list[int]]]]


@dataclass
class Runs:
    seconds: dict[str, list[list[float]]]  # per method, per batch, per repeat
    texts: dict[str, list[str]]  # per method, of the first repeat
    tokens: dict[str, list[list[int]]]  # per method, new token ids per row, of the first repeat

    def total(self, name: str) -> float:
        return sum(map(sum, self.seconds[name]))

    def best(self, name: str) -> float:
        """Each batch's fastest repeat: a burst of load on the shared VM slows one repeat, rarely all."""
        return sum(map(min, self.seconds[name]))


def interleaved_runs(methods: dict[str, Method], batches: list[list[str]], repeats: int) -> Runs:
    """Every method on every batch, `repeats` times, the order alternating per step: the VM's speed drifts
    (other jobs share its 2 cores; decoding, thousands of small ops per token, suffers most), and alternating
    spreads a drift over both alike."""
    names = list(methods)
    runs = Runs({name: [[] for _ in batches] for name in names}, {name: [] for name in names},
                {name: [] for name in names})
    steps = [(repeat, index) for repeat in range(repeats) for index in range(len(batches))]
    for number, (repeat, index) in enumerate(steps):
        for name in names[number % len(names):] + names[: number % len(names)]:
            start = time.perf_counter()
            batch_texts, batch_tokens = methods[name](batches[index])
            runs.seconds[name][index].append(time.perf_counter() - start)
            if repeat == 0:
                runs.texts[name] += batch_texts
                runs.tokens[name] += batch_tokens
    return runs


def decoding_steps(tokens: list[list[int]], batch_size: int) -> int:
    """Forward passes of the decoder: each batch runs until its longest row stops."""
    return sum(max(len(row) for row in tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size))


def row_steps(tokens: list[list[int]], batch_size: int, leave_when_stopped: bool) -> int:
    """Rows decoded, summed over the steps: `generate` decodes every row of a batch until its longest stops; the
    pipeline a row until it stops."""
    if leave_when_stopped:
        return sum(len(row) for row in tokens)
    return sum(len(tokens[i : i + batch_size]) * max(len(row) for row in tokens[i : i + batch_size])
               for i in range(0, len(tokens), batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="model manifest written by the pipeline")
    parser.add_argument("--items", default=str(DEFAULT_ITEMS), help="an items table of a generation benchmark")
    parser.add_argument("--n-prompts", type=int, default=40, help="GSM8K's items in the default config")
    parser.add_argument("--batch-size", type=int, default=40, help="the default config's generation_batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="GSM8K's in the default config")
    parser.add_argument("--system-prompt", default=None, help="the model's system_prompt (default config: none)")
    parser.add_argument("--repeats", type=int, default=1, help="times every batch is decoded by each (alternating order)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = read_manifest(args.manifest)
    model, tokenizer = load_model(manifest, torch.device("cpu"), torch.float32), load_tokenizer(manifest)
    items = pl.read_parquet(args.items).head(args.n_prompts).to_dicts()
    prompts = [prompt_text(tokenizer, item, args.system_prompt) for item in items]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    stop_ids = evaluate.stop_token_ids(model, tokenizer)

    def methods_for(max_new_tokens: int) -> dict[str, Method]:
        return {
            "pipeline (evaluate.greedy_decode)": lambda b: pipeline_generate(model, tokenizer, b, max_new_tokens, stop_ids),
            "plain model.generate": lambda b: plain_generate(model, tokenizer, b, max_new_tokens, stop_ids),
        }

    for method in methods_for(4).values():  # warm-up: first calls allocate and pick kernels
        method(batches[0])
    methods = methods_for(args.max_new_tokens)
    runs = interleaved_runs(methods, batches, args.repeats)
    texts, tokens = runs.texts, runs.tokens
    pipeline, plain = list(methods)
    prompt_tokens = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    print(f"model: {args.manifest} (fp32 CPU, {args.threads} threads); torch {torch.__version__}")
    print(f"prompts: {len(prompts)} from {args.items} (pipeline's prompt_text), {sum(prompt_tokens) / len(prompts):.0f} tokens "
          f"on average; batch size {args.batch_size}, left padded; greedy, max_new_tokens {args.max_new_tokens}; "
          f"stop ids {stop_ids}; {len(batches) * args.repeats} alternating steps")
    print()
    print(f"| implementation | new tokens per repeat | decoding steps | rows decoded over the steps | seconds (all "
          f"{args.repeats}) | new tokens/s (all) | × plain | new tokens/s (best of {args.repeats} per batch) | × plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in methods:
        generated = sum(len(row) for row in tokens[name])
        total, best = runs.total(name), runs.best(name)
        print(f"| {name} | {generated} | {decoding_steps(tokens[name], args.batch_size)} | "
              f"{row_steps(tokens[name], args.batch_size, name == pipeline)} | {total:.1f} | "
              f"{generated * args.repeats / total:.1f} | {runs.total(plain) / total:.2f} | {generated / best:.1f} | "
              f"{runs.best(plain) / best:.2f} |")
    ratios = [b / a for batch_a, batch_b in zip(runs.seconds[pipeline], runs.seconds[plain]) for a, b in zip(batch_a, batch_b)]
    print(f"\npipeline speed over plain per step: {min(ratios):.2f} to {max(ratios):.2f}")
    cut_off = sum(evaluate.is_cut_off(row, stop_ids, args.max_new_tokens) for row in tokens[pipeline])
    print(f"rows cut off at max_new_tokens: {cut_off} of {len(prompts)}")
    print(f"decoded texts identical: {'yes' if texts[pipeline] == texts[plain] else 'NO'}; "
          f"token ids identical: {'yes' if tokens[pipeline] == tokens[plain] else 'NO'}")


if __name__ == "__main__":
    main()
