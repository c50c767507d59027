"""A bounded shuffle buffer between an activation producer and the SAE trainer.

The producer runs the model over token rows a batch at a time and yields chunks of activation vectors
(n, d_in); sae-lens's trainer wants an iterator of shuffled (batch_size, d_in) batches (its DataProvider
protocol). Consecutive vectors of a chunk come from neighbouring tokens of the same documents, so they
are mixed first, in a buffer of a fixed number of vectors, the way sae-lens's own ActivationsStore mixes:

* fill the buffer to capacity;
* shuffle it and emit a random half (rounded down to whole batches) as batches;
* refill the emitted slots from the stream, shuffle, emit a half again, and so on;
* when the stream ends, shuffle what is left and emit all of it.

Memory is the buffer (capacity × d_in, fixed when it is made), plus the producer's current chunk and one
batch: nothing grows with the number of training tokens. The buffer lives in RAM as float32, or, when
`capacity × d_in × 4` bytes exceed `max_ram_bytes`, in a float16 memory-mapped file in a temporary
directory (removed by `close()`, or when the buffer is garbage-collected); float16 rounds each value to
about 3 significant digits, which is what the disk mode costs. Training on a CUDA device, a float32 buffer
that fits in `DEVICE_BUFFER_SHARE` of the device's free memory lives on the device instead (`storage_device`),
so that vectors go from the forward pass to the trainer without a round trip through the host.

"Every activation used once per epoch": one pass of the producer is one epoch. Every vector the
producer yields in a pass is emitted exactly once (`batches` counts and checks this), in an order
random within the buffer's reach: a vector sits in the buffer for a random number of half-rounds, so
it mixes with roughly the `capacity` vectors produced around it, not with the whole pass. A further
epoch runs the producer again (`epochs`); the fewer-than-one-batch remainder of a pass is carried into
the next pass rather than dropped, and mixed with it. Everything is deterministic under the seed.

`ReplayCache` keeps a first pass's vectors (float16) so that further epochs replay them instead of running
the model again: for small runs, where reading more tokens costs more than training on them again.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from pathlib import Path
from typing import Self

import torch

log = logging.getLogger(__name__)


# On an H100 the forward passes alone produced 341k vectors/s, and 93k/s through a buffer in host memory, which
# copies every vector out to the host and gathers its batches there (bench/README.md, 2026-11-23). A quarter of
# the free memory leaves the rest to the trainer and the model's activations.
DEVICE_BUFFER_SHARE = 0.25


def storage_device(device: torch.device, nbytes: int, on_disk: bool) -> torch.device:
    """Where a buffer of `nbytes` lives: on `device` when that is a CUDA device with `nbytes` within
    DEVICE_BUFFER_SHARE of its free memory, else in host memory (as a file when `on_disk`)."""
    if on_disk or device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_BUFFER_SHARE * free else torch.device("cpu")


def float16_file(rows: int, d_in: int, tmp_dir: str | Path | None, name: str
                 ) -> tuple[tempfile.TemporaryDirectory, Path, torch.Tensor]:
    """A (rows, d_in) float16 tensor backed by a memory-mapped file in a new temporary directory (the
    caller removes the directory with `cleanup()` once the tensor is dropped)."""
    import numpy as np

    tmp = tempfile.TemporaryDirectory(prefix=f"activation-{name}-", dir=tmp_dir)
    path = Path(tmp.name) / f"{name}.f16"
    return tmp, path, torch.from_numpy(np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, d_in)))


class _FileBacked:
    """Storage that may live in a temporary memory-mapped file (`float16_file`): `close()` (or leaving the
    `with` block) removes the file; storage in RAM needs nothing."""

    storage: torch.Tensor
    path: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    def _allocate(self, rows: int, d_in: int, on_disk: bool, ram_dtype: torch.dtype, tmp_dir: str | Path | None,
                  name: str, memory: torch.device = torch.device("cpu")) -> None:
        """`storage` of (rows, d_in): float16 in a memory-mapped file when `on_disk`, else `ram_dtype` in the
        `memory` of the host or a device."""
        if on_disk:
            self._tmp, self.path, self.storage = float16_file(rows, d_in, tmp_dir, name)
            log.info("activation %s: %d × %d float16 vectors on disk at %s (%.0f MB)", name, rows, d_in, self.path,
                     rows * d_in * 2 / 2**20)
        else:
            self.storage = torch.empty(rows, d_in, dtype=ram_dtype, device=memory)
            if memory.type != "cpu":
                log.info("activation %s: %d × %d vectors in %s memory (%.0f MB)", name, rows, d_in, memory,
                         self.storage.numel() * self.storage.element_size() / 2**20)

    def close(self) -> None:
        if self._tmp is not None:
            del self.storage
            self._tmp.cleanup()
            self._tmp = None
        elif self.storage.device.type != "cpu":  # device memory goes back now, not when the object is dropped
            self.storage = self.storage.new_empty(0, self.storage.shape[1])  # (a slice would keep it)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShuffleBuffer(_FileBacked):
    """A fixed-size mixing buffer of `capacity` activation vectors of width `d_in` (see the module doc)."""

    def __init__(self, d_in: int, capacity: int, batch_size: int, seed: int, *, max_ram_bytes: int | None = None,
                 tmp_dir: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if capacity < 2 * batch_size:
            raise ValueError(f"a shuffle buffer of {capacity} vectors cannot emit half of itself in batches of "
                             f"{batch_size}: it needs at least {2 * batch_size}")
        self.d_in, self.capacity, self.batch_size = d_in, capacity, batch_size
        self.device = torch.device(device)
        float32_bytes = capacity * d_in * 4
        self.on_disk = max_ram_bytes is not None and float32_bytes > max_ram_bytes
        self._allocate(capacity, d_in, self.on_disk, torch.float32, tmp_dir, "buffer",
                       storage_device(self.device, float32_bytes, self.on_disk))
        self._generator = torch.Generator().manual_seed(seed)
        self._free = torch.arange(capacity)  # slots holding no vector, filled in this order
        self.received = 0  # vectors written in, over the buffer's life
        self.emitted = 0  # vectors emitted

    @property
    def held(self) -> int:
        """Vectors in the buffer now (never more than `capacity`)."""
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    # ------------------------------------------------------------ moving vectors in and out

    def _write(self, vectors_ND: torch.Tensor) -> None:
        slots, self._free = self._free[: len(vectors_ND)], self._free[len(vectors_ND):]
        self.storage[slots] = vectors_ND.to(device=self.storage.device, dtype=self.storage.dtype)
        self.received += len(vectors_ND)

    def _emit(self, slots: torch.Tensor) -> Iterator[torch.Tensor]:
        """Batches of the vectors in `slots` (in that order); the slots are freed once all are emitted."""
        for start in range(0, len(slots), self.batch_size):
            batch = self.storage[slots[start : start + self.batch_size]]
            self.emitted += len(batch)
            yield batch.to(device=self.device, dtype=torch.float32)
        self._free = torch.cat([self._free, slots]).sort().values  # ascending: refills write in disk order

    def _occupied(self) -> torch.Tensor:
        mask = torch.ones(self.capacity, dtype=torch.bool)
        mask[self._free] = False
        return mask.nonzero().squeeze(1)

    def batches(self, chunks: Iterable[torch.Tensor], *, final: bool = True) -> Iterator[torch.Tensor]:
        """Shuffled batches of every vector in `chunks` (each (n, d_in), any n), and of any remainder
        carried in the buffer from an earlier call.

        final=True: the end of the stream drains the buffer completely, the last batch possibly short.
        final=False: only whole batches come out; the remainder (< batch_size vectors) stays in the
        buffer for the next call.
        """
        received, emitted = self.received, self.emitted
        carried_in = self.held
        for chunk in chunks:
            chunk = chunk.reshape(-1, self.d_in)
            while len(chunk):
                room = len(self._free)
                self._write(chunk[:room])
                chunk = chunk[room:]
                if not self._free.numel():  # full: emit a random half, in whole batches
                    order = torch.randperm(self.capacity, generator=self._generator)
                    yield from self._emit(order[: self.capacity // 2 // self.batch_size * self.batch_size])
        occupied = self._occupied()
        order = occupied[torch.randperm(len(occupied), generator=self._generator)]
        keep = 0 if final else len(order) % self.batch_size
        yield from self._emit(order[: len(order) - keep])
        # Exact count check: what came in (plus what was carried in) left, but for what is carried out.
        produced = self.received - received
        if self.emitted - emitted != produced + carried_in - self.held or self.held != keep:
            raise RuntimeError(f"shuffle buffer lost vectors: {produced} produced, {carried_in} carried in, "
                               f"{self.emitted - emitted} emitted, {self.held} held")

    def epochs(self, make_chunks: Callable[[int], Iterable[torch.Tensor]], n_epochs: int | None = None
               ) -> Iterator[torch.Tensor]:
        """Whole batches over `make_chunks(0)`, then `make_chunks(1)`, …: one producer pass per epoch,
        forever (or `n_epochs` times; the last one drains the buffer). A pass's remainder of fewer than
        `batch_size` vectors opens the next pass's stream."""
        for epoch in count() if n_epochs is None else range(n_epochs):
            yield from self.batches(make_chunks(epoch), final=n_epochs is not None and epoch == n_epochs - 1)


class ReplayCache(_FileBacked):
    """The activation vectors of a training stream's first pass, kept as float16 so that further epochs replay
    them instead of running the model again (`sae.train.epochs`). Holds exactly `n_vectors` (`d_in` wide): in
    RAM, or in a memory-mapped file in a temporary directory when `n_vectors × d_in × 2` bytes exceed
    `max_ram_bytes` (removed by `close()`). float16 rounds each value to about 3 significant digits, so a
    replayed epoch reads the first pass's vectors to that precision."""

    def __init__(self, d_in: int, n_vectors: int, *, max_ram_bytes: int | None = None,
                 tmp_dir: str | Path | None = None) -> None:
        self.d_in, self.n_vectors = d_in, n_vectors
        self.on_disk = max_ram_bytes is not None and n_vectors * d_in * 2 > max_ram_bytes
        self._allocate(n_vectors, d_in, self.on_disk, torch.float16, tmp_dir, "replay")
        self.held = 0

    @property
    def full(self) -> bool:
        return self.held == self.n_vectors

    def append(self, vectors_ND: torch.Tensor) -> None:
        if self.held + len(vectors_ND) > self.n_vectors:
            raise ValueError(f"replay cache of {self.n_vectors} vectors offered {self.held + len(vectors_ND)}")
        self.storage[self.held : self.held + len(vectors_ND)] = vectors_ND.to(device="cpu", dtype=torch.float16)
        self.held += len(vectors_ND)

    def chunks(self, size: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """The cached vectors in the order they came, `size` at a time, as float32 on `device`."""
        if not self.full:  # a partial pass would silently shorten every replayed epoch
            raise RuntimeError(f"replay cache holds {self.held} of its {self.n_vectors} vectors")
        for start in range(0, self.n_vectors, size):
            yield self.storage[start : start + size].to(device=device, dtype=torch.float32)
