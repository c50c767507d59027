"""The reducer at scale: wall time and peak memory of `python -m competency_gaps reduce` on synthetic shards,
and the shards' bytes on disk against a dense float32 saliency vector per item.

Usage: .venv/bin/python bench/reduce.py [--sizes 10000,100000,300000] [--mem-limit-gb 16] [--n-bootstrap 200]
                                        [--baseline-src DIR] [--stages reduce,robustness,explorer]
(about 25 minutes on 2 CPU cores with the defaults, most of it writing and reducing the 3×10^5 items' 210 M rows;
 nothing needs `make run`)

Per size N: N items split evenly over --benchmarks benchmarks, each item with --active (700) distinct active
concepts out of --concepts (65,536), drawn with a heavy-tailed popularity (the most popular concept fires
on 38 % of the items, the median one on 0.6 %, the rarest on 0.2 %); saliency log-normal around the 0.21
median of the default run's shards, scores 0/1 at a per-benchmark accuracy. The shards are written with the pipeline's schemas and writer
(`tables.write_parquet`: SALIENCY, ITEM_TOKENS, SCORES, zstd) under benchmark=<slug>/ folders, then the reducer
runs as a child process the way the `reduce` rule runs it (--spec with the `gaps` defaults of
resources/config.schema.yaml, --sae-dir holding a cfg.json with d_sae). Its wall time and peak RSS (wait4) are
measured; its address space is capped (RLIMIT_AS, --mem-limit-gb) so a size that needs more fails cleanly
("exceeded N GiB") instead of taking the machine down, and larger sizes are then not run for that reducer. The cap
is on address space, which runs above RSS (thread arenas, torch's mappings), so the peak VM column is printed too.
--stages robustness (or reduce,robustness) also runs the robustness stage, another reader of every saliency row
(`python -m competency_gaps robustness` with the `robustness` defaults of the config schema), on the same shards,
measured the same way. --stages explorer runs the explorer stage's reading of the rows
(`explorer_site.shown_saliency`: the saliency of 20 benchmark contexts per concept, a random subset of each
benchmark's rows written beside its shard, and every item's 10 top concepts) in a child, measured the same way.
--baseline-src runs a second reducer, the package under DIR (e.g. `git worktree add
/tmp/before <commit>` and `--baseline-src /tmp/before/src`), on the same shards first: before/after rows side by side. Shards live in a
temporary folder under /tmp, removed after each size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from competency_gaps.tables import ITEM_TOKENS, SALIENCY, SCORES, write_parquet  # noqa: E402

EXAMPLE_PAIRS = "example_pairs.parquet"
# The explorer stage's reading of the saliency shards (`explorer_site.shown_saliency`: the example contexts' rows
# and every item's 10 top concepts), alone: the rest of that stage reads labels, contexts and the SAE, not rows.
EXPLORER_READS = f"""
import sys
from pathlib import Path
import polars as pl
from competency_gaps.explorer_site import shown_saliency
paths = sys.argv[1:]
contexts = pl.concat(pl.read_parquet(Path(p).with_name("{EXAMPLE_PAIRS}")).with_columns(
    source=pl.lit(Path(p).parent.name.split("=", 1)[1])) for p in paths)
rows, top = shown_saliency(paths, contexts, 10)
print(rows.height, top.height, file=sys.stderr)
"""

ITEMS_PER_CHUNK = 2000  # items generated at once: bounds the generator's memory at ~2000 × 1,100 candidates


# --- synthetic shards ---------------------------------------------------------------------------------

def concept_popularity(n_concepts: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulative firing probabilities: a power law over a random ranking of the concepts (at 700 of 65,536
    active, the first rank fires on 38 % of the items, the median rank on 0.6 %, the last on 0.2 %)."""
    weights = (np.arange(n_concepts) + 50.0) ** -0.7
    return np.cumsum(weights[rng.permutation(n_concepts)] / weights.sum())


def distinct_concepts(cdf: np.ndarray, n_items: int, active: int, rng: np.random.Generator) -> np.ndarray:
    """(n_items, active) distinct concept ids per row, ascending (the order extraction writes them in):
    draw more candidates than needed by popularity, drop repeats, keep a random `active` of the rest."""
    n_concepts = len(cdf)
    out = np.empty((n_items, active), dtype=np.int32)
    todo = np.arange(n_items)
    draws = int(active * 1.6)
    while len(todo):
        candidates = np.searchsorted(cdf, rng.random((len(todo), draws)), side="right").clip(max=n_concepts - 1)
        candidates.sort(axis=1)
        repeated = np.zeros_like(candidates, dtype=bool)
        repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
        candidates[repeated] = n_concepts  # sorts after every real id
        candidates.sort(axis=1)
        enough = (candidates < n_concepts).sum(axis=1) >= active
        # A random `active` of each row's distinct ids (the smallest ones would favour low ids): random keys,
        # repeats keyed last, the `active` smallest keys kept.
        keys = rng.random(candidates.shape)
        keys[candidates == n_concepts] = 2.0
        keep = np.argpartition(keys[enough], active - 1, axis=1)[:, :active]
        out[todo[enough]] = np.sort(np.take_along_axis(candidates[enough], keep, axis=1), axis=1)
        todo, draws = todo[~enough], draws * 2
    return out


def saliency_shard(item_ids: pa.Array, counted: np.ndarray, cdf: np.ndarray, active: int,
                   rng: np.random.Generator) -> pa.Table:
    """The SALIENCY rows of these items: item_id, concept, saliency, max_activation, active_tokens."""
    n_items = len(item_ids)
    concept = distinct_concepts(cdf, n_items, active, rng).ravel()
    row_item = np.repeat(np.arange(n_items), active)
    saliency = rng.lognormal(np.log(0.21), 1.0, len(concept)).astype(np.float32)
    active_tokens = np.minimum(rng.geometric(0.4, len(concept)), counted[row_item]).astype(np.int32)
    max_activation = (saliency * counted[row_item] / active_tokens).astype(np.float32)
    return pa.table({"item_id": item_ids.take(pa.array(row_item)), "concept": concept, "saliency": saliency,
                     "max_activation": max_activation, "active_tokens": active_tokens})


def write_benchmark(folder: Path, slug: str, n_items: int, cdf: np.ndarray, active: int, accuracy: float,
                    rng: np.random.Generator) -> None:
    """saliency.parquet, item_tokens.parquet and scores.parquet of one benchmark under folder/benchmark=slug/."""
    shard = folder / f"benchmark={slug}"
    item_ids = pa.array([f"{slug}-{i:07d}" for i in range(n_items)])
    counted = rng.integers(30, 130, n_items)
    parts = [saliency_shard(item_ids[start : start + ITEMS_PER_CHUNK], counted[start : start + ITEMS_PER_CHUNK], cdf,
                            active, rng) for start in range(0, n_items, ITEMS_PER_CHUNK)]
    saliency = pa.concat_tables(parts)
    del parts
    write_parquet(saliency, shard / "saliency.parquet", SALIENCY)
    write_example_pairs(saliency, shard / EXAMPLE_PAIRS, len(cdf))
    del saliency
    tokens = pa.table({"item_id": item_ids, "counted_tokens": counted, "total_tokens": counted + 67,
                       "read_tokens": counted + 67, "truncated": np.zeros(n_items, dtype=bool),
                       "skipped": pa.nulls(n_items, pa.string())})
    write_parquet(tokens, shard / "item_tokens.parquet", ITEM_TOKENS)
    scores = pa.table({"item_id": item_ids, "scoring": pa.array(["mc_loglik"] * n_items),
                       "score": (rng.random(n_items) < accuracy).astype(np.float64),
                       "prediction": pa.nulls(n_items, pa.string()), "response": pa.nulls(n_items, pa.string()),
                       "choice_logprobs": pa.nulls(n_items, pa.list_(pa.float64())),
                       "cut_off": pa.nulls(n_items, pa.bool_())})
    write_parquet(scores, shard / "scores.parquet", SCORES)


def write_example_pairs(saliency: pa.Table, path: Path, n_concepts: int) -> None:
    """The (item_id, concept) pairs of the benchmark contexts the explorer stage looks up (its example items):
    20 per concept, the labels stage's top_k, as a random subset of the rows (own seed: the shards do not change)."""
    rng = np.random.default_rng(1)
    picked = np.sort(rng.choice(saliency.num_rows, min(saliency.num_rows, 20 * n_concepts), replace=False))
    pq.write_table(saliency.select(["item_id", "concept"]).take(pa.array(picked)), path)


def write_shards(folder: Path, n_items: int, n_benchmarks: int, n_concepts: int, active: int) -> list[str]:
    """Every benchmark's shards; returns the benchmark slugs."""
    rng = np.random.default_rng(0)
    cdf = concept_popularity(n_concepts, rng)
    slugs = [f"bench{b}" for b in range(n_benchmarks)]
    share, extra = divmod(n_items, n_benchmarks)
    for b, slug in enumerate(slugs):
        write_benchmark(folder, slug, share + (b < extra), cdf, active, accuracy=0.3 + 0.5 * b / max(1, n_benchmarks - 1), rng=rng)
    (folder / "sae").mkdir()
    (folder / "sae" / "cfg.json").write_text(json.dumps({"d_sae": n_concepts}))  # all the reducer reads of an SAE
    return slugs


def shard_bytes(folder: Path, name: str) -> int:
    return sum(path.stat().st_size for path in folder.glob(f"benchmark=*/{name}"))


# --- the reducer as a child process -------------------------------------------------------------------

def schema_defaults(section: str) -> dict:
    """The defaults of one config section in the config schema (what a user gets without setting any)."""
    schema = yaml.safe_load((REPO / "resources" / "config.schema.yaml").read_text())
    return {key: value.get("default") for key, value in schema["properties"][section]["properties"].items()}


def default_gaps() -> dict:
    return schema_defaults("gaps")


@dataclass
class ReduceRun:
    seconds: float
    peak_rss_gib: float
    peak_vm_gib: float  # address space (what the cap limits): above RSS by the mappings never touched
    returncode: int
    error_tail: str

    @property
    def out_of_memory(self) -> bool:
        # Python raises MemoryError; polars (Rust) aborts with "memory allocation of N bytes failed"; torch's
        # allocator raises a RuntimeError ending in "Cannot allocate memory".
        return self.returncode != 0 and any(sign in self.error_tail for sign in
                                            ("MemoryError", "memory allocation of", "Unable to allocate",
                                             "Cannot allocate memory"))


def cap_address_space(limit_bytes: int):
    def preexec() -> None:  # runs in the child before exec: a size that needs more gets MemoryError, not the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return preexec


def run_reducer(folder: Path, slugs: list[str], gaps: dict, mem_limit_gib: float, timeout_s: float,
                src: Path = REPO / "src", name: str = "reduce", stage: str = "reduce") -> ReduceRun:
    """Run the reduce, robustness or explorer stage of the package under `src` on the shards (the explorer: its
    reading of the saliency rows, EXPLORER_READS); wall time, the child's own peak RSS (wait4) and its exit status."""
    def paths(name: str) -> list[str]:
        return [str(folder / f"benchmark={slug}" / name) for slug in slugs]

    if stage == "explorer":
        command = [sys.executable, "-c", EXPLORER_READS, *paths("saliency.parquet")]
    else:
        config = {"gaps": gaps, **({"robustness": schema_defaults("robustness")} if stage == "robustness" else {})}
        command = [sys.executable, "-m", "competency_gaps", stage,
                   "--spec", json.dumps({"version": 0, "config": config}),  # the stages read only "config"
                   "--sae-dir", str(folder / "sae"), "--saliency", *paths("saliency.parquet"),
                   "--tokens", *paths("item_tokens.parquet"), "--scores", *paths("scores.parquet"),
                   "--out-dir", str(folder / f"out-{name}")]
    env = {**os.environ, "PYTHONPATH": str(src)}
    log = folder / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                 preexec_fn=cap_address_space(int(mem_limit_gib * 2**30)))
        status, usage, peak_vm = wait_with_timeout(child, timeout_s)
    seconds = time.perf_counter() - start
    return ReduceRun(seconds, usage.ru_maxrss / 2**20, peak_vm / 2**30, status,
                     "\n".join(log.read_text().splitlines()[-3:]))


def peak_address_space(pid: int) -> int:
    """VmPeak of a running process in bytes (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_with_timeout(child: subprocess.Popen, timeout_s: float) -> tuple[int, resource.struct_rusage, int]:
    """Exit status and rusage of this child alone (os.wait4; RUSAGE_CHILDREN would mix in earlier sizes), and
    its peak address space as last polled; a child past the timeout is killed (-9)."""
    deadline = time.monotonic() + timeout_s
    peak_vm = 0
    while True:
        peak_vm = max(peak_vm, peak_address_space(child.pid))  # VmPeak only grows: the last reading is the peak
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode, usage, peak_vm
        if time.monotonic() > deadline:
            child.kill()
        time.sleep(0.2)


# --- report -------------------------------------------------------------------------------------------

def figure(run: ReduceRun, mem_limit_gib: float) -> tuple[str, str]:
    """(time, peak RSS) cells: numbers, or why there are none."""
    if run.returncode == 0:
        return f"{run.seconds:.1f}", f"{run.peak_rss_gib:.2f}"
    if run.out_of_memory:
        return (f"exceeded {mem_limit_gib:g} GiB (after {run.seconds:.0f} s)",
                f"{run.peak_rss_gib:.2f} when an allocation failed")
    if run.returncode == -9:
        return f"killed (timeout) after {run.seconds:.0f} s", f"{run.peak_rss_gib:.2f}"
    return f"failed ({run.returncode}): {run.error_tail.splitlines()[-1] if run.error_tail else ''}", f"{run.peak_rss_gib:.2f}"


def growth(current: float, previous: float | None) -> str:
    return "" if previous is None else f"× {current / previous:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,300000", help="items per run, comma-separated")
    parser.add_argument("--benchmarks", type=int, default=5)
    parser.add_argument("--concepts", type=int, default=65536, help="SAE width (d_sae)")
    parser.add_argument("--active", type=int, default=700, help="active concepts per item")
    parser.add_argument("--n-bootstrap", type=int, default=None, help="gaps.n_bootstrap (default: the config default, 200)")
    parser.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space cap of the reducer (GiB)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per size")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also run the package under this folder (another checkout's src/) on the same shards")
    parser.add_argument("--stages", default="reduce",
                        help="reduce, robustness, explorer (its saliency reading) or several (comma-separated), on the same shards")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary shard folders go")
    args = parser.parse_args()
    gaps = default_gaps()
    if args.n_bootstrap is not None:
        gaps["n_bootstrap"] = args.n_bootstrap
    sizes = [int(size) for size in args.sizes.split(",")]
    dense_bytes = args.concepts * 4
    checkouts = {"this checkout": REPO / "src"}
    if args.baseline_src is not None:
        checkouts = {f"baseline ({args.baseline_src})": args.baseline_src.resolve(), **checkouts}
    stages = args.stages.split(",")
    # (stage, package) pairs, named "reduce, this checkout" etc.
    reducers = {f"{stage}, {name}": (stage, src) for stage in stages for name, src in checkouts.items()}

    print(f"stages: python -m competency_gaps {' and '.join(stages)}, gaps defaults (n_bootstrap {gaps['n_bootstrap']}, pooling "
          f"{gaps['pooling']}, ranking {gaps['ranking']}); {args.benchmarks} benchmarks, {args.active} active concepts "
          f"per item of {args.concepts:,}; address space capped at {args.mem_limit_gb:g} GiB; "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}")
    print()
    print("| stage, package | items | (item, concept) rows | shard write s | stage s | × | s per 10^6 rows | peak RSS GiB "
          "| × | peak VM GiB | saliency B/row | saliency B/item | dense float32 B/item | tokens+scores B/item |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    previous: dict[str, tuple[float, float] | None] = dict.fromkeys(reducers)
    exceeded: dict[str, int] = {}
    for n_items in sizes:
        rows = n_items * args.active
        todo = {name: src for name, src in reducers.items() if n_items < exceeded.get(name, n_items + 1)}
        for name in reducers.keys() - todo.keys():  # memory grows with items there: it cannot fit either
            print(f"| {name} | {n_items:,} | {rows:,} | | not run: {exceeded[name]:,} items already exceeded "
                  f"{args.mem_limit_gb:g} GiB | | | | | | | | | |", flush=True)
        if not todo:
            continue
        folder = Path(tempfile.mkdtemp(prefix="bench-reduce-", dir=args.tmp))
        try:
            start = time.perf_counter()
            slugs = write_shards(folder, n_items, args.benchmarks, args.concepts, args.active)
            write_seconds = time.perf_counter() - start
            saliency_size = shard_bytes(folder, "saliency.parquet")
            other_size = shard_bytes(folder, "item_tokens.parquet") + shard_bytes(folder, "scores.parquet")
            for name, (stage, src) in todo.items():
                run = run_reducer(folder, slugs, gaps, args.mem_limit_gb, args.timeout_s, src,
                                  f"reducer{list(reducers).index(name)}", stage)
                seconds, peak = figure(run, args.mem_limit_gb)
                ok, last = run.returncode == 0, previous[name]
                print(f"| {name} | {n_items:,} | {rows:,} | {write_seconds:.1f} | {seconds} | "
                      f"{growth(run.seconds, last[0] if last else None) if ok else ''} | "
                      f"{run.seconds / rows * 1e6:.2f} | {peak} | "
                      f"{growth(run.peak_rss_gib, last[1] if last else None) if ok else ''} | {run.peak_vm_gib:.1f} | "
                      f"{saliency_size / rows:.2f} | {saliency_size / n_items:,.0f} | {dense_bytes:,} | "
                      f"{other_size / n_items:.1f} |", flush=True)
                previous[name] = (run.seconds, run.peak_rss_gib) if ok else None
                if run.out_of_memory:
                    exceeded[name] = n_items
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    steps = ", ".join(f"× {b / a:g}" for a, b in zip(sizes, sizes[1:]))
    print(f"\n×: growth over the previous size of the same stage and package{f' (sizes grow {steps})' if steps else ''}. "
          f"Dense: one float32 per concept per item ({args.concepts:,} × 4 B); the sparse shard stores "
          f"{args.active} rows of 5 columns per item. Load average after: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
