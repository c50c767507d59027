"""Extraction's host side: keeping a benchmark's saliency rows batch by batch and putting them in the shard's
order, `extract.ShardRows` against the per-row Python lists it replaced, on the same synthetic batches.

Usage: .venv/bin/python bench/shard_rows.py [--items 10000] [--active 700] [--per-batch 27]
(about half a minute on 2 CPU cores with the defaults; nothing needs `make run`)

Each method runs in its own child process on the same seeded batches (`--items` items, `--active` rows each,
`--per-batch` items a batch: a 4,096-token budget holds about 27 prompts of 150 tokens) and prints its seconds,
rows/s and the child's peak RSS above the batches themselves (bytes per row held). At GPU extraction rates
(about 200k tokens/s, some 10^6 rows/s with a 65,536-concept SAE) the per-row cost is what bounds the job.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from competency_gaps.extract import ShardRows  # noqa: E402
from competency_gaps.saliency import SparseSaliency  # noqa: E402
from competency_gaps.tables import SALIENCY  # noqa: E402


def synthetic_batches(n_items: int, active: int, per_batch: int) -> list[tuple[list[int], SparseSaliency]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n_items, per_batch):
        items = list(range(start, min(n_items, start + per_batch)))
        rows = len(items) * active
        concept = torch.stack([torch.randperm(65536, generator=generator)[:active].sort().values for _ in items]).ravel()
        batches.append((items, SparseSaliency(
            row=torch.arange(len(items)).repeat_interleave(active), concept=concept,
            saliency=torch.rand(rows, generator=generator), max_activation=torch.rand(rows, generator=generator),
            active_tokens=torch.randint(1, 9, (rows,), generator=generator, dtype=torch.int32),
            counted_tokens=torch.full((len(items),), 150))))
    return batches


def python_lists(batches: list[tuple[list[int], SparseSaliency]], ids: list[str]) -> pa.Table:
    """The previous way: every row's values appended to Python lists, then one sort of the table."""
    columns: dict[str, list] = {name: [] for name in SALIENCY.names}
    for items, sparse in batches:
        columns["item_id"] += [ids[items[row]] for row in sparse.row.tolist()]
        for name in ("concept", "saliency", "max_activation", "active_tokens"):
            columns[name] += getattr(sparse, name).tolist()
    return pa.table(columns, schema=SALIENCY).sort_by([("item_id", "ascending"), ("concept", "ascending")])


def shard_rows(batches: list[tuple[list[int], SparseSaliency]], ids: list[str]) -> pa.Table:
    rows = ShardRows()
    for items, sparse in batches:
        rows.add(items, sparse)
    return rows.table(ids)


def child(method: str, n_items: int, active: int, per_batch: int) -> None:
    batches = synthetic_batches(n_items, active, per_batch)
    ids = [f"item-{i:07d}" for i in range(n_items)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    table = {"lists": python_lists, "ShardRows": shard_rows}[method](batches, ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{method}\t{table.num_rows}\t{seconds:.2f}\t{(peak - before) / table.num_rows:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--active", type=int, default=700)
    parser.add_argument("--per-batch", type=int, default=27)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.items, args.active, args.per_batch)
        return
    print(f"{args.items:,} items × {args.active} rows ({args.items * args.active:,} rows), {args.per_batch} items a batch")
    print(f"{'method':<12}{'s':>8}{'rows/s':>14}{'B/row held':>12}")
    for method in ("lists", "ShardRows"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--items", str(args.items), "--active",
                              str(args.active), "--per-batch", str(args.per_batch)],
                             check=True, capture_output=True, text=True).stdout.strip().split("\t")
        rows, seconds, per_row = int(out[1]), float(out[2]), out[3]
        print(f"{method:<12}{seconds:>8.2f}{rows / seconds:>14,.0f}{per_row:>12}")


if __name__ == "__main__":
    main()
