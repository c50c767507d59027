"""Reading the residual stream after one decoder layer with a forward hook, stopping the pass there, and the
key/value caches that let prompts sharing a head read it once."""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from competency_gaps.models import decoder_layers

if TYPE_CHECKING:
    from competency_gaps.prompts import EncodedPrompt

log = logging.getLogger(__name__)


# Massive activations (Sun et al., 2024): a few corpus tokens, nearly all the first one kept from a row that starts
# mid-document, carry 50-150x the median norm (attention sinks; SmolLM2 layer 15: 2 of 20k held-out tokens, norms
# 9,518 and 25,748 against a median of 170). The SAE neither trains on them nor counts them in its held-out
# figures, where those 2 vectors alone made up 70 % of the variance (explained variance 0.928 with them, 0.756
# without), and nothing reads them through the SAE: in the labels' corpus rows 3 of 259 carried one at position 1
# and took the strongest context of 43 concepts with activations up to 4,019 (the median top context: 12). The
# benchmarks' counted tokens stay under 1.5x the median (position 0 and the chat template's tokens are not counted).
MASSIVE_NORM_RATIO = 10.0


def massive(x_ND: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the vectors whose norm is above MASSIVE_NORM_RATIO x the median norm of `x_ND`."""
    norms = x_ND.float().norm(dim=1)
    return norms > MASSIVE_NORM_RATIO * norms.median()


class _StopForward(Exception):
    """Raised by the hook: nothing after the hooked layer needs computing."""


@contextmanager
def residual_hook(model: torch.nn.Module, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Attach a hook capturing the output of decoder layer `layer` (TransformerLens `blocks.{layer}.hook_resid_post`).

    The hook is always removed, even when the forward pass raises.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> None:
        # Some transformers versions return (hidden_states, ...) from decoder layers, others the tensor.
        captured["resid_BLD"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _forward_to_layer(model: torch.nn.Module, layer: int, **inputs: Any) -> dict[str, torch.Tensor]:
    """One forward of `model` on `inputs`, stopped after decoder layer `layer`; what the hook captured."""
    with residual_hook(model, layer) as captured:
        try:
            model(**inputs)
        except _StopForward:
            pass
    return captured


def new_cache(model: torch.nn.Module) -> Any:
    """An empty key/value cache laid out for `model` (full or sliding-window layers, as its config says)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def has_sliding_window(model: torch.nn.Module) -> bool:
    """Does any layer attend over a window of cache slots (Mistral, Gemma 2 and 3), so that padding inside a row
    of the cache would take the place of context?"""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return any(isinstance(layer, DynamicSlidingWindowLayer) for layer in new_cache(model).layers)


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The forward's keyword argument for a key/value cache: `cache` from transformers 5.24 on, `past_key_values`
    before (deprecated since then)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding `rows` of `cache` (repeated where several take the same row); `cache` is left intact.

    The cache's layer objects are copied with their tensors shared (the memo), then rows are selected:
    indexing makes new tensors, and a forward only rebinds a layer's tensors (concatenation), so the
    original cache is never written and never copied whole.
    """
    shared = {id(value): value for layer in cache.layers for value in vars(layer).values() if isinstance(value, torch.Tensor)}
    selected = copy.deepcopy(cache, memo=shared)
    selected.batch_select_indices(rows)
    return selected


@dataclass(frozen=True)
class SharedPrefix:
    """The first `length` tokens of every prompt of a set, the same ids in all and counted in none, read once
    (up to the hooked layer, or through the whole model for scoring) into a key/value cache that each batch
    starts from, so that a batch reads only what follows. The default benchmarks' prompts share their chat
    template's system turn and their instruction: 37-60 of their 59-135 SmolLM2 tokens a prompt."""

    length: int
    cache: Any  # a transformers Cache of one row: its layers up to the hooked one filled (or all of them)

    def rows(self, n: int) -> Any:
        """A copy of the cache for a batch of `n` prompts (a forward extends the cache it is given)."""
        return cache_rows(self.cache, torch.zeros(n, dtype=torch.long, device=self.cache.layers[0].keys.device))


def shared_prefix_length(sequences: Sequence[list[int]], limit: int) -> int:
    """How many leading token ids all `sequences` share, at most `limit` (0 for fewer than two sequences: one is
    read once anyway)."""
    if len(sequences) < 2:
        return 0
    # commonprefix compares only the lexicographically smallest and largest sequences (C-level list comparison).
    return min(len(os.path.commonprefix(list(sequences))), max(limit, 0))


def uncounted_prefix_length(prompts: Sequence[EncodedPrompt]) -> int:
    """How many leading token ids every prompt shares with no prompt counting any of them, leaving each prompt at
    least one token to read after them."""
    if not prompts:
        return 0
    limit = min(min(len(p.input_ids) - 1, p.counted.index(True) if True in p.counted else len(p.counted)) for p in prompts)
    return shared_prefix_length([p.input_ids for p in prompts], limit)


@torch.inference_mode()
def read_prefix(model: torch.nn.Module, ids: list[int], layer: int | None = None) -> SharedPrefix:
    """`ids` read through the model into a key/value cache of one row: up to decoder layer `layer` (the layers
    above it never run), or every layer (None)."""
    cache = new_cache(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    if layer is None:
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
    else:
        _forward_to_layer(model, layer, input_ids=input_ids, use_cache=True, **with_cache(model, cache))
    log.info("the %d tokens every prompt starts with are read once", len(ids))
    return SharedPrefix(len(ids), cache)


def read_shared_prefix(model: torch.nn.Module, layer: int, prompts: Sequence[EncodedPrompt]) -> SharedPrefix | None:
    """The prompts' shared uncounted head (`uncounted_prefix_length`) read through the model up to `layer`; None
    when they share none."""
    length = uncounted_prefix_length(prompts)
    return read_prefix(model, prompts[0].input_ids[:length], layer) if length else None


@torch.inference_mode()
def residual_stream(model: torch.nn.Module, layer: int, input_ids_BL: torch.Tensor,
                    attention_mask_BL: torch.Tensor | None, prefix: SharedPrefix | None = None) -> torch.Tensor:
    """Residual stream after decoder layer `layer`, shape (batch, length, d_model); layers above it never run.

    With `prefix`, `input_ids_BL` are the tokens after it (right padded, no mask: causal attention never lets
    a real token see the pads after it), and the stream covers only them: its position 0 is the prompt's
    position `prefix.length`.
    """
    if prefix is None:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask_BL, "use_cache": False}
    elif attention_mask_BL is not None:
        raise ValueError("residual_stream: an attention mask cannot be combined with a shared prefix")
    else:
        kwargs = {"use_cache": True, **with_cache(model, prefix.rows(input_ids_BL.shape[0]))}
    captured = _forward_to_layer(model, layer, input_ids=input_ids_BL, **kwargs)
    if "resid_BLD" not in captured:
        raise RuntimeError(f"the hook on layer {layer} never fired")
    return captured["resid_BLD"]
