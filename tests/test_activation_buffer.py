"""The bounded shuffle buffer between the activation producer and the SAE trainer: its size bound, exactly-once
emission per pass, seeded order, and the float16 disk mode. Tiny tensors, milliseconds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from competency_gaps.activation_buffer import DEVICE_BUFFER_SHARE, ReplayCache, ShuffleBuffer, storage_device

D = 3


def labelled_chunks(n: int, sizes: list[int], offset: int = 0) -> list[torch.Tensor]:
    """Vectors numbered offset..offset+n-1 (every value of vector i is i), cut into chunks of the given sizes
    (cycled): what a producer yields, row batch by row batch."""
    values = torch.arange(offset, offset + n, dtype=torch.float32).unsqueeze(1).repeat(1, D)
    chunks, start, i = [], 0, 0
    while start < n:
        chunks.append(values[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return chunks


def ids_of(batches: list[torch.Tensor]) -> list[int]:
    for batch in batches:
        assert torch.equal(batch[:, 0], batch[:, -1]), "whole vectors, not mixed rows"
    return [int(v) for batch in batches for v in batch[:, 0].tolist()]


class Watched(ShuffleBuffer):
    """Records how many vectors the buffer held every time it emitted a batch."""

    def _emit(self, slots):
        for batch in super()._emit(slots):
            self.seen_held.append(self.held)
            yield batch


def watched(*args, **kwargs) -> Watched:
    buffer = Watched(*args, **kwargs)
    buffer.seen_held = []
    return buffer


@pytest.mark.parametrize(("n", "sizes"), [(1000, [37, 5, 120]), (64, [64]), (10, [3]), (0, [1])])
def test_each_vector_is_emitted_exactly_once_per_pass(n, sizes):
    buffer = watched(D, 64, 8, seed=0)
    batches = list(buffer.batches(labelled_chunks(n, sizes)))
    assert sorted(ids_of(batches)) == list(range(n))  # exact: no vector lost, none twice
    assert all(len(batch) == 8 for batch in batches[:-1]) and (not batches or 1 <= len(batches[-1]) <= 8)
    assert buffer.received == buffer.emitted == n and buffer.held == 0


def test_the_buffer_never_holds_more_than_its_bound():
    buffer = watched(D, 50, 8, seed=1)
    assert buffer.storage.shape == (50, D) and buffer.storage.dtype == torch.float32
    assert buffer.nbytes == 50 * D * 4
    storage = buffer.storage
    batches = list(buffer.batches(labelled_chunks(2000, [333, 1, 47])))  # chunks bigger than the buffer too
    assert sorted(ids_of(batches)) == list(range(2000))
    assert buffer.storage is storage and buffer.storage.shape == (50, D)  # never reallocated or grown
    assert max(buffer.seen_held) <= 50
    # a full buffer emits a random half in whole batches: 24 of 50, then refills those slots
    assert 50 in buffer.seen_held and min(buffer.seen_held[:20]) >= 50 - 24


def test_the_buffer_shuffles_beyond_one_chunk():
    order = ids_of(list(ShuffleBuffer(D, 200, 10, seed=0).batches(labelled_chunks(1000, [20]))))
    assert order != sorted(order)
    first_batch = order[:10]
    assert max(first_batch) - min(first_batch) > 20, "a batch mixes several producer chunks"
    # ...but only within the buffer's reach: the first batches come from the first fill
    assert max(order[:100]) < 200


def test_order_is_deterministic_under_the_seed():
    def order(seed):
        return ids_of(list(ShuffleBuffer(D, 64, 8, seed=seed).batches(labelled_chunks(500, [30, 7]))))

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(order(4))


def test_epochs_rerun_the_producer_and_carry_the_remainder():
    passes = []

    def producer(epoch):
        passes.append(epoch)
        return labelled_chunks(100, [13], offset=1000 * epoch)

    buffer = ShuffleBuffer(D, 40, 8, seed=0)
    stream = buffer.epochs(producer)
    first = ids_of([next(stream) for _ in range(12)])  # 96 of pass 0's 100: no second pass yet
    assert passes == [0] and all(i < 100 for i in first) and len(set(first)) == 96
    more = ids_of([next(stream) for _ in range(13)])  # 104: pass 0's last 4 (carried) and 100 of pass 1
    assert passes == [0, 1]
    assert sorted(first + more) == list(range(100)) + list(range(1000, 1100))
    assert all(len(batch) == 8 for batch in [next(stream) for _ in range(30)])  # whole batches only, forever


def test_a_fixed_number_of_epochs_drains_at_the_end():
    buffer = ShuffleBuffer(D, 32, 8, seed=0)
    ids = ids_of(list(buffer.epochs(lambda epoch: labelled_chunks(50, [9]), n_epochs=3)))
    assert Counter(ids) == Counter({i: 3 for i in range(50)})  # every vector once per epoch


def test_the_disk_mode_matches_the_ram_mode(tmp_path):
    chunks = labelled_chunks(700, [33, 64])  # integers: exact in float16
    ram = ShuffleBuffer(D, 128, 16, seed=5)
    disk = ShuffleBuffer(D, 128, 16, seed=5, max_ram_bytes=128 * D * 4 - 1, tmp_dir=tmp_path)
    assert not ram.on_disk and disk.on_disk
    assert disk.storage.dtype == torch.float16 and disk.storage.shape == (128, D)
    assert disk.path.parent.parent == tmp_path and disk.path.stat().st_size == 128 * D * 2
    ram_batches, disk_batches = list(ram.batches(chunks)), list(disk.batches(chunks))
    assert all(batch.dtype == torch.float32 for batch in disk_batches)
    assert Counter(ids_of(disk_batches)) == Counter(ids_of(ram_batches)) == Counter(range(700))
    assert ids_of(disk_batches) == ids_of(ram_batches)  # the same seeded order, only the storage differs
    folder = disk.path.parent
    disk.close()
    assert not folder.exists()


def test_the_disk_mode_rounds_to_float16(tmp_path):
    vectors = torch.tensor([[1 / 3, 1000.1, -2e-3]] * 4)
    with ShuffleBuffer(D, 4, 2, seed=0, max_ram_bytes=0, tmp_dir=tmp_path) as buffer:
        out = torch.cat(list(buffer.batches([vectors])))
    torch.testing.assert_close(out, vectors.half().float())
    assert not list(tmp_path.iterdir()), "the temporary folder is removed"


def test_batches_come_out_on_the_requested_device():
    batch = next(ShuffleBuffer(D, 16, 4, seed=0, device="cpu").batches(labelled_chunks(20, [20])))
    assert batch.device.type == "cpu" and batch.dtype == torch.float32 and batch.shape == (4, D)


def test_a_buffer_lives_on_the_cuda_device_only_within_its_share_of_free_memory(monkeypatch):
    """The placement, with the device's free memory stubbed (no GPU is needed to decide): host memory off CUDA
    and for a file-backed buffer; on the device while the buffer fits in its share of the free memory."""
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    fits = int(DEVICE_BUFFER_SHARE * free)
    assert storage_device(cuda, fits, on_disk=False) == cuda
    assert storage_device(cuda, fits + 1, on_disk=False) == cpu
    assert storage_device(cuda, 1, on_disk=True) == cpu
    assert storage_device(cpu, 1, on_disk=False) == cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_buffer_on_the_device_emits_what_a_host_buffer_does(monkeypatch):
    """The same batches in the same order whether the buffer lives in GPU or host memory, and the device
    memory is given back on close."""
    chunks = [chunk.cuda() for chunk in labelled_chunks(300, [17, 40])]
    with ShuffleBuffer(D, 64, 8, seed=3, device="cuda") as on_device:
        assert on_device.storage.is_cuda
        from_device = [batch.cpu() for batch in on_device.batches(chunks)]
    assert on_device.storage.numel() == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))  # no room: host memory
    with ShuffleBuffer(D, 64, 8, seed=3, device="cuda") as on_host:
        assert not on_host.storage.is_cuda
        from_host = [batch.cpu() for batch in on_host.batches(chunks)]
    assert all(torch.equal(a, b) for a, b in zip(from_device, from_host, strict=True))


def test_a_buffer_smaller_than_two_batches_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        ShuffleBuffer(D, 15, 8, seed=0)


# ---------------------------------------------------------------- ReplayCache


def test_the_replay_cache_gives_back_its_vectors_in_order_as_float16(tmp_path):
    vectors = torch.randn(10, 3) * 100
    with ReplayCache(3, 10) as ram, ReplayCache(3, 10, max_ram_bytes=0, tmp_dir=tmp_path) as disk:
        for cache in (ram, disk):
            cache.append(vectors[:4])
            cache.append(vectors[4:])
        assert not ram.on_disk and disk.on_disk and disk.path.parent.parent == tmp_path
        replayed = [torch.cat(list(cache.chunks(size=3))) for cache in (ram, disk)]
        assert [len(chunk) for chunk in ram.chunks(size=3)] == [3, 3, 3, 1]
    expected = vectors.half().float()
    assert not torch.equal(expected, vectors), "float16 rounds these values"
    for got in replayed:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not list(tmp_path.iterdir()), "the disk cache's file is removed on close"


def test_the_replay_cache_refuses_too_many_vectors_and_a_partial_replay():
    cache = ReplayCache(2, 4)
    cache.append(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="holds 3 of its 4 vectors"):
        next(cache.chunks(size=2))
    with pytest.raises(ValueError, match="replay cache of 4 vectors offered 5"):
        cache.append(torch.zeros(2, 2))
