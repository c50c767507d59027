"""SAEs with sae-lens: load a pretrained or local one, or train a TopK SAE on this model's activations.

Whatever the source, the `sae` rule leaves the SAE in the results folder in sae-lens's own format
(cfg.json + sae_weights.safetensors), so extraction always loads it the same way.

Module-level imports stay light (torch and this package): sae-lens (~6 s, it pulls in transformer-lens)
and polars are imported by the functions that use them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from competency_gaps.hooks import massive, read_shared_prefix, residual_stream
from competency_gaps.progress import Progress
from competency_gaps.prompts import EncodedPrompt, encode_item
from competency_gaps.tables import write_json
from competency_gaps.workflow import BATCH_TOKENS, NORM_SAMPLE, sae_buffer_vectors, sae_read_tokens, train_setting

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
#
# With one epoch nothing here holds all training activations at once: a producer runs the model over token
# rows batch by batch and feeds a fixed-size shuffle buffer (activation_buffer.py), which feeds sae-lens's
# trainer; the held-out and benchmark evaluations accumulate their sums chunk by chunk. Memory is the model,
# the tokenised corpus and the buffer, whatever `training_tokens` is. With `epochs` > 1 the tokens read once
# are also kept (float16, in RAM or on disk) for the replayed epochs.

CHAT_WINDOW = 1024  # chat prompts are length-sorted into batches within windows of this many prompts
STREAM_CHUNK = 2048  # vectors per chunk where corpus rows and chat documents are mixed (`interleave`)
# Both are counts of prompts and vectors, not of batches: the training stream's order must not depend on how many
# tokens a forward pass reads (the model's batch_tokens, a throughput setting). One thing still reads the pass:
# `drop_massive` judges a vector against its pass's median norm, so a vector near the 10x cut could in principle
# be judged otherwise at another batch_tokens (the massive ones sit at 50-150x).


def tokenize_corpus(tokenizer: Any, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as one token stream (documents separated by EOS) cut into rows of `context_length`, and the
    index of the document each token comes from (int32, same shape)."""
    parts: list[torch.Tensor] = []  # int64 tensors, one per slice: a Python list of the whole stream costs ~36 bytes a token
    lengths: list[int] = []
    for start in range(0, len(texts), 1000):  # batched (fast), in slices (a bounded peak)
        docs = tokenizer(list(texts[start : start + 1000]), add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor([token for doc in docs for token in (*doc, tokenizer.eos_token_id)], dtype=torch.long))
        lengths += [len(doc) + 1 for doc in docs]
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    documents = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths, dtype=torch.long))
    n_rows = len(stream) // context_length
    cut = n_rows * context_length
    return stream[:cut].view(n_rows, context_length), documents[:cut].view(n_rows, context_length)


def token_chunks(tokenizer: Any, texts: list[str], context_length: int) -> torch.Tensor:
    """The corpus as one token stream (documents separated by EOS) cut into rows of `context_length`."""
    return tokenize_corpus(tokenizer, texts, context_length)[0]


def drop_massive(x_ND: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The vectors of `x_ND` that are not massive activations (`hooks.massive`), and how many were dropped."""
    kept = x_ND[~massive(x_ND)]
    return kept, len(x_ND) - len(kept)


def row_activations(model: Any, layer: int, chunks_NL: torch.Tensor, n_vectors: int, batch_size: int,
                    device: torch.device, dropped: dict[str, int] | None = None) -> Iterator[torch.Tensor]:
    """Residual-stream vectors after `layer` over the rows in order, position 0 and massive activations
    (`drop_massive`) left out, at most `batch_size` rows per chunk (only as many as still needed), exactly
    `n_vectors` in all; float32 on `device`. `dropped["massive"]` counts the massive vectors left out."""
    per_row = chunks_NL.shape[1] - 1
    if n_vectors > chunks_NL.shape[0] * per_row:
        raise ValueError(f"corpus too small: {chunks_NL.shape[0] * per_row} tokens, {n_vectors} needed (raise sae_corpus.max_documents)")
    counts = dropped if dropped is not None else {}
    counts.setdefault("massive", 0)

    def chunks() -> Iterator[torch.Tensor]:
        left, start = n_vectors, 0
        while left > 0:
            if start >= chunks_NL.shape[0]:
                raise ValueError(f"corpus too small: its {chunks_NL.shape[0]} rows give {n_vectors - left} of the {n_vectors} "
                                 f"vectors needed once {counts['massive']} massive activations are left out (raise sae_corpus.max_documents)")
            rows = chunks_NL[start : start + min(batch_size, math.ceil(left / per_row))].to(device)
            start += len(rows)
            resid = residual_stream(model, layer, rows, torch.ones_like(rows))
            chunk, n_massive = drop_massive(resid[:, 1:].reshape(-1, resid.shape[-1]).float())
            counts["massive"] += n_massive
            chunk = chunk[:left]
            left -= len(chunk)
            yield chunk

    return chunks()


def collect_activations(model: Any, layer: int, chunks_NL: torch.Tensor, n_vectors: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """`row_activations` in one fp32 tensor on the CPU (for small samples: training streams instead)."""
    return torch.cat([chunk.cpu() for chunk in row_activations(model, layer, chunks_NL, n_vectors, batch_size, device)])


def prompt_batches(lengths: list[int], batch_tokens: int, window: int | None = None) -> list[list[int]]:
    """Token-budget batches of prompt indices (`length_batches`), sorted by length only within windows of
    `window` prompts (None: all at once) so that a stream keeps its order at the window's scale."""
    from competency_gaps.saliency import length_batches

    if window is None:
        return length_batches(lengths, batch_tokens)
    return [[start + i for i in batch] for start in range(0, len(lengths), window)
            for batch in length_batches(lengths[start : start + window], batch_tokens)]


def prompt_activations(model: Any, layer: int, prompts: list[EncodedPrompt], *, batch_tokens: int,
                       n_vectors: int | None = None, window: int | None = None) -> Iterator[torch.Tensor]:
    """Residual-stream vectors after `layer` at the prompts' counted tokens (as extraction reads them:
    right-padded batches of at most `batch_tokens` padded tokens after the head they all share, which is read
    once: `read_shared_prefix`), in prompt and position order within a batch; at most `n_vectors` in all.
    float32 on the model's device."""
    from competency_gaps.saliency import model_device, pad_right

    device = model_device(model)
    prefix = read_shared_prefix(model, layer, prompts)
    skip = prefix.length if prefix is not None else 0
    left = math.inf if n_vectors is None else n_vectors
    for batch in prompt_batches([len(p.input_ids) - skip for p in prompts], batch_tokens, window):
        if left <= 0:
            return
        ids, _, counted = pad_right([prompts[i] for i in batch], pad_id=0)
        # Right padding under causal attention: no real token attends to the pads after it (no mask needed).
        resid = residual_stream(model, layer, ids[:, skip:].to(device), None, prefix)
        chunk = resid[counted[:, skip:].to(device)][: left if n_vectors is not None else None].float()
        left -= len(chunk)
        yield chunk


def chat_prompts(tokenizer: Any, texts: list[str], documents: Iterable[int], n_vectors: int, context_length: int,
                 system_prompt: str | None = None) -> tuple[list[EncodedPrompt], int]:
    """Corpus documents as the user turn of the model's chat prompt (with the generation prompt, as the
    benchmarks are read), taken in `documents` order until their counted tokens reach `n_vectors`.

    Counted are the document's own tokens only, as extraction counts "content": not the template's
    scaffolding, a default or configured system prompt, BOS, and never position 0. Each prompt is cut
    after its last counted token, and after at most `context_length - 1` of them, as many as a corpus row
    gives (causal attention: the cut changes no counted token's activation; the template's head stays
    whole, however long). Returns the prompts and how many documents were skipped (empty, or altered by
    the template)."""
    prompts: list[EncodedPrompt] = []
    total = skipped = 0
    for document in documents:
        if total >= n_vectors:
            break
        # A generous character cut first: documents can be far longer than a row.
        text = texts[document][: 16 * context_length].strip()
        if not text:
            skipped += 1
            continue
        item = {"messages": [{"role": "user", "content": text}], "field_spans": []}
        try:
            prompt = encode_item(tokenizer, item, "content", system_prompt)
        except ValueError:  # the template altered the text: its tokens cannot be located
            skipped += 1
            continue
        counted = list(prompt.counted)
        counted[0] = False
        positions = [i for i, c in enumerate(counted) if c]
        if not positions:
            skipped += 1
            continue
        cut = positions[: context_length - 1][-1] + 1  # the uncounted closing tokens are never read
        ids, counted = prompt.input_ids[:cut], counted[:cut]
        prompts.append(EncodedPrompt(ids, counted))
        total += sum(counted)
    if total < n_vectors:
        raise ValueError(f"corpus too small for chat-formatted training: {total} content tokens, {n_vectors} needed "
                         "(raise sae_corpus.max_documents or lower chat_fraction)")
    return prompts, skipped


def rechunked(chunks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The vectors of `chunks` in the same order, `size` at a time (the last chunk possibly shorter)."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        while held >= size:
            joined = torch.cat(pending)
            yield joined[:size]
            pending, held = [joined[size:]], held - size
    if held:
        yield torch.cat(pending)


def interleave(sources: list[tuple[Iterable[torch.Tensor], int]]) -> Iterator[torch.Tensor]:
    """Chunks of several producers, each next one from the producer furthest behind its share of the total
    (`target` vectors each), so that their mix is even along the stream."""
    active = [(iter(chunks), target) for chunks, target in sources if target > 0]
    done = [0] * len(active)
    live = list(range(len(active)))
    while live:
        index = min(live, key=lambda i: (done[i] / active[i][1], i))
        chunk = next(active[index][0], None)
        if chunk is None:
            live.remove(index)
            continue
        done[index] += len(chunk)
        yield chunk


def batches_forever(acts_ND: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of in-memory activations, reshuffled each epoch (sae-lens's DataProvider protocol)."""
    if acts_ND.shape[0] < batch_size:  # no full batch: the loop below would spin forever yielding nothing
        raise ValueError(f"{acts_ND.shape[0]} activation vectors are fewer than one batch (batch size {batch_size})")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts_ND.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield acts_ND[order[start : start + batch_size]]


# ---------------------------------------------------------------- evaluation, streamed


class SAEEvaluation:
    """Explained variance, mean L0 and dead-latent fraction of an SAE, accumulated over chunks of vectors.

    The variance about the mean is merged chunk by chunk (Chan et al.'s pairwise update, in float64), so the
    mean of all vectors is never needed up front and nothing but per-dimension sums is kept. `state` and
    `stats_of_state` carry an accumulation through JSON (extraction writes one per benchmark shard; the
    sae_quality job merges them).
    """

    def __init__(self) -> None:
        self.n = 0
        self.squared_error = 0.0
        self.active = 0.0
        self.fired: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @staticmethod
    def _moments(x_ND: torch.Tensor) -> dict[str, torch.Tensor]:
        x64 = x_ND.double()
        mean = x64.mean(0)
        return {"mean": mean, "m2": (x64 - mean).pow(2).sum(0)}

    @staticmethod
    @torch.no_grad()
    def chunk_stats(sae: Any, x_ND: torch.Tensor) -> dict[str, Any]:
        weights = getattr(sae, "W_enc", None)
        if weights is not None:
            x_ND = x_ND.to(weights.device, weights.dtype)
        features = sae.encode(x_ND)
        active = features > 0
        return {"n": len(x_ND), "squared_error": (x_ND - sae.decode(features)).pow(2).sum().item(),
                "active": active.sum().item(), "fired": active.any(0), **SAEEvaluation._moments(x_ND)}

    @staticmethod
    @torch.no_grad()
    def sparse_stats(x_ND: torch.Tensor, reconstruction_ND: torch.Tensor, concept: torch.Tensor, d_sae: int) -> dict[str, Any]:
        """A chunk's stats from its reconstruction and the concepts of its positive activations (one entry
        per active (token, concept)), as extraction has them: no dense (tokens × concepts) matrix."""
        fired = torch.zeros(d_sae, dtype=torch.bool, device=concept.device)
        fired[concept] = True
        return {"n": len(x_ND), "squared_error": (x_ND.double() - reconstruction_ND.double()).pow(2).sum().item(),
                "active": len(concept), "fired": fired, **SAEEvaluation._moments(x_ND)}

    def add(self, stats: dict[str, Any]) -> None:
        n = stats["n"]
        if n == 0:
            return
        self.squared_error += stats["squared_error"]
        self.active += stats["active"]
        if self.mean is None:
            self.fired, self.mean, self.m2 = stats["fired"].clone(), stats["mean"].clone(), stats["m2"].clone()
        else:
            total = self.n + n
            delta = stats["mean"] - self.mean
            self.mean += delta * (n / total)
            self.m2 += stats["m2"] + delta.pow(2) * (self.n * n / total)
            self.fired |= stats["fired"]
        self.n += n

    def state(self) -> dict[str, Any]:
        """The accumulation as JSON-able values (the fired concepts as their indices)."""
        if self.n == 0:
            return {"n": 0}
        return {"n": self.n, "squared_error": self.squared_error, "active": self.active, "d_sae": len(self.fired),
                "fired": self.fired.nonzero().squeeze(1).tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @staticmethod
    def stats_of_state(state: dict[str, Any]) -> dict[str, Any]:
        """A `state` as stats for `add`."""
        if state["n"] == 0:
            return {"n": 0}
        fired = torch.zeros(state["d_sae"], dtype=torch.bool)
        fired[torch.tensor(state["fired"], dtype=torch.long)] = True
        return {"n": state["n"], "squared_error": state["squared_error"], "active": state["active"], "fired": fired,
                "mean": torch.tensor(state["mean"], dtype=torch.float64), "m2": torch.tensor(state["m2"], dtype=torch.float64)}

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            return {"explained_variance": None, "l0": None, "dead_fraction": None, "mse": None, "tokens": 0}
        return {
            "explained_variance": 1.0 - self.squared_error / self.m2.sum().item(),
            # Squared reconstruction error per vector: unlike the explained variance it does not depend on how
            # varied the vectors are, so corpus and benchmark figures compare directly.
            "mse": self.squared_error / self.n,
            "l0": self.active / self.n,
            "dead_fraction": 1.0 - self.fired.float().mean().item(),
            "tokens": self.n,
        }


def evaluate_stream(sae: Any, chunks: Iterable[torch.Tensor], chunk: int = 4096) -> dict[str, Any]:
    """`SAEEvaluation` over a stream of (n, d_in) chunks (each re-cut to at most `chunk` vectors per encode)."""
    evaluation = SAEEvaluation()
    for part in chunks:
        for x in part.split(chunk):
            evaluation.add(SAEEvaluation.chunk_stats(sae, x))
    return evaluation.result()


def evaluate_sae(sae: Any, acts_ND: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Explained variance, mean L0 and dead-latent fraction of `sae` on held-out activations in memory."""
    result = evaluate_stream(sae, [acts_ND], chunk)
    result["heldout_tokens"] = int(result.pop("tokens"))
    return result


# ---------------------------------------------------------------- training


def training_autocast(spec: dict[str, Any], device: torch.device) -> bool:
    """Does the trainer run its step under bfloat16 autocast? `autocast` as configured; auto: where the device
    multiplies bfloat16 in hardware."""
    from competency_gaps.models import native_bfloat16

    setting = train_setting(spec, "autocast")
    return native_bfloat16(device) if setting == "auto" else bool(setting)


def train_topk_sae(data: torch.Tensor | Iterable[torch.Tensor], spec: dict[str, Any], layer: int, model_name: str,
                   device: torch.device, sae_lens_own: bool = False):
    """Train a TopK SAE with sae-lens's SAETrainer (with the dead-latent auxiliary loss) on in-memory
    activations (N, d_in), or on a stream of (batch_size, d_in) batches on `device` (the DataProvider
    protocol), of which it reads exactly training_tokens // batch_size. On CPU and CUDA the SAE decodes only
    its active latents in training (`sae_topk.GatheredTopKTrainingSAE`: sae-lens's losses, fewer dense products)
    and steps a fused Adam (`sae_topk.FusedAdamTrainer`). `sae_lens_own` trains with sae-lens's own
    TopKTrainingSAE and SAETrainer instead, to measure against them (bench/sae_training.py)."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from competency_gaps.sae_topk import deterministic_on_cpu, trainer_class, training_sae_class

    if spec["training_tokens"] < spec["batch_size"]:  # zero steps: sae-lens's norm estimate divides by zero
        raise ValueError(f"SAE training: training_tokens={spec['training_tokens']} is less than one batch (batch_size={spec['batch_size']})")
    steps = spec["training_tokens"] // spec["batch_size"]
    if isinstance(data, torch.Tensor):
        sample_ND = data[:NORM_SAMPLE].to(device)
        provider: Iterator[torch.Tensor] = (batch.to(device) for batch in batches_forever(data, spec["batch_size"], spec["seed"]))
    else:
        # The first batches set the decoder bias and the norm scale, then go on to training as usual.
        stream = iter(data)
        head = [next(stream) for _ in range(min(steps, math.ceil(NORM_SAMPLE / spec["batch_size"])))]
        sample_ND = torch.cat(head)
        provider = chain(head, stream)
    d_in = sample_ND.shape[1]
    torch.manual_seed(spec["seed"])
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=spec["d_sae"],
        k=spec["k"],
        normalize_activations="expected_average_only_in",
        device=str(device),
    )
    sae_cfg.metadata.hook_name = hook_name(layer)
    sae_cfg.metadata.model_name = model_name
    sae = (TopKTrainingSAE if sae_lens_own else training_sae_class(device))(sae_cfg)
    # The trainer scales inputs to norm sqrt(d_in); the scale is estimated here, on the same sample as the
    # decoder bias, so the trainer reads no extra batches for it (a stream then runs exactly one pass).
    scale = d_in**0.5 / sample_ND.norm(dim=1).mean().item()
    # Start the decoder bias at the data mean, in the trainer's normalised units: the residual stream has a
    # large mean component that otherwise eats early training.
    # Measured on SmolLM2 layer 15, 200k tokens: with it and lr 1e-3, held-out EV 0.66 / 10 % dead.
    with torch.no_grad():
        sae.b_dec.copy_(sample_ND.mean(0) * scale)
    del sample_ND
    trainer_cfg = SAETrainerConfig(
        # Whole batches: the trainer steps while it has seen fewer samples than this, so a remainder would
        # cost one more batch than a single pass of training_tokens vectors holds.
        total_training_samples=steps * spec["batch_size"],
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
        autocast=training_autocast(spec, device),
    )
    trainer = (SAETrainer if sae_lens_own else trainer_class(device))(cfg=trainer_cfg, sae=sae, data_provider=provider)
    trainer.activation_scaler.scaling_factor = scale
    with deterministic_on_cpu(device):
        return trainer.fit()


@dataclass
class TrainingData:
    """What an SAE trains and is measured on. `rows`: the corpus's token rows in a seeded order; training reads
    from the front (`train_rows` planned, a few more to replace left-out massive activations), the held-out
    evaluation the last `heldout_rows`, never the same. `chat`: corpus documents in the chat template."""

    rows: torch.Tensor
    train_rows: int
    heldout_rows: int
    n_plain: int
    chat: list[EncodedPrompt]
    n_chat: int
    skipped: int
    context_length: int

    def rows_per_pass(self, batch_tokens: int) -> int:
        """Corpus rows per forward pass within a budget of `batch_tokens` tokens (at least one)."""
        return max(1, batch_tokens // self.context_length)

    def first_pass(self, model: Any, layer: int, batch_tokens: int, device: torch.device,
                   dropped: dict[str, int] | None = None) -> Iterator[torch.Tensor]:
        """The training vectors the model produces, corpus rows and chat documents evenly mixed along the stream
        (in an order that `batch_tokens`, the tokens per forward pass, does not change)."""
        rows = row_activations(model, layer, self.rows[: self.rows.shape[0] - self.heldout_rows], self.n_plain,
                               self.rows_per_pass(batch_tokens), device, dropped=dropped)
        chat = prompt_activations(model, layer, self.chat, batch_tokens=batch_tokens, n_vectors=self.n_chat, window=CHAT_WINDOW)
        return interleave([(rechunked(rows, STREAM_CHUNK), self.n_plain), (rechunked(chat, STREAM_CHUNK), self.n_chat)])

    def heldout(self, model: Any, layer: int, n_vectors: int, batch_tokens: int, device: torch.device,
                dropped: dict[str, int] | None = None) -> Iterator[torch.Tensor]:
        return row_activations(model, layer, self.rows[self.rows.shape[0] - self.heldout_rows :], n_vectors,
                               self.rows_per_pass(batch_tokens), device, dropped=dropped)


def training_data(tokenizer: Any, texts: list[str], spec: dict[str, Any], context_length: int,
                  system_prompt: str | None = None) -> TrainingData:
    """Plan the training stream of `spec` over the corpus `texts`: sae_read_tokens(spec) vectors, a
    `chat_fraction` of them from corpus documents wrapped in the model's chat template as the user turn (with
    `system_prompt`, as extraction renders the benchmarks), their content tokens only, from documents that
    touch no held-out row (preferring ones the plain training rows do not read either)."""
    rows, documents = tokenize_corpus(tokenizer, texts, context_length)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(spec["seed"]))
    rows, documents = rows[order], documents[order]
    per_row = context_length - 1
    n_read = sae_read_tokens(spec)
    n_chat = round(train_setting(spec, "chat_fraction") * n_read)
    n_plain = n_read - n_chat
    # One spare held-out row: room for the massive activations `row_activations` leaves out.
    train_rows, heldout_rows = math.ceil(n_plain / per_row), math.ceil(spec["heldout_tokens"] / per_row) + 1
    if train_rows + heldout_rows > rows.shape[0]:
        raise ValueError(f"corpus too small: {rows.shape[0]} rows of {context_length} tokens, {train_rows} training + "
                         f"{heldout_rows} held-out rows needed (raise sae_corpus.max_documents)")
    heldout_docs = set(documents[rows.shape[0] - heldout_rows :].unique().tolist())
    plain_docs = set(documents[:train_rows].unique().tolist())
    chat: list[EncodedPrompt] = []
    skipped = 0
    if n_chat:
        doc_order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(spec["seed"] + 1)).tolist()
        fresh = [d for d in doc_order if d not in heldout_docs and d not in plain_docs]
        reread = [d for d in doc_order if d not in heldout_docs and d in plain_docs]
        chat, skipped = chat_prompts(tokenizer, texts, fresh + reread, n_chat, context_length, system_prompt)
    log.info("training stream: %d corpus rows (%d vectors) and %d chat-formatted documents (%d vectors; %d skipped); "
             "%d held-out rows", train_rows, n_plain, len(chat), n_chat, skipped, heldout_rows)
    return TrainingData(rows, train_rows, heldout_rows, n_plain, chat, n_chat, skipped, context_length)


def train_sae_for_layer(
    model: Any, tokenizer: Any, layer: int, spec: dict[str, Any], corpus_path: Path, context_length: int,
    model_name: str, out_dir: Path, device: torch.device, batch_tokens: int = BATCH_TOKENS, *,
    system_prompt: str | None = None, buffer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a TopK SAE on the layer's activations over the corpus (`training_data`), streamed through a
    shuffle buffer; save the inference SAE and a summary measured on held-out corpus rows (`sae_quality` adds
    the benchmarks'). The model reads `batch_tokens` tokens per forward pass (throughput only). With `epochs` > 1
    the model reads training_tokens / epochs tokens and the further epochs replay their vectors from a
    float16 `ReplayCache`.
    """
    import polars as pl

    from competency_gaps.activation_buffer import ReplayCache, ShuffleBuffer

    texts = pl.read_parquet(corpus_path)["text"].to_list()
    data = training_data(tokenizer, texts, spec, context_length, system_prompt)
    n_train, n_heldout = spec["training_tokens"], spec["heldout_tokens"]
    epochs, n_read = train_setting(spec, "epochs"), sae_read_tokens(spec)  # the model reads n_read tokens once

    passes = 0
    train_dropped: dict[str, int] = {}  # massive activations left out, in the latest pass the model read
    d_model = model.config.get_text_config().hidden_size
    max_ram_bytes = train_setting(spec, "buffer_max_ram_mb") * 2**20
    cache = ReplayCache(d_model, n_read if epochs > 1 else 0, max_ram_bytes=max_ram_bytes, tmp_dir=buffer_dir)

    def one_pass(epoch: int) -> Iterator[torch.Tensor]:
        nonlocal passes
        passes += 1
        if epoch and epochs > 1:
            log.info("training stream: epoch %d of %d, replayed from the cache", epoch + 1, epochs)
            yield from cache.chunks(STREAM_CHUNK, device)
            return
        if epoch:
            log.info("training stream: pass %d over the same rows", epoch + 1)
        train_dropped["massive"] = 0
        progress = Progress(log, "SAE training activations", n_read, "tokens")
        for chunk in data.first_pass(model, layer, batch_tokens, device, dropped=train_dropped):
            progress.update(len(chunk))
            if epochs > 1:
                cache.append(chunk)
            yield chunk

    capacity = sae_buffer_vectors(spec)
    with cache, ShuffleBuffer(d_model, capacity, spec["batch_size"], spec["seed"] + 2, max_ram_bytes=max_ram_bytes,
                              tmp_dir=buffer_dir, device=device) as buffer:
        trained = train_topk_sae(buffer.epochs(one_pass), spec, layer, model_name, device)
        on_disk = buffer.on_disk
    trained.save_inference_model(out_dir)
    del trained
    sae = load_sae(out_dir, device)
    heldout_dropped: dict[str, int] = {}
    heldout = evaluate_stream(sae, data.heldout(model, layer, n_heldout, batch_tokens, device, dropped=heldout_dropped))
    summary = {
        "source": {"train": spec},
        "layer": layer,
        "hook_name": hook_name(layer),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "training_tokens": n_train,
        "autocast": training_autocast(spec, device),
        "corpus_documents": len(texts),
        "explained_variance": heldout["explained_variance"],
        "l0": heldout["l0"],
        "dead_fraction": heldout["dead_fraction"],
        "heldout_tokens": heldout["tokens"],
        "mse": heldout["mse"],
        "stream": {
            "epochs": epochs, "read_tokens": n_read, "read_dtype": str(model.dtype).removeprefix("torch."),
            "replayed_passes": passes - 1 if epochs > 1 else 0, "replay_on_disk": cache.on_disk,
            "corpus_tokens": data.n_plain, "chat_tokens": data.n_chat, "corpus_rows": data.train_rows,
            "chat_documents": len(data.chat),
            "trained_vectors": n_train // spec["batch_size"] * spec["batch_size"],
            "heldout_rows": data.heldout_rows, "buffer_vectors": capacity, "buffer_on_disk": on_disk, "passes": passes,
            "massive_dropped": {"train": train_dropped["massive"], "heldout": heldout_dropped["massive"]},
        },
    }
    write_json(summary, out_dir / "summary.json")
    log.info("SAE trained: %s", summary)
    return summary


# ---------------------------------------------------------------- quality on what extraction reads

CORPUS_METRICS = ("explained_variance", "l0", "dead_fraction", "mse", "heldout_tokens")


def sae_quality(fit_paths: Iterable[str | Path], summary: dict[str, Any], layer: int) -> dict[str, Any]:
    """The SAE's explained variance, L0 and dead fraction on the benchmark prompts' counted tokens, each
    benchmark's and pooled, from the accumulations extraction wrote beside each shard (it reads exactly those
    tokens anyway), beside the held-out corpus figures of the SAE's own `summary` (None for an SAE trained
    elsewhere)."""
    pooled = SAEEvaluation()
    benchmarks = {}
    for path in fit_paths:
        state = json.loads(Path(path).read_text())
        stats = SAEEvaluation.stats_of_state(state["evaluation"])
        evaluation = SAEEvaluation()
        evaluation.add(stats)
        pooled.add(stats)
        benchmarks[state["benchmark"]] = {**evaluation.result(), "prompts": state["prompts"]}
    benchmarks["all"] = {**pooled.result(), "prompts": sum(b["prompts"] for b in benchmarks.values())}
    corpus = {key: summary.get(key) for key in CORPUS_METRICS} if "explained_variance" in summary else None
    return {"layer": layer, "corpus": corpus, "benchmarks": benchmarks}


def run_sae_quality(fit_paths: Iterable[str | Path], summary_path: Path, out_path: Path, layer: int) -> dict[str, Any]:
    """`sae_quality` of an SAE (its summary.json at `summary_path`), written to `out_path` as JSON."""
    quality = sae_quality(fit_paths, json.loads(Path(summary_path).read_text()), layer)
    write_json(quality, out_path)
    log.info("SAE quality: corpus %s, benchmarks pooled %s", quality["corpus"], quality["benchmarks"]["all"])
    return quality
