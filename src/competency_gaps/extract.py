"""Stage 4: per-item concept saliency s_i^c at one layer, in sparse long form.

s_i^c is the mean SAE activation of concept c over item i's counted tokens (see prompts.py for which
tokens count). Only counted tokens are encoded, in chunks, so memory stays bounded for wide SAEs.
"""

from __future__ import annotations

import logging
from typing import Any

import polars as pl
import pyarrow as pa
import torch

from competency_gaps.hooks import residual_stream
from competency_gaps.prompts import EncodedPrompt, encode_item
from competency_gaps.tables import ITEM_TOKENS, SALIENCY, table_from_rows, write_parquet

log = logging.getLogger(__name__)


def pad_right(prompts: list[EncodedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and counted-token mask, right-padded (positions stay 0..len-1)."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    counted = torch.zeros_like(ids, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, :n] = torch.tensor(prompt.input_ids)
        attention[row, :n] = 1
        counted[row, :n] = torch.tensor(prompt.counted)
    return ids, attention, counted


@torch.inference_mode()
def batch_saliency(model: Any, sae: Any, layer: int, prompts: list[EncodedPrompt], pad_id: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item: mean activation (B, K), max activation (B, K) and number of active counted tokens (B, K)."""
    device = next(model.parameters()).device
    ids, attention, counted = pad_right(prompts, pad_id)
    resid_BLD = residual_stream(model, layer, ids.to(device), attention.to(device))
    rows, cols = counted.nonzero(as_tuple=True)
    vectors_ND = resid_BLD[rows.to(device), cols.to(device)].to(sae.W_enc.dtype)
    n_items, n_concepts = len(prompts), sae.cfg.d_sae
    total = torch.zeros(n_items, n_concepts)
    peak = torch.zeros(n_items, n_concepts)
    active = torch.zeros(n_items, n_concepts)
    for start in range(0, len(rows), chunk):
        acts_NK = sae.encode(vectors_ND[start : start + chunk]).float().clamp_min(0).cpu()
        owner = rows[start : start + chunk]
        total.index_add_(0, owner, acts_NK)
        active.index_add_(0, owner, (acts_NK > 0).float())
        peak.scatter_reduce_(0, owner[:, None].expand_as(acts_NK), acts_NK, reduce="amax")
    n_counted = counted.sum(1, keepdim=True).clamp_min(1)
    return total / n_counted, peak, active


def sparse_rows(item_ids: list[str], mean_BK: torch.Tensor, peak_BK: torch.Tensor, active_BK: torch.Tensor) -> dict[str, list]:
    rows, concepts = (mean_BK > 0).nonzero(as_tuple=True)
    return {
        "item_id": [item_ids[r] for r in rows.tolist()],
        "concept": concepts.tolist(),
        "saliency": mean_BK[rows, concepts].tolist(),
        "max_activation": peak_BK[rows, concepts].tolist(),
        "active_tokens": active_BK[rows, concepts].int().tolist(),
    }


def skip_reason(prompt: EncodedPrompt, context_policy: str) -> str | None:
    """Why an encoded item cannot be extracted (None: it can); see ITEM_TOKENS.skipped."""
    if prompt.truncated and context_policy == "skip":
        return "too_long"
    if not any(prompt.counted):  # empty or whitespace-only fields, or all of its text cut off
        return "no_counted_tokens"
    return None


def token_row(item_id: str, prompt: EncodedPrompt, skipped: str | None) -> dict[str, Any]:
    """The item's ITEM_TOKENS row; a skipped item read nothing and counts nothing."""
    read = 0 if skipped else len(prompt.input_ids)
    return {"item_id": item_id, "counted_tokens": 0 if skipped else sum(prompt.counted),
            "total_tokens": prompt.total_tokens, "read_tokens": read, "truncated": prompt.truncated,
            "skipped": skipped}


def extract_saliency(
    model: Any, tokenizer: Any, sae: Any, layer: int, items: list[dict[str, Any]], *, mode: str,
    system_prompt: str | None, max_length: int, context_policy: str, batch_size: int,
    responses: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Sparse saliency rows and per-item token counts for `items` (one token row per item, skipped ones too:
    a skipped item gets no saliency rows and a warning, and the other items are still extracted)."""
    encoded: list[tuple[str, EncodedPrompt]] = []
    token_rows = []
    for item in items:
        response = responses.get(item["item_id"]) if responses else None
        prompt = encode_item(tokenizer, item, mode, system_prompt, response, max_length)
        skipped = skip_reason(prompt, context_policy)
        token_rows.append(token_row(item["item_id"], prompt, skipped))
        if skipped:
            log.warning("item %s skipped (%s): %d tokens, max_length=%d, context_policy=%s",
                        item["item_id"], skipped, prompt.total_tokens, max_length, context_policy)
            continue
        encoded.append((item["item_id"], prompt))
    truncated = sum(row["truncated"] and not row["skipped"] for row in token_rows)
    if truncated:
        log.warning("%d item(s) longer than max_length=%d were truncated inside their own text "
                    "(prompt head and end kept)", truncated, max_length)
    # Similar lengths together: less padding.
    encoded.sort(key=lambda pair: len(pair[1].input_ids))
    columns: dict[str, list] = {name: [] for name in SALIENCY.names}
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        mean, peak, active = batch_saliency(model, sae, layer, [p for _, p in batch], tokenizer.pad_token_id)
        for name, values in sparse_rows([i for i, _ in batch], mean, peak, active).items():
            columns[name] += values
        if start // batch_size % 10 == 0:
            log.info("extracted %d / %d items", start + len(batch), len(encoded))
    saliency = pl.from_arrow(pa.table(columns, schema=SALIENCY)).sort("item_id", "concept")
    return saliency, pl.from_arrow(table_from_rows(token_rows, ITEM_TOKENS))


def run_extract(model: Any, tokenizer: Any, sae: Any, layer: int, items_path: str, scores_path: str | None,
                saliency_path: str, tokens_path: str, model_spec: dict[str, Any], bench_spec: dict[str, Any],
                saliency_spec: dict[str, Any], *, batch_size: int = 8) -> None:
    """Extract one benchmark's shard; `batch_size` is a throughput setting, not part of the job's spec."""
    items = pl.read_parquet(items_path).to_dicts()
    responses = None
    if saliency_spec["include_response"]:
        scores = pl.read_parquet(scores_path)
        responses = dict(zip(scores["item_id"].to_list(), scores["response"].to_list(), strict=True))
    saliency, tokens = extract_saliency(
        model, tokenizer, sae, layer, items, mode=saliency_spec["tokens"], system_prompt=model_spec.get("system_prompt"),
        max_length=model_spec["max_length"], context_policy=bench_spec["context_policy"],
        batch_size=batch_size, responses=responses,
    )
    write_parquet(saliency.to_arrow(), saliency_path, SALIENCY)
    write_parquet(tokens.to_arrow(), tokens_path, ITEM_TOKENS)
    log.info("%d items (%d skipped), %d non-zero (item, concept) pairs, %d concepts fire", tokens.height,
             tokens["skipped"].is_not_null().sum(), saliency.height, saliency["concept"].n_unique())
