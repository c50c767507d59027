"""SAEs with sae-lens: load a pretrained or local one, or train a TopK SAE on this model's activations.

Whatever the source, the `sae` rule leaves the SAE in the results folder in sae-lens's own format
(cfg.json + sae_weights.safetensors), so extraction always loads it the same way.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import polars as pl
import torch

from competency_gaps.hooks import residual_stream
from competency_gaps.tables import write_json

log = logging.getLogger(__name__)

_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def layer_of_hook(name: str | None) -> int | None:
    """Decoder layer whose output a TransformerLens hook name reads (resid_pre of L is the output of L-1)."""
    match = _HOOK.search(name or "")
    if not match:
        return None
    index = int(match.group(1))
    return index if match.group(2) == "post" else index - 1


def check_sae_fits(sae: Any, layer: int, d_model: int, where: str) -> None:
    """Fail with a clear message when an SAE reads another layer or another width than configured."""
    if sae.cfg.d_in != d_model:
        raise ValueError(f"{where}: SAE width d_in={sae.cfg.d_in} does not match the model's residual width {d_model}")
    implied = layer_of_hook(sae.cfg.metadata.hook_name)
    if implied is None:
        log.warning("%s: SAE hook %r is not a residual-stream hook; assuming it reads layer %d", where, sae.cfg.metadata.hook_name, layer)
    elif implied != layer:
        raise ValueError(f"{where}: SAE was trained on {sae.cfg.metadata.hook_name} (output of layer {implied}), config says layer {layer}")


def load_sae(folder: str | Path, device: torch.device | str = "cpu"):
    from sae_lens import SAE

    return SAE.load_from_disk(str(folder), device=str(device))


def fetch_sae(source: dict[str, Any], out_dir: Path, allow_pickle: bool = False) -> None:
    """Copy a pretrained (sae-lens registry) or local SAE into `out_dir` in sae-lens format. A registry SAE
    stored as a pickle (.pt) is refused unless `allow_pickle`; a local folder is read from safetensors."""
    from sae_lens import SAE

    from competency_gaps.models import pickle_refused

    if "release" in source:
        with nullcontext() if allow_pickle else pickle_refused(f"SAE {source['release']}/{source['id']}"):
            sae = SAE.from_pretrained(source["release"], source["id"], device="cpu")
    else:
        sae = SAE.load_from_disk(source["path"], device="cpu")
    sae.save_model(out_dir)
    write_json({"source": source, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "hook_name": sae.cfg.metadata.hook_name}, out_dir / "summary.json")


# ---------------------------------------------------------------- training on this model's activations


def token_chunks(tokenizer: Any, texts: list[str], context_length: int) -> torch.Tensor:
    """The corpus as one token stream (documents separated by EOS) cut into rows of `context_length`."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_rows = len(stream) // context_length
    return torch.tensor(stream[: n_rows * context_length], dtype=torch.long).view(n_rows, context_length)


def collect_activations(model: Any, layer: int, chunks_NL: torch.Tensor, n_vectors: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Residual-stream vectors after `layer` for the first chunks, dropping position 0 (the attention-sink outlier)."""
    per_row = chunks_NL.shape[1] - 1
    n_rows = math.ceil(n_vectors / per_row)
    if n_rows > chunks_NL.shape[0]:
        raise ValueError(f"corpus too small: {chunks_NL.shape[0] * per_row} tokens, {n_vectors} needed (raise sae_corpus.max_documents)")
    parts = []
    for start in range(0, n_rows, batch_size):
        rows = chunks_NL[start : min(start + batch_size, n_rows)].to(device)
        resid = residual_stream(model, layer, rows, torch.ones_like(rows))
        parts.append(resid[:, 1:].reshape(-1, resid.shape[-1]).float().cpu())
        if start // batch_size % 20 == 0:
            log.info("activations: %d / %d rows", start + len(rows), n_rows)
    return torch.cat(parts)[:n_vectors]


def batches_forever(acts_ND: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled training batches, reshuffled each epoch (sae-lens's DataProvider protocol)."""
    if acts_ND.shape[0] < batch_size:  # no full batch: the loop below would spin forever yielding nothing
        raise ValueError(f"{acts_ND.shape[0]} activation vectors are fewer than one batch (batch size {batch_size})")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts_ND.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield acts_ND[order[start : start + batch_size]]


@torch.no_grad()
def evaluate_sae(sae: Any, acts_ND: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Explained variance, mean L0 and dead-latent fraction of `sae` on held-out activations."""
    squared_error = 0.0
    l0_total = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, acts_ND.shape[0], chunk):
        x = acts_ND[start : start + chunk]
        features = sae.encode(x)
        squared_error += (x - sae.decode(features)).pow(2).sum().item()
        l0_total += (features > 0).sum().item()
        fired |= (features > 0).any(0)
    total_variance = (acts_ND - acts_ND.mean(0)).pow(2).sum().item()
    return {
        "explained_variance": 1.0 - squared_error / total_variance,
        "l0": l0_total / acts_ND.shape[0],
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "heldout_tokens": int(acts_ND.shape[0]),
    }


def train_topk_sae(acts_ND: torch.Tensor, spec: dict[str, Any], layer: int, model_name: str, device: torch.device):
    """Train a TopK SAE with sae-lens's SAETrainer on in-memory activations (with the dead-latent auxiliary loss)."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    if spec["training_tokens"] < spec["batch_size"]:  # zero steps: sae-lens's norm estimate divides by zero
        raise ValueError(f"SAE training: training_tokens={spec['training_tokens']} is less than one batch (batch_size={spec['batch_size']})")
    torch.manual_seed(spec["seed"])
    sae_cfg = TopKTrainingSAEConfig(
        d_in=acts_ND.shape[1],
        d_sae=spec["d_sae"],
        k=spec["k"],
        normalize_activations="expected_average_only_in",
        device=str(device),
    )
    sae_cfg.metadata.hook_name = hook_name(layer)
    sae_cfg.metadata.model_name = model_name
    sae = TopKTrainingSAE(sae_cfg)
    # Start the decoder bias at the data mean, in the trainer's normalised units (inputs are scaled to
    # norm sqrt(d_in)): the residual stream has a large mean component that otherwise eats early training.
    # Measured on SmolLM2 layer 15, 200k tokens: with it and lr 1e-3, held-out EV 0.66 / 10 % dead.
    sample_ND = acts_ND[:20000]
    with torch.no_grad():
        sae.b_dec.copy_(sample_ND.mean(0) * acts_ND.shape[1] ** 0.5 / sample_ND.norm(dim=1).mean())
    steps = spec["training_tokens"] // spec["batch_size"]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=spec["training_tokens"],
        train_batch_size_samples=spec["batch_size"],
        lr=spec["lr"],
        lr_end=spec["lr"] / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, steps // 20),
        device=str(device),
        # Short runs: a latent silent for 1/8 of training counts as dead and feeds the auxiliary loss.
        dead_feature_window=max(10, steps // 8),
        feature_sampling_window=max(10, steps // 4),
        n_batches_for_norm_estimate=min(100, steps),
    )
    provider = (batch.to(device) for batch in batches_forever(acts_ND, spec["batch_size"], spec["seed"]))
    return SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()


def train_sae_for_layer(
    model: Any, tokenizer: Any, layer: int, spec: dict[str, Any], corpus_path: Path, context_length: int,
    model_name: str, out_dir: Path, device: torch.device, batch_size: int = 16,
) -> dict[str, Any]:
    """Collect activations over the corpus, train, save the inference SAE and its held-out summary."""
    texts = pl.read_parquet(corpus_path)["text"].to_list()
    chunks = token_chunks(tokenizer, texts, context_length)
    generator = torch.Generator().manual_seed(spec["seed"])
    chunks = chunks[torch.randperm(chunks.shape[0], generator=generator)]
    n_heldout = spec["heldout_tokens"]
    acts = collect_activations(model, layer, chunks, spec["training_tokens"] + n_heldout, batch_size, device)
    # Held-out vectors come from the last rows, which training never sees.
    train_acts, heldout_acts = acts[:-n_heldout], acts[-n_heldout:]
    trained = train_topk_sae(train_acts, spec, layer, model_name, device)
    trained.save_inference_model(out_dir)
    sae = load_sae(out_dir)
    summary = {
        "source": {"train": spec},
        "layer": layer,
        "hook_name": hook_name(layer),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "training_tokens": int(train_acts.shape[0]),
        "corpus_documents": len(texts),
        **evaluate_sae(sae, heldout_acts),
    }
    write_json(summary, out_dir / "summary.json")
    log.info("SAE trained: %s", summary)
    return summary
