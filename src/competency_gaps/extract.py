"""Stage 4: per-item concept saliency s_i^c at one layer, in sparse long form.

s_i^c is the mean SAE activation of concept c over item i's counted tokens (see prompts.py for which
tokens count). The device maths is in saliency.py; this module encodes the items, batches them by token
budget and writes the shards.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from competency_gaps.concept_labels import TokenText, context_frame, read_prompts
from competency_gaps.labels import TopContexts
from competency_gaps.prompts import EncodedPrompt, encode_item
from competency_gaps.saliency import SparseSaliency
from competency_gaps.tables import CONTEXTS, ITEM_TOKENS, SALIENCY, table_from_rows, write_json, write_parquet
from competency_gaps.workflow import BATCH_TOKENS

if TYPE_CHECKING:
    from competency_gaps.sae import SAEEvaluation

log = logging.getLogger(__name__)


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


class ShardRows:
    """A benchmark's saliency rows as they come, batch by batch, kept as compact arrays in the shard's types
    (20 B a row; Python lists held over 200 B a row and took longer per row than a GPU batch), and put in the
    shard's order, by item id then concept, at the end."""

    # The kept arrays' types: the item's position, then SALIENCY's value columns in their shard types.
    _DTYPES = {"item": np.int32, "concept": np.int32, "saliency": np.float32, "max_activation": np.float32,
               "active_tokens": np.int32}
    _COLUMNS = ("concept", "saliency", "max_activation", "active_tokens")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in self._DTYPES}

    def add(self, items: list[int], sparse: SparseSaliency) -> None:
        """One batch: `items` maps the batch's prompt rows to item positions (indices into `table`'s ids)."""
        self._parts["item"].append(np.asarray(items, dtype=np.int32)[sparse.row.numpy()])
        for name in self._COLUMNS:
            self._parts[name].append(getattr(sparse, name).numpy().astype(self._DTYPES[name], copy=False))

    def table(self, item_ids: list[str]) -> pa.Table:
        """The rows as a SALIENCY table, sorted by item id and concept (`item_ids`: the item positions' ids)."""
        columns = {name: np.concatenate(parts) if parts else np.zeros(0, self._DTYPES[name])
                   for name, parts in self._parts.items()}
        id_rank = np.empty(len(item_ids), dtype=np.int64)
        id_rank[np.argsort(np.array(item_ids, dtype=object), kind="stable")] = np.arange(len(item_ids))
        order = np.argsort((id_rank[columns["item"]] << 32) | columns["concept"].astype(np.int64), kind="stable")
        ids = pa.array(item_ids, pa.string()).take(pa.array(columns.pop("item")[order]))
        return pa.table({"item_id": ids, **{name: columns.pop(name)[order] for name in self._COLUMNS}}, schema=SALIENCY)


def extract_saliency(
    model: Any, tokenizer: Any, sae: Any, layer: int, items: list[dict[str, Any]], *, mode: str,
    system_prompt: str | None, max_length: int, context_policy: str, batch_tokens: int,
    responses: dict[str, str] | None = None, contexts: TopContexts | None = None, quality: SAEEvaluation | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Sparse saliency rows and per-item token counts for `items` (one token row per item, skipped ones too:
    a skipped item gets no saliency rows and a warning, and the other items are still extracted).
    `contexts`, when given, collects each concept's top contexts among the items' counted tokens (its
    sequences are indices into the extracted items, in `extracted_ids` order); `quality` accumulates how
    well the SAE reconstructs those tokens."""
    encoded: list[tuple[str, EncodedPrompt]] = []
    token_rows = []
    token_row_of: list[int] = []  # each encoded prompt's row in token_rows
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
        token_row_of.append(len(token_rows) - 1)
    truncated = sum(row["truncated"] and not row["skipped"] for row in token_rows)
    if truncated:
        log.warning("%d item(s) longer than max_length=%d were truncated inside their own text "
                    "(prompt head and end kept)", truncated, max_length)
    rows = ShardRows()
    prompts = [prompt for _, prompt in encoded]
    for batch, sparse in read_prompts(model, sae, layer, prompts, tokenizer.pad_token_id, batch_tokens,
                                      [contexts] if contexts else [], what="extracted", quality=quality):
        rows.add(batch, sparse)
        # T_i as read: a massive activation at a counted token is left out of the mean, so out of the count too.
        for i, n_counted in zip(batch, sparse.counted_tokens.tolist(), strict=True):
            token_rows[token_row_of[i]]["counted_tokens"] = n_counted
    saliency = pl.from_arrow(rows.table([item_id for item_id, _ in encoded]))
    return saliency, pl.from_arrow(table_from_rows(token_rows, ITEM_TOKENS))


def run_extract(model: Any, tokenizer: Any, sae: Any, layer: int, items_path: str, scores_path: str | None,
                saliency_path: str, tokens_path: str, contexts_path: str, model_spec: dict[str, Any],
                bench_spec: dict[str, Any], saliency_spec: dict[str, Any], context_spec: dict[str, Any],
                benchmark: str, *, batch_tokens: int = BATCH_TOKENS, sae_fit_path: str | None = None) -> None:
    """Extract one benchmark's shard and its concepts' top contexts, and (to `sae_fit_path`) the SAE's
    reconstruction of the counted tokens as an `SAEEvaluation` state for the sae_quality job; `batch_tokens`
    is a throughput setting, not part of the job's spec."""
    from competency_gaps.sae import SAEEvaluation

    items = pl.read_parquet(items_path).to_dicts()
    responses = None
    if saliency_spec["include_response"]:
        scores = pl.read_parquet(scores_path)
        responses = dict(zip(scores["item_id"].to_list(), scores["response"].to_list(), strict=True))
    contexts = TopContexts(sae.cfg.d_sae, context_spec["top_k"], context_spec["before"], context_spec["after"])
    quality = SAEEvaluation() if sae_fit_path else None
    saliency, tokens = extract_saliency(
        model, tokenizer, sae, layer, items, mode=saliency_spec["tokens"], system_prompt=model_spec.get("system_prompt"),
        max_length=model_spec["max_length"], context_policy=bench_spec["context_policy"],
        batch_tokens=batch_tokens, responses=responses, contexts=contexts, quality=quality,
    )
    extracted_ids = tokens.filter(pl.col("skipped").is_null())["item_id"].to_list()
    top = context_frame(contexts.result(), "top", benchmark, extracted_ids, TokenText(tokenizer))
    write_parquet(saliency.to_arrow(), saliency_path, SALIENCY)
    write_parquet(tokens.to_arrow(), tokens_path, ITEM_TOKENS)
    write_parquet(top.to_arrow(), contexts_path, CONTEXTS)
    if quality is not None:
        write_json({"benchmark": benchmark, "prompts": len(extracted_ids), "evaluation": quality.state()}, sae_fit_path)
        log.info("SAE on the counted tokens: %s", quality.result())
    log.info("%d items (%d skipped), %d non-zero (item, concept) pairs, %d concepts fire", tokens.height,
             tokens["skipped"].is_not_null().sum(), saliency.height, saliency["concept"].n_unique())
