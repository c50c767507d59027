"""Write a random-weight transformers model folder of a real model's shape, with a real tokenizer, so the whole
workflow can run on a GPU at that size without downloading weights (`configs/gpu-random`, bench/device/run.sh).

Usage: python bench/random_model.py --shape llama-1b --tokenizer results/models/model=smollm2-135m/hf --out DIR

The shape is one of bench/extraction.py's SHAPES, with the vocabulary resized to the tokenizer's (SmolLM2's
49,152 tokens and its chat template for `llama-1b`: 1.07B parameters instead of Llama-3.2-1B's 1.24B). Weights
are transformers' own initialisation under seed 0, saved in bfloat16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extraction import SHAPES, random_model  # noqa: E402


def write_random_model(shape: str, tokenizer_dir: Path, out: Path) -> int:
    """Save bench/extraction.py's seeded random model of `shape`, sized to the tokenizer, and the tokenizer to
    `out`; return its parameter count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_model(shape, torch.device("cpu"), torch.bfloat16, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer (and its chat template)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    n = write_random_model(args.shape, args.tokenizer, args.out)
    print(f"{args.out}: random {args.shape} ({n / 1e9:.2f}B parameters, bfloat16), tokenizer from {args.tokenizer}")


if __name__ == "__main__":
    main()
