"""Reading the residual stream after one decoder layer with a forward hook, stopping the pass there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from competency_gaps.models import decoder_layers


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


@torch.inference_mode()
def residual_stream(model: torch.nn.Module, layer: int, input_ids_BL: torch.Tensor,
                    attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
    """Residual stream after decoder layer `layer`, shape (batch, length, d_model); layers above it never run."""
    with residual_hook(model, layer) as captured:
        try:
            model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False)
        except _StopForward:
            pass
    if "resid_BLD" not in captured:
        raise RuntimeError(f"the hook on layer {layer} never fired")
    return captured["resid_BLD"]
