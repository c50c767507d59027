"""Material for labelling SAE concepts: top and sampled activating contexts, a pool of negative contexts,
logit-lens tokens, firing tokens, a heuristic label, and detection scoring.

Pure maths on tensors (no file IO, no model loading), so one module serves the extraction job that streams
activations and the labelling job that reads what it saved. Tensors stay on the device of their inputs;
only the `result()`/`negatives_for` accessors move data to the CPU.

Shapes in names: N tokens of a batch, K concepts, D model width, V vocabulary, W window width,
M stored rows, C candidate (token, concept) pairs, P pool windows.

Detection scoring follows EleutherAI delphi's "detection" scorer: a judge is shown held-out activating
and non-activating contexts and says for each whether the label describes it; the score is the
class-balanced accuracy of its answers, 0.5 for a label that tells nothing (always yes, always no, or coin
flips) and 1.0 for a perfect one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from competency_gaps.saliency import BatchActivations

_MASK32 = 0xFFFFFFFF
_ROW_FIELDS = ("concept", "key", "activation", "seq", "pos")
_WINDOW_FIELDS = ("window_tokens", "window_acts")

# Salts keep the hash streams of different uses independent under the same seed.
_SALT_SAMPLE_HIGH, _SALT_SAMPLE_LOW, _SALT_POOL, _SALT_CENTRE = 0x51ED270B, 0x2545F491, 0x68E31DA4, 0x1B873593


# ---------------------------------------------------------------- sorting helpers


def _lexsort(*keys_N: Tensor) -> Tensor:
    """Permutation sorting rows by keys[0], then keys[1], ... ascending (negate a key for descending).

    Stable sorts from the least significant key up: torch has no lexsort, and this runs on any device."""
    perm = torch.arange(keys_N[0].shape[0], device=keys_N[0].device)
    for key in reversed(keys_N):
        perm = perm[torch.sort(key[perm], stable=True).indices]
    return perm


def _group_starts(*sorted_keys_N: Tensor) -> Tensor:
    """True at each row that differs from the previous one in any key (rows already sorted by them)."""
    first = torch.zeros_like(sorted_keys_N[0], dtype=torch.bool)
    first[:1] = True
    for key in sorted_keys_N:
        first[1:] |= key[1:] != key[:-1]
    return first


def _rank_within(sorted_group_N: Tensor) -> Tensor:
    """0, 1, 2, ... within each run of equal values of a sorted group id."""
    index = torch.arange(sorted_group_N.shape[0], device=sorted_group_N.device)
    start = torch.where(_group_starts(sorted_group_N), index, 0)
    return index - torch.cummax(start, dim=0).values if index.numel() else index


# ---------------------------------------------------------------- hashing


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), in 16-bit halves so no int64 product overflows."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) that mixes every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash32(parts: Sequence[Tensor], seed: int, salt: int) -> Tensor:
    """A 32-bit hash (int64 tensor in [0, 2**32)) of a tuple of int64 tensors (broadcast), absorbing 32 bits at a time."""
    parts = torch.broadcast_tensors(*parts)
    start = (seed ^ (seed >> 32) ^ salt) & _MASK32
    h = _fmix32(torch.full_like(parts[0], start) ^ 0x9E3779B9)
    for part in parts:
        h = _fmix32(h ^ (part & _MASK32))
        h = _fmix32(h ^ ((part >> 32) & _MASK32))
    return h


def random_keys(seq: Tensor, concept: Tensor | int, seed: int) -> Tensor:
    """A deterministic pseudo-random key in [0, 1) (float64, 53 random bits) per (sequence, concept, seed).

    Broadcasts like `seq + concept`: `random_keys(seq_N[:, None], torch.arange(K), seed)` is the dense
    (N, K) form, but `TopContexts(sample_seed=...)` only ever hashes its sparse candidates. The key depends
    on the sequence, not the token, so keeping the k largest keys of a concept keeps a uniform random
    sample of k of the sequences it fires on, while the peak inside each is still its strongest token.
    """
    concept = torch.as_tensor(concept, dtype=torch.int64, device=seq.device)
    high = _hash32([seq.long(), concept], seed, _SALT_SAMPLE_HIGH)
    low = _hash32([seq.long(), concept], seed, _SALT_SAMPLE_LOW)
    return ((high << 21) | (low >> 11)).double() / float(2**53)


def _sequence_keys(seq: Tensor, seed: int) -> Tensor:
    """Per-sequence pseudo-random key in [0, 1) for choosing the negative pool."""
    return _hash32([seq.long()], seed, _SALT_POOL).double() / float(2**32)


# ---------------------------------------------------------------- windows


def _window_token_index(seq_N: Tensor, pos_N: Tensor, seq_R: Tensor, pos_R: Tensor, before: int, after: int) -> Tensor:
    """idx_RW: for each row (sequence, peak position), the batch index of the token at each window position
    peak-before .. peak+after of that sequence, -1 where the batch has no token there (edge, masked, absent)."""
    width = before + 1 + after
    if seq_R.numel() == 0:
        return torch.empty((0, width), dtype=torch.long, device=seq_N.device)
    # Each token's place in a (sequence, position) grid as one integer; all on device, no host sync.
    lowest_pos = pos_N.min()
    span = pos_N.max() - lowest_pos + 1
    seqs_S, seq_local_N = torch.unique(seq_N, return_inverse=True)
    place_sorted, order = torch.sort(seq_local_N * span + (pos_N - lowest_pos))
    target_pos_RW = (pos_R - lowest_pos)[:, None] + torch.arange(-before, after + 1, device=seq_N.device)
    inside_RW = (target_pos_RW >= 0) & (target_pos_RW < span)
    target_RW = torch.searchsorted(seqs_S, seq_R)[:, None] * span + torch.where(inside_RW, target_pos_RW, 0)
    slot_RW = torch.searchsorted(place_sorted, target_RW).clamp(max=place_sorted.shape[0] - 1)
    found_RW = inside_RW & (place_sorted[slot_RW] == target_RW)
    return torch.where(found_RW, order[slot_RW], -1)


class SparseBatch:
    """The non-zero activations of one batch of N tokens as parallel (token, concept, value) arrays, sorted by
    (token, concept): what an extractor holds anyway, and never an N × K matrix (65,536 concepts)."""

    def __init__(self, token_C: Tensor, concept_C: Tensor, value_C: Tensor, n_concepts: int):
        self.n_concepts = n_concepts
        self.flat_C, order = torch.sort(token_C.long() * n_concepts + concept_C.long())
        self.token_C, self.concept_C, self.value_C = token_C.long()[order], concept_C.long()[order], value_C.float()[order]

    @classmethod
    def from_dense(cls, acts_NK: Tensor) -> SparseBatch:
        token_C, concept_C = torch.nonzero(acts_NK, as_tuple=True)
        return cls(token_C, concept_C, acts_NK[token_C, concept_C], acts_NK.shape[1])

    def value_at(self, token_RW: Tensor, concept_R: Tensor) -> Tensor:
        """The activation of concept_R[r] at token token_RW[r, w] (0 where it is not active)."""
        if self.flat_C.numel() == 0:
            return torch.zeros(token_RW.shape, dtype=torch.float32, device=token_RW.device)
        target_RW = token_RW * self.n_concepts + concept_R[:, None]
        slot_RW = torch.searchsorted(self.flat_C, target_RW).clamp(max=self.flat_C.shape[0] - 1)
        return torch.where(self.flat_C[slot_RW] == target_RW, self.value_C[slot_RW], 0.0)


def _gather_windows(idx_RW: Tensor, token_ids_N: Tensor, batch: SparseBatch, concept_R: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids (int32, -1 padded) and the row's concept activation (float32, 0 padded) at window positions."""
    present_RW = idx_RW >= 0
    safe_RW = idx_RW.clamp(min=0)
    tokens_RW = torch.where(present_RW, token_ids_N[safe_RW], -1).to(torch.int32)
    acts_RW = torch.where(present_RW, batch.value_at(safe_RW, concept_R), 0.0)
    return tokens_RW, acts_RW


# ---------------------------------------------------------------- top contexts


def _one_per_sequence(rows: Mapping[str, Tensor]) -> Tensor:
    """Index of the best row of each (concept, sequence): highest key, then highest activation (so a
    per-sequence random key still peaks on the strongest token), then lowest position."""
    concept, key, activation, seq, pos = (rows[name] for name in _ROW_FIELDS)
    order = _lexsort(concept, seq, -key, -activation, pos)
    return order[_group_starts(concept[order], seq[order])]


def _top_k(rows: Mapping[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Indices of each concept's k best rows, in (concept, rank) order, and their ranks.

    Best is the highest key, ties to the lower sequence then the lower position: a total order, so streaming
    keeps the same set however the sequences are split into calls."""
    concept, key, _, seq, pos = (rows[name] for name in _ROW_FIELDS)
    ranked = _lexsort(concept, -key, seq, pos)
    rank = _rank_within(concept[ranked])
    kept = rank < k
    return ranked[kept], rank[kept]


def _best_rows(rows: Mapping[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """`_top_k` after `_one_per_sequence`: indices into rows, in (concept, rank) order, and ranks."""
    best = _one_per_sequence(rows)
    kept, rank = _top_k({name: rows[name][best] for name in _ROW_FIELDS}, k)
    return best[kept], rank


class TopContexts:
    """Streaming top-k contexts per concept, at most one per (concept, sequence).

    Memory is bounded by the concepts, not the tokens read: at most n_concepts * k rows of
    `36 + 8 * W` bytes (W = before + 1 + after; int64 concept/seq/pos, float64 key, float32 activation,
    int32 window tokens, float32 window activations) plus 8 bytes per concept for the k-th key threshold:
    65,536 concepts * k=20 * W=17 is 1.31 M rows, about 225 MB (an update briefly holds up to ~3x that
    while it re-ranks). Per batch the work follows the non-zero activations: candidates under a concept's
    current k-th key are dropped at once, windows are gathered only for rows that get in, and only the
    concepts with a contender are re-ranked (an H100 took ~10 ms per 4,096-token batch at 65,536 concepts).

    Ranking key: the activation itself (top activating contexts), or with `sample_seed` a hash of
    (sequence, concept, seed) (`random_keys`), which keeps a uniform random sample of k activating
    sequences per concept — the held-out / unbiased examples for labelling and detection scoring. In that
    mode `rank` is the sample order, not an activation order. `update(key_NK=...)` takes any other dense key.

    `before`/`after` tokens around the peak form its window, by position among the tokens given for that
    sequence in the same call (absent positions are padded with token -1 and activation 0).
    """

    def __init__(self, n_concepts: int, k: int = 20, before: int = 12, after: int = 4,
                 sample_seed: int | None = None, device: torch.device | str | None = None):
        if k < 1 or before < 0 or after < 0:
            raise ValueError("k must be >= 1 and before/after >= 0")
        self.n_concepts, self.k, self.before, self.after = n_concepts, k, before, after
        self.sample_seed = sample_seed
        self.device = torch.device(device) if device is not None else None
        self._rows: dict[str, Tensor] | None = None
        self._kth_key_K: Tensor | None = None

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    @property
    def n_rows(self) -> int:
        return 0 if self._rows is None else int(self._rows["concept"].shape[0])

    def _settle_device(self, like: Tensor) -> torch.device:
        """The accumulator lives where its first input lives, unless a device was given."""
        if self.device is None:
            self.device = like.device
        if self._rows is None:
            d = self.device
            self._rows = {
                "concept": torch.empty(0, dtype=torch.long, device=d), "key": torch.empty(0, dtype=torch.float64, device=d),
                "activation": torch.empty(0, dtype=torch.float32, device=d), "seq": torch.empty(0, dtype=torch.long, device=d),
                "pos": torch.empty(0, dtype=torch.long, device=d),
                "window_tokens": torch.empty((0, self.width), dtype=torch.int32, device=d),
                "window_acts": torch.empty((0, self.width), dtype=torch.float32, device=d),
            }
            self._kth_key_K = torch.full((self.n_concepts,), -math.inf, dtype=torch.float64, device=d)
        return self.device

    def _keep_best(self, rows: dict[str, Tensor]) -> None:
        """Store the best of `rows` (any order, possibly overlapping) and recompute every threshold."""
        kept, rank = _best_rows(rows, self.k)
        self._rows = {name: tensor[kept] for name, tensor in rows.items()}
        self._kth_key_K.fill_(-math.inf)
        self._set_thresholds(self._rows, rank)

    def _set_thresholds(self, ranked: Mapping[str, Tensor], rank: Tensor) -> None:
        # The k-th best key of a full concept: a later candidate below it can never get in.
        at_k = rank == self.k - 1
        self._kth_key_K[ranked["concept"][at_k]] = ranked["key"][at_k]

    @torch.no_grad()
    def update(self, acts_NK: Tensor, seq_N: Tensor, pos_N: Tensor, token_ids_N: Tensor, key_NK: Tensor | None = None) -> None:
        """Add one batch of N tokens (dense SAE activations, global sequence index, position, token id).

        Candidates are the non-zero activations. A sequence must not be split across calls (its window and
        its one-per-sequence peak are formed here); its tokens need not be contiguous positions."""
        if key_NK is not None and self.sample_seed is not None:
            raise ValueError("give either sample_seed or key_NK, not both")
        if acts_NK.ndim != 2 or acts_NK.shape[1] != self.n_concepts:
            raise ValueError(f"acts_NK must be (N, {self.n_concepts}), got {tuple(acts_NK.shape)}")
        batch = SparseBatch.from_dense(acts_NK)
        key_C = None if key_NK is None else key_NK.to(acts_NK.device)[batch.token_C, batch.concept_C].double()
        self.update_sparse(batch, seq_N, pos_N, token_ids_N, key_C)

    @torch.no_grad()
    def update_sparse(self, batch: SparseBatch, seq_N: Tensor, pos_N: Tensor, token_ids_N: Tensor,
                      key_C: Tensor | None = None) -> None:
        """`update` from the batch's non-zero activations (an extractor's sparse output); `key_C` is aligned
        with `batch`'s entries."""
        if batch.n_concepts != self.n_concepts:
            raise ValueError(f"batch has {batch.n_concepts} concepts, the accumulator {self.n_concepts}")
        device = self._settle_device(batch.value_C)
        seq_N, pos_N, token_ids_N = (t.to(device).long() for t in (seq_N, pos_N, token_ids_N))
        tok_C, concept_C, value_C = batch.token_C, batch.concept_C, batch.value_C
        if key_C is None:
            key_C = random_keys(seq_N[tok_C], concept_C, self.sample_seed) if self.sample_seed is not None else value_C.double()
        passes = key_C >= self._kth_key_K[concept_C]  # >=: a tie may still win on (seq, pos)
        tok_C, concept_C, key_C, value_C = tok_C[passes], concept_C[passes], key_C[passes], value_C[passes]
        if tok_C.numel() == 0:
            return
        new = {"concept": concept_C, "key": key_C, "activation": value_C,
               "seq": seq_N[tok_C], "pos": pos_N[tok_C]}
        # Stored rows are one per (concept, sequence) already, and no sequence comes in two calls.
        best = _one_per_sequence(new)
        new = {name: tensor[best] for name, tensor in new.items()}

        # Only concepts with a contender are re-ranked: the others' rows and thresholds stay as they are, so
        # once concepts fill up a batch costs its non-zeros, not the n_concepts * k stored rows.
        touched_K = torch.zeros(self.n_concepts, dtype=torch.bool, device=device)
        touched_K[new["concept"]] = True
        old_touched = touched_K[self._rows["concept"]]
        old = {name: tensor[old_touched] for name, tensor in self._rows.items()}
        untouched = {name: tensor[~old_touched] for name, tensor in self._rows.items()}
        n_old = old["concept"].shape[0]
        contenders = {name: torch.cat([old[name], new[name]]) for name in _ROW_FIELDS}
        kept, rank = _top_k(contenders, self.k)
        ranked = {name: tensor[kept] for name, tensor in contenders.items()}

        # Windows only for the new rows that got in.
        from_new = kept >= n_old
        new_index = kept[from_new] - n_old
        idx_RW = _window_token_index(seq_N, pos_N, new["seq"][new_index], new["pos"][new_index], self.before, self.after)
        fresh = _gather_windows(idx_RW, token_ids_N, batch, new["concept"][new_index])
        for name, fresh_RW in zip(_WINDOW_FIELDS, fresh):
            window = torch.empty((kept.shape[0], self.width), dtype=fresh_RW.dtype, device=device)
            window[~from_new] = old[name][kept[~from_new]]
            window[from_new] = fresh_RW
            ranked[name] = window

        self._rows = {name: torch.cat([untouched[name], ranked[name]]) for name in untouched}
        self._kth_key_K[touched_K] = -math.inf
        self._set_thresholds(ranked, rank)

    def _check_compatible(self, other: TopContexts) -> None:
        mine = (self.n_concepts, self.k, self.before, self.after, self.sample_seed)
        theirs = (other.n_concepts, other.k, other.before, other.after, other.sample_seed)
        if mine != theirs:
            raise ValueError(f"cannot merge TopContexts with (n_concepts, k, before, after, sample_seed) {theirs} into {mine}")

    @torch.no_grad()
    def merge(self, other: TopContexts) -> None:
        """Fold in another accumulator (e.g. another shard's): the same result as one accumulator over both."""
        self._check_compatible(other)
        if other._rows is None:
            return
        device = self._settle_device(other._rows["concept"])
        self._keep_best({name: torch.cat([self._rows[name], other._rows[name].to(device)]) for name in self._rows})

    def result(self) -> dict[str, Tensor | int]:
        """Kept contexts on the CPU, sorted by (concept, rank); rank 0 is the best.

        concept, rank, seq, pos (of the peak), activation (at the peak), key (M,); window_tokens (M, W) int64,
        -1 padded; window_acts (M, W) this concept's activation at each window token, 0 padded;
        peak_index (int) = before, the peak's column in the window."""
        if self._rows is None:
            self._settle_device(torch.empty(0, device=self.device or "cpu"))
        # Rows are grouped by concept only as updates left them: put them in (concept, rank) order here.
        ranked, rank = _top_k(self._rows, self.k)
        out: dict[str, Tensor | int] = {name: tensor[ranked].cpu() for name, tensor in self._rows.items()}
        out["window_tokens"] = out["window_tokens"].long()
        out["rank"] = rank.cpu()
        out["peak_index"] = self.before
        return out

    @classmethod
    def from_result(cls, result: Mapping[str, Tensor | int], n_concepts: int, k: int,
                    sample_seed: int | None = None, device: torch.device | str | None = None) -> TopContexts:
        """Rebuild an accumulator from a saved `result()` (e.g. one per shard) so that it can `merge`."""
        width = int(result["window_tokens"].shape[1])
        before = int(result["peak_index"])
        contexts = cls(n_concepts, k, before, width - 1 - before, sample_seed, device)
        first = torch.as_tensor(result["concept"])
        contexts._settle_device(first)
        rows = {name: torch.as_tensor(result[name]).to(contexts.device) for name in (*_ROW_FIELDS, *_WINDOW_FIELDS)}
        rows["window_tokens"] = rows["window_tokens"].to(torch.int32)
        contexts._keep_best({name: tensor.to(contexts._rows[name].dtype) for name, tensor in rows.items()})
        return contexts


# ---------------------------------------------------------------- negative pool


class NegativePool:
    """A fixed, seeded random pool of `size` context windows, for non-activating examples.

    A sequence is in the pool when its hash (seed) is among the `size` smallest of all sequences seen, so the
    pool is a uniform sample, independent of batching and bounded in memory. Each pooled sequence gives one
    window (before/after tokens around a hash-chosen token of it) and the set of concepts active on any
    token of that window, kept sparse as (seq, concept) pairs. Memory: size * W token ids plus the pairs,
    at most size * W * (non-zeros per token).
    """

    def __init__(self, size: int = 1000, before: int = 12, after: int = 4, seed: int = 0,
                 device: torch.device | str | None = None):
        self.size, self.before, self.after, self.seed = size, before, after, seed
        self.device = torch.device(device) if device is not None else None
        self._pool: dict[str, Tensor] | None = None

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    def __len__(self) -> int:
        return 0 if self._pool is None else int(self._pool["seq"].shape[0])

    def _settle_device(self, like: Tensor) -> torch.device:
        if self.device is None:
            self.device = like.device
        if self._pool is None:
            d = self.device
            self._pool = {
                "seq": torch.empty(0, dtype=torch.long, device=d), "key": torch.empty(0, dtype=torch.float64, device=d),
                "pos": torch.empty(0, dtype=torch.long, device=d),
                "window_tokens": torch.empty((0, self.width), dtype=torch.int32, device=d),
                "active_seq": torch.empty(0, dtype=torch.long, device=d),
                "active_concept": torch.empty(0, dtype=torch.long, device=d),
            }
        return self.device

    def _largest_kept_key(self) -> float | Tensor:
        return self._pool["key"][-1] if len(self) >= self.size else math.inf

    def _smallest_keys(self, key: Tensor, seq: Tensor) -> Tensor:
        """Indices of the `size` smallest (key, seq), one per sequence (the key is a function of the sequence)."""
        order = _lexsort(key, seq)
        unique = order[_group_starts(seq[order])]
        return unique[: self.size]

    def _keep(self, rows: dict[str, Tensor], kept: Tensor) -> None:
        pool = {name: rows[name][kept] for name in ("seq", "key", "pos", "window_tokens")}
        still = torch.isin(rows["active_seq"], pool["seq"])
        pairs = torch.stack([rows["active_seq"][still], rows["active_concept"][still]], dim=1)
        pairs = torch.unique(pairs, dim=0) if pairs.shape[0] else pairs
        pool["active_seq"], pool["active_concept"] = pairs[:, 0], pairs[:, 1]
        self._pool = pool

    def update(self, acts_NK: Tensor, seq_N: Tensor, pos_N: Tensor, token_ids_N: Tensor) -> None:
        """Offer the sequences of one batch (same inputs and no-split rule as `TopContexts.update`)."""
        self.update_sparse(SparseBatch.from_dense(acts_NK), seq_N, pos_N, token_ids_N)

    @torch.no_grad()
    def update_sparse(self, batch: SparseBatch, seq_N: Tensor, pos_N: Tensor, token_ids_N: Tensor) -> None:
        """`update` from the batch's non-zero activations."""
        device = self._settle_device(batch.value_C)
        seq_N, pos_N, token_ids_N = (t.to(device).long() for t in (seq_N, pos_N, token_ids_N))
        if seq_N.numel() == 0:
            return
        seqs_S, seq_local_N = torch.unique(seq_N, return_inverse=True)
        key_S = _sequence_keys(seqs_S, self.seed)
        offered_S = torch.nonzero(key_S <= self._largest_kept_key()).squeeze(1)
        old, n_old = self._pool, len(self)
        kept = self._smallest_keys(torch.cat([old["key"], key_S[offered_S]]), torch.cat([old["seq"], seqs_S[offered_S]]))
        chosen_R = offered_S[kept[kept >= n_old] - n_old]  # new sequences that got in, as indices into seqs_S
        if chosen_R.numel() == 0:  # the usual case once the pool is full: nothing more to read
            return

        # The window's centre: a hash-chosen token among those given for the sequence, in position order.
        order_N = _lexsort(seq_local_N, pos_N)
        count_S = torch.bincount(seq_local_N, minlength=seqs_S.shape[0])
        start_S = torch.cumsum(count_S, 0) - count_S
        pick_R = _hash32([seqs_S[chosen_R]], self.seed, _SALT_CENTRE) % count_S[chosen_R]
        centre_R = order_N[start_S[chosen_R] + pick_R]
        idx_RW = _window_token_index(seq_N, pos_N, seqs_S[chosen_R], pos_N[centre_R], self.before, self.after)
        tokens_RW = torch.where(idx_RW >= 0, token_ids_N[idx_RW.clamp(min=0)], -1).to(torch.int32)

        # Concepts active on any token of a new window, read from those tokens' rows only (T <= N: each
        # token lies in at most one window, one window per sequence).
        present = idx_RW >= 0
        window_of_token_N = torch.full_like(seq_N, -1)
        window_of_token_N[idx_RW[present]] = torch.arange(idx_RW.shape[0], device=device)[:, None].expand_as(idx_RW)[present]
        in_window_C = window_of_token_N[batch.token_C] >= 0
        concept_A = batch.concept_C[in_window_C]
        new_active_seq = seqs_S[chosen_R][window_of_token_N[batch.token_C[in_window_C]]]

        rows = {
            "seq": torch.cat([old["seq"], seqs_S[chosen_R]]), "key": torch.cat([old["key"], key_S[chosen_R]]),
            "pos": torch.cat([old["pos"], pos_N[centre_R]]), "window_tokens": torch.cat([old["window_tokens"], tokens_RW]),
            "active_seq": torch.cat([old["active_seq"], new_active_seq]),
            "active_concept": torch.cat([old["active_concept"], concept_A]),
        }
        self._keep(rows, self._smallest_keys(rows["key"], rows["seq"]))

    @torch.no_grad()
    def merge(self, other: NegativePool) -> None:
        """Fold in another pool: the same pool as one accumulator over both inputs."""
        if (self.size, self.before, self.after, self.seed) != (other.size, other.before, other.after, other.seed):
            raise ValueError("cannot merge NegativePools with different size, before, after or seed")
        if other._pool is None:
            return
        device = self._settle_device(other._pool["seq"])
        rows = {name: torch.cat([self._pool[name], other._pool[name].to(device)]) for name in self._pool}
        self._keep(rows, self._smallest_keys(rows["key"], rows["seq"]))

    def negatives_for(self, concept: int, n: int) -> list[list[int]]:
        """Up to n pooled windows (token ids, padding dropped) on none of whose tokens `concept` is active.

        Deterministic; each concept takes its pool windows in its own hash order, so different concepts are
        not all judged against the same few negatives."""
        if self._pool is None or n <= 0:
            return []
        pool = self._pool
        active_here = pool["active_seq"][pool["active_concept"] == concept]
        free = torch.nonzero(~torch.isin(pool["seq"], active_here)).squeeze(1)
        order = _lexsort(random_keys(pool["seq"][free], concept, self.seed), pool["seq"][free])
        windows = pool["window_tokens"][free[order[:n]]].cpu().tolist()
        return [[token for token in window if token >= 0] for window in windows]

    def result(self) -> dict[str, Tensor]:
        """The pool on the CPU: seq, key, pos (window centre), window_tokens (P, W) int64 -1 padded, and the
        sparse active set as parallel active_seq/active_concept."""
        if self._pool is None:
            self._settle_device(torch.empty(0, device=self.device or "cpu"))
        out = {name: tensor.cpu() for name, tensor in self._pool.items()}
        out["window_tokens"] = out["window_tokens"].long()
        return out

    @classmethod
    def from_result(cls, result: Mapping[str, Tensor], size: int, before: int, seed: int,
                    device: torch.device | str | None = None) -> NegativePool:
        """Rebuild a pool from a saved `result()` so that it can `merge`."""
        width = int(result["window_tokens"].shape[1])
        pool = cls(size, before, width - 1 - before, seed, device)
        pool._settle_device(torch.as_tensor(result["seq"]))
        rows = {name: torch.as_tensor(result[name]).to(device=pool.device, dtype=pool._pool[name].dtype) for name in pool._pool}
        pool._keep(rows, pool._smallest_keys(rows["key"], rows["seq"]))
        return pool


# ---------------------------------------------------------------- feeding from an extractor


def feed(contexts: list[TopContexts], pool: NegativePool | None, batch: BatchActivations,
         sequence_of_row: torch.Tensor) -> None:
    """Offer one batch's activations to top-context accumulators and a negative pool; `sequence_of_row` is
    the global sequence index of each prompt of the batch."""
    sparse = SparseBatch(batch.token, batch.concept, batch.value, contexts[0].n_concepts)
    seq_N = sequence_of_row.to(batch.token_row.device)[batch.token_row]
    for accumulator in contexts:
        accumulator.update_sparse(sparse, seq_N, batch.token_position, batch.token_id)
    if pool is not None:
        pool.update_sparse(sparse, seq_N, batch.token_position, batch.token_id)



# ---------------------------------------------------------------- logit lens and firing tokens


@torch.no_grad()
def promoted_tokens(W_dec_KD: Tensor, final_norm: torch.nn.Module, W_U_VD: Tensor, top: int = 10,
                    chunk: int = 1024, largest: bool = True) -> tuple[Tensor, Tensor]:
    """Logit lens of each decoder direction: the `top` token ids it promotes most, and their logits, (K, top).

    Each direction goes through the model's own final norm module, so whatever that norm does (RMSNorm's
    weight, Gemma's (1 + w), LayerNorm's centring and bias) is done the way the model does it. The norm's
    1/rms (or 1/std) rescaling of a single vector is a positive scalar and does not change the ranking; its
    per-dimension weight does. A monotone logit soft-cap (Gemma 2) would not change it either, so it is left
    out. `largest=False` gives the most suppressed tokens (lowest logits). Concepts go `chunk` at a time, so
    no (K, V) matrix is ever built; results stay on W_U's device.
    """
    return logit_lens_extremes(W_dec_KD, final_norm, W_U_VD, top, chunk, sides=(largest,))[0]


def _lens_logits(W_dec_KD: Tensor, final_norm: torch.nn.Module, W_U_VD: Tensor, chunk: int) -> Iterator[Tensor]:
    """The logit lens of `chunk` decoder directions at a time, (chunk, V), on W_U's device."""
    for start in range(0, W_dec_KD.shape[0], chunk):
        directions_CD = W_dec_KD[start:start + chunk].to(device=W_U_VD.device, dtype=W_U_VD.dtype)
        yield final_norm(directions_CD).to(W_U_VD.dtype) @ W_U_VD.T


@torch.no_grad()
def logit_lens_extremes(W_dec_KD: Tensor, final_norm: torch.nn.Module, W_U_VD: Tensor, top: int = 10,
                        chunk: int = 1024, sides: tuple[bool, ...] = (True, False)) -> list[tuple[Tensor, Tensor]]:
    """`promoted_tokens` for each of `sides` (True: promoted, False: suppressed) from one pass over the
    (concepts × vocabulary) logits: the product, the expensive part, is computed once for both."""
    ids: list[list[Tensor]] = [[] for _ in sides]
    logits: list[list[Tensor]] = [[] for _ in sides]
    for logits_CV in _lens_logits(W_dec_KD, final_norm, W_U_VD, chunk):
        for side, largest in enumerate(sides):
            values_CT, ids_CT = logits_CV.topk(top, dim=1, largest=largest)
            ids[side].append(ids_CT)
            logits[side].append(values_CT.float())
    return [(torch.cat(side_ids), torch.cat(side_logits)) for side_ids, side_logits in zip(ids, logits)]


def firing_tokens(concept_M: Tensor, window_tokens_MW: Tensor, window_acts_MW: Tensor, n_concepts: int,
                  top: int = 10) -> tuple[Tensor, Tensor]:
    """Per concept, the `top` token ids it fires on most in its stored windows: ids (K, top), -1 padded, and
    the summed activation per id (K, top), descending (ties: lower id first).

    Inputs are `TopContexts.result()`'s concept, window_tokens and window_acts: every window token with a
    non-zero activation of the row's concept counts, not only the peak."""
    device = window_acts_MW.device
    counted = (window_tokens_MW >= 0) & (window_acts_MW != 0)
    concept_A = concept_M[:, None].expand_as(window_tokens_MW)[counted].long()
    token_A = window_tokens_MW[counted].long()
    ids_KT = torch.full((n_concepts, top), -1, dtype=torch.long, device=device)
    totals_KT = torch.zeros((n_concepts, top), dtype=torch.float32, device=device)
    if token_A.numel() == 0:
        return ids_KT, totals_KT
    pairs, inverse = torch.unique(torch.stack([concept_A, token_A], dim=1), dim=0, return_inverse=True)
    total = torch.zeros(pairs.shape[0], dtype=torch.float64, device=device).index_add_(0, inverse, window_acts_MW[counted].double())
    order = _lexsort(pairs[:, 0], -total, pairs[:, 1])
    rank = _rank_within(pairs[order, 0])
    kept = rank < top
    rows, slots = pairs[order[kept], 0], rank[kept]
    ids_KT[rows, slots] = pairs[order[kept], 1]
    totals_KT[rows, slots] = total[order[kept]].float()
    return ids_KT, totals_KT


# ---------------------------------------------------------------- labels and detection scoring

# Tokenizer vocabulary markers: GPT-2 byte-level ('Ġ' space, 'Ċ' newline, 'ĉ' tab) and SentencePiece ('▁').
_MARKERS = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "}
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
# Loose bytes of a character split across tokens, as token texts show them (concept_labels.TokenText).
BYTE_PIECES = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def _decode_markers(token: str) -> str:
    for marker, text in _MARKERS.items():
        token = token.replace(marker, text)
    return token


def clean_token(token: str) -> str:
    """A token string without whitespace markers and surrounding whitespace ('Ġapples' -> 'apples');
    a whitespace-only token keeps its whitespace ('Ċ' -> '\\n') so it is still something."""
    text = _decode_markers(token)
    return text.strip() or text


def _label_terms_of(tokens: list[str], max_words: int) -> list[str]:
    """Distinct terms (case-insensitive, first form kept): words first; punctuation, then loose bytes of a
    split character ("<0xE6>"), then whitespace, only when nothing better is there."""
    kinds: dict[str, list[str]] = {"word": [], "punctuation": [], "bytes": [], "space": []}
    seen: set[str] = set()
    for token in tokens:
        term = clean_token(token)
        if not term or term.casefold() in seen:
            continue
        seen.add(term.casefold())
        if BYTE_PIECES.fullmatch(term):
            kind = "bytes"
        else:
            kind = "word" if any(ch.isalnum() for ch in term) else ("punctuation" if term.strip() else "space")
        kinds[kind].append(term)
    for kind in kinds:
        if kinds[kind]:
            return kinds[kind][:max_words]
    return []


def _quote(terms: list[str]) -> str:
    return ", ".join(json.dumps(term, ensure_ascii=False) for term in terms)


def heuristic_label(firing: list[str], promoted: list[str], max_words: int = 4) -> str:
    """A short deterministic label from token strings: `"apples", "pears" → "fruit"`.

    Left of the arrow: up to `max_words` terms the concept fires on (in the given order, best first);
    right: up to `max_words` tokens its decoder direction promotes. Terms are cleaned (`clean_token`),
    de-duplicated case-insensitively, and punctuation-only (then loose-byte, then whitespace-only) terms are
    used only when a side has nothing else. Each term is a JSON string literal (so '"' and '\\n' stay readable and
    `label_terms` can read them back). A side with no terms is left out (`→ "fruit"`, `"apples"`); no terms
    at all gives "".
    """
    left, right = _label_terms_of(firing, max_words), _label_terms_of(promoted, max_words)
    if not right:
        return _quote(left)
    return f"{_quote(left)} → {_quote(right)}".lstrip()


def label_terms(label: str) -> list[str]:
    """The quoted terms of a `heuristic_label` (both sides), in order."""
    return [json.loads(quoted) for quoted in _QUOTED.findall(label)]


def lexical_judge(label_terms: list[str], context_tokens: list[str]) -> bool:
    """Offline stand-in for the detection judge: the label 'describes' the context when one of its terms
    equals one of the context's tokens, case-insensitively, after `clean_token` on both."""
    terms = {clean_token(term).casefold() for term in label_terms} - {""}
    return any(clean_token(token).casefold() in terms for token in context_tokens)


def detection_score(predicted: Sequence[bool], truth: Sequence[bool]) -> float:
    """Balanced accuracy of a judge's yes/no (does the label describe this context?) against whether the
    context truly activates the concept, as in delphi's detection scorer: (TPR + TNR) / 2.

    1.0 for a perfect label, 0.5 for an uninformative one (always yes, always no, or chance), 0.0 when
    every answer is wrong; NaN when either class is empty."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} contexts")
    positives = sum(1 for t in truth if t)
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    true_positives = sum(1 for p, t in zip(predicted, truth) if p and t)
    true_negatives = sum(1 for p, t in zip(predicted, truth) if not p and not t)
    return 0.5 * (true_positives / positives + true_negatives / negatives)
