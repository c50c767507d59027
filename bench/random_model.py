"""Write a random-weight transformers model folder of a real model's shape, with a real tokenizer, so the whole
workflow can run on a GPU at that size without downloading weights (`configs/gpu-random`, bench/device/run.sh).

Usage: python bench/random_model.py --shape llama-1b --tokenizer results/models/model=smollm2-135m/hf --out DIR

The shape is one of bench/extraction.py's SHAPES, with the vocabulary resized to the tokenizer's (SmolLM2's
49,152 tokens and its chat template for `llama-1b`: 1.07B parameters instead of Llama-3.2-1B's 1.24B). Weights
are drawn from a seeded normal (transformers' own initialisation), saved in bfloat16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extraction import SHAPES  # noqa: E402


def write_random_model(shape: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> int:
    """Save a seeded random LlamaForCausalLM of `shape` and the tokenizer to `out`; return its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {**SHAPES[shape], "vocab_size": len(tokenizer)}
    config = LlamaConfig(**fields, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer (and its chat template)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = write_random_model(args.shape, args.tokenizer, args.out, args.seed)
    print(f"{args.out}: random {args.shape} ({n / 1e9:.2f}B parameters, bfloat16), tokenizer from {args.tokenizer}")


if __name__ == "__main__":
    main()
