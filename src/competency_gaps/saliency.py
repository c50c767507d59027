"""Per-item concept saliency on the model's device: forward to the hooked layer, SAE-encode the counted tokens
(less massive activations, which the SAE never trained on), aggregate per item, and copy only the non-zero
(item, concept) pairs to the host.

Everything between the forward pass and the sparse result stays on the device (GPU or CPU): the dense
(tokens × concepts) activations never cross to the host, which on a GPU is what bounds throughput
(a 4,096 × 65,536 float32 chunk is 1 GiB). No file IO here; `extract.py` reads items and writes shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from competency_gaps.hooks import MASSIVE_NORM_RATIO, SharedPrefix, massive, residual_stream
from competency_gaps.prompts import EncodedPrompt

if TYPE_CHECKING:
    from competency_gaps.sae import SAEEvaluation

log = logging.getLogger(__name__)

ENCODE_CHUNK = 4096  # counted tokens per SAE encode: bounds the dense (chunk × concepts) pre-activations


@dataclass(frozen=True)
class BatchActivations:
    """The non-zero activations of one batch's N counted tokens, on the device: M (token, concept) entries."""

    token_row: torch.Tensor  # int64 (N,): each counted token's prompt in the batch
    token_position: torch.Tensor  # int64 (N,): its position in the prompt
    token_id: torch.Tensor  # int64 (N,)
    token: torch.Tensor  # int64 (M,): the entry's counted token (index into the N)
    concept: torch.Tensor  # int64 (M,)
    value: torch.Tensor  # float32 (M,), > 0


# Sees each batch's activations once, whole prompts together (the top-context collector).
BatchObserver = Callable[[BatchActivations], None]


@dataclass(frozen=True)
class SparseSaliency:
    """Non-zero (item, concept) pairs of one batch, on the host; `row` indexes the batch's prompts."""

    row: torch.Tensor  # int64 (M,)
    concept: torch.Tensor  # int64 (M,)
    saliency: torch.Tensor  # float32 (M,): mean activation over the item's counted tokens
    max_activation: torch.Tensor  # float32 (M,)
    active_tokens: torch.Tensor  # int32 (M,): counted tokens on which the concept fires
    counted_tokens: torch.Tensor  # int64 (B,): each prompt's counted tokens as read (the mean's denominator),
    # massive activations left out


def length_batches(lengths: list[int], max_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """Indices grouped by length (longest first) so that each batch holds at most `max_tokens` padded tokens
    and `max_items` sequences (a sequence longer than the budget forms a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        fits = (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens if batches else False
        if fits and (max_items is None or len(batches[-1]) < max_items):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `sequences` padded on `side` ("left" or "right") to the longest."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def pad_right(prompts: list[EncodedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and counted-token mask, right-padded (positions stay 0..len-1)."""
    ids, attention = padded([p.input_ids for p in prompts], pad_id, side="right")
    counted, _ = padded([[int(c) for c in p.counted] for p in prompts], 0, side="right")
    return ids, attention, counted.bool()


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def sparse_topk_output(sae: Any) -> Iterator[None]:
    """Let sae-lens's TopK activation return its k values per token as a sparse COO tensor instead of scattering
    them into a dense (tokens × concepts) matrix; other SAE types (JumpReLU, ReLU) have no such switch."""
    activation = getattr(sae, "activation_fn", None)
    if not hasattr(activation, "use_sparse_activations"):
        yield
        return
    before = activation.use_sparse_activations
    activation.use_sparse_activations = True
    try:
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            yield
    finally:
        activation.use_sparse_activations = before


def encode_sparse(sae: Any, vectors_ND: torch.Tensor, quality: SAEEvaluation | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, concept, value) of every positive activation of `vectors_ND`, on their device. `quality`, when
    given, also accumulates how well the SAE reconstructs these vectors (its decoder reads the sparse codes)."""
    with sparse_topk_output(sae):
        acts = sae.encode(vectors_ND)
        reconstruction = sae.decode(acts) if quality is not None else None
    if acts.is_sparse:
        token, concept = acts._indices()  # TopK: k entries per token, uncoalesced (no duplicates to merge)
        value = acts._values()
    else:
        token, concept = acts.nonzero(as_tuple=True)
        value = acts[token, concept]
    value = value.float()
    positive = value > 0  # TopK keeps k values per token, some of them ReLU'd to 0
    token, concept, value = token[positive], concept[positive], value[positive]
    if quality is not None:
        quality.add(quality.sparse_stats(vectors_ND, reconstruction, concept, sae.cfg.d_sae))
    return token, concept, value


def leave_out_massive(counted: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, vectors_ND: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counted tokens less the massive activations (`hooks.massive`: attention sinks the SAE never trained
    on, whose codes would outweigh every ordinary token), which are also cleared from `counted` in place."""
    sinks = massive(vectors_ND)
    if not sinks.any():
        return rows, positions, vectors_ND
    counted[rows[sinks], positions[sinks]] = False
    log.info("left out %d massive activation(s) of %d counted tokens (norm above %g x the batch's median)",
             int(sinks.sum()), len(rows), MASSIVE_NORM_RATIO)
    keep = ~sinks
    return rows[keep], positions[keep], vectors_ND[keep]


@torch.inference_mode()
def batch_activations(model: Any, sae: Any, layer: int, prompts: list[EncodedPrompt], pad_id: int,
                      observe: BatchObserver | None = None, chunk: int = ENCODE_CHUNK, quality: SAEEvaluation | None = None,
                      prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item, on the model's device: mean activation (B, K), max activation (B, K), the number of
    active counted tokens (B, K) and the counted tokens read (B,), massive activations left out. `observe`,
    when given, sees the batch's non-zero activations; `quality` accumulates the SAE's reconstruction of the
    counted tokens. `prefix`: the head every prompt starts with, read once (`hooks.read_shared_prefix`)."""
    device = model_device(model)
    ids, _, counted = (tensor.to(device, non_blocking=True) for tensor in pad_right(prompts, pad_id))
    skip = prefix.length if prefix is not None else 0
    # Right padding under causal attention: no real token attends to the pads after it, so the batch needs no
    # attention mask, which (without a prefix) lets attention run its fused causal kernels (the outputs are identical).
    resid_BLD = residual_stream(model, layer, ids[:, skip:], None, prefix)
    rows, positions = counted.nonzero(as_tuple=True)
    vectors_ND = resid_BLD[rows, positions - skip].to(sae.W_enc.dtype)
    if len(rows):
        rows, positions, vectors_ND = leave_out_massive(counted, rows, positions, vectors_ND)
    n_concepts = sae.cfg.d_sae
    total, peak, active = (torch.zeros(len(prompts) * n_concepts, device=device) for _ in range(3))
    entries = []
    for start in range(0, len(rows), chunk):
        token, concept, value = encode_sparse(sae, vectors_ND[start : start + chunk], quality)
        flat = rows[start + token] * n_concepts + concept
        total.index_add_(0, flat, value)
        active.index_add_(0, flat, torch.ones_like(value))
        peak.scatter_reduce_(0, flat, value, reduce="amax")
        if observe is not None:
            entries.append((start + token, concept, value))
    if observe is not None:
        token, concept, value = (torch.cat(parts) for parts in zip(*entries)) if entries else (rows[:0], rows[:0], total[:0])
        observe(BatchActivations(rows, positions, ids[rows, positions], token, concept, value))
    n_counted = counted.sum(1)
    shape = (len(prompts), n_concepts)
    return total.view(shape) / n_counted.clamp_min(1).unsqueeze(1), peak.view(shape), active.view(shape), n_counted


def sparsify(mean_BK: torch.Tensor, peak_BK: torch.Tensor, active_BK: torch.Tensor, counted_B: torch.Tensor
             ) -> SparseSaliency:
    """The non-zero pairs, selected on the device; only they are copied to the host."""
    rows, concepts = (mean_BK > 0).nonzero(as_tuple=True)
    return SparseSaliency(row=rows.cpu(), concept=concepts.cpu(), saliency=mean_BK[rows, concepts].cpu(),
                          max_activation=peak_BK[rows, concepts].cpu(),
                          active_tokens=active_BK[rows, concepts].to(torch.int32).cpu(), counted_tokens=counted_B.cpu())


def batch_saliency(model: Any, sae: Any, layer: int, prompts: list[EncodedPrompt], pad_id: int,
                   observe: BatchObserver | None = None, quality: SAEEvaluation | None = None,
                   prefix: SharedPrefix | None = None) -> SparseSaliency:
    """The sparse saliency of one batch of prompts (`prefix`: their shared head, read once)."""
    return sparsify(*batch_activations(model, sae, layer, prompts, pad_id, observe, quality=quality, prefix=prefix))
