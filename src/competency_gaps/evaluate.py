"""Stage 2: run the model on one benchmark and score every item into p_i in [0, 1].

Log-likelihood policies compare the model's log-probability of each candidate continuation
(multiple choice: mean per-token log-probability after the chat prompt; sentence pairs: total
log-probability of each sentence on its own). Generation policies decode greedily and hand the
response to the benchmark's answer extractor (competency_gaps.scoring).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
from jinja2.exceptions import TemplateError

from competency_gaps.benchmarks.base import GENERATION_POLICIES, LOGLIK_POLICIES
from competency_gaps.hooks import (SharedPrefix, cache_rows, has_sliding_window, new_cache, read_prefix, shared_prefix_length,
                                  with_cache)
from competency_gaps.progress import Progress
from competency_gaps.prompts import prompt_text
from competency_gaps.saliency import length_batches, padded
from competency_gaps.scoring import score_generation
from competency_gaps.tables import SCORES, table_from_rows, write_parquet

log = logging.getLogger(__name__)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def start_of_text_id(tokenizer: Any) -> int:
    """The token a document starts after, for scoring a sentence with no context (CrowS-Pairs).

    `bos_token` is not it in general: ChatML tokenizers (SmolLM2-Instruct) set it to the role marker
    `<|im_start|>`. In order: the special token the tokenizer itself prepends (Llama, Gemma BOS); else
    `<|endoftext|>`, the GPT-2/SmolLM/Qwen document separator, when the vocabulary has it; else eos.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if full and full[0] != plain[0] and full[0] in tokenizer.all_special_ids:
        return full[0]
    if "<|endoftext|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no BOS, <|endoftext|> or eos token to start a sentence from")
    return tokenizer.eos_token_id


def context_ids(tokenizer: Any, context: str) -> list[int]:
    """Token ids of a scoring context; an empty context is the start-of-text token alone."""
    if not context:
        return [start_of_text_id(tokenizer)]
    return tokenizer(context, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"]


# Padded tokens per log-likelihood batch: activations and the key/value cache of a batch grow with
# tokens (and continuation logits with tokens × vocabulary × 4 bytes: 4,096 × 49k ≈ 0.8 GB for SmolLM2),
# so long prompts go in smaller batches.
MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class ContextGroup:
    """Requests that share one context: it is read once and each continuation is scored from its cache."""
    context: list[int]
    members: list[int]  # indices of the (context, continuation) pairs


def shared_context_groups(pairs: list[tuple[list[int], list[int]]]) -> list[ContextGroup]:
    """Pairs grouped by identical context ids, in order of first appearance (an item's options; every
    start-of-text sentence of CrowS-Pairs)."""
    members: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(pairs):
        if not context:
            raise ValueError(f"pair {index} has an empty context: nothing predicts its first token")
        members.setdefault(tuple(context), []).append(index)
    return [ContextGroup(list(context), indices) for context, indices in members.items()]


@dataclass
class ContextCache:
    """Key/value cache of a left-padded batch of contexts and each one's next-token log-probabilities."""
    cache: Any  # transformers Cache; never fed to the model itself (a forward extends a cache in place)
    mask: torch.Tensor  # [contexts, padded length], on the model's device
    lengths: torch.Tensor  # [contexts] real tokens per context, on the model's device
    next_logprobs: torch.Tensor  # [contexts, vocabulary] float32, on the model's device


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens take 0..n-1 whatever the padding; padding gets a harmless 1
    (as in `generate`)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def read_contexts(model: Any, contexts: list[list[int]], pad_id: int, prefix: SharedPrefix | None = None) -> ContextCache:
    """One forward over the contexts, left padded so that every context ends in the last column: its
    logits are the only ones computed, and positions between real tokens are the same in the cache as in
    the text (sliding-window layers count cache slots). With `prefix` (the head every context starts with,
    read once) each row starts from its cache and the padding sits between it and the rest of the context."""
    device = next(model.parameters()).device
    skip = prefix.length if prefix is not None else 0
    ids, tail_mask = padded([context[skip:] for context in contexts], pad_id, side="left")
    ids = ids.to(device)
    mask = torch.cat([torch.ones(len(contexts), skip, dtype=tail_mask.dtype), tail_mask], dim=1).to(device)
    positions = padded_positions(mask)[:, skip:]
    cache = prefix.rows(len(contexts)) if prefix is not None else new_cache(model)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **with_cache(model, cache))
    next_logprobs = torch.log_softmax(output.logits[:, -1].float(), -1)
    return ContextCache(cache, mask, mask.sum(-1), next_logprobs)


def shared_context_prefix(model: Any, contexts: list[list[int]]) -> SharedPrefix | None:
    """The head all `contexts` share (an item template's system turn and instruction), read once through the
    model, leaving each context a token of its own; None when they share none, or for a model with
    sliding-window layers, which count the padding between the head and the rest as context."""
    if has_sliding_window(model):
        return None
    length = shared_prefix_length(contexts, min(len(context) for context in contexts) - 1) if contexts else 0
    return read_prefix(model, contexts[0][:length]) if length else None


def continuation_tail_logprobs(model: Any, contexts: ContextCache, rows: list[int], tails: list[list[int]],
                               pad_id: int) -> list[list[float]]:
    """Log-probabilities of each continuation's tokens after its first, from its context's cache.

    `tails[k]` is a continuation of length >= 2 whose context is row `rows[k]` of `contexts`; its input
    is all but its last token (right padded) and the targets all but its first.
    """
    device = contexts.mask.device
    rows_t = torch.tensor(rows, device=device)
    ids, tail_mask = padded([tail[:-1] for tail in tails], pad_id, side="right")
    ids, tail_mask = ids.to(device), tail_mask.to(device)
    mask = torch.cat([contexts.mask[rows_t], tail_mask], dim=1)
    positions = contexts.lengths[rows_t, None] + torch.arange(ids.shape[1], device=device)
    logits_BTV = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, **with_cache(model, cache_rows(contexts.cache, rows_t))).logits
    # Normalise only the real continuation rows: a batch × a 50k vocabulary would otherwise cost gigabytes.
    real = tail_mask.bool()
    logprobs = torch.log_softmax(logits_BTV[real].float(), -1)
    targets = torch.tensor([token for tail in tails for token in tail[1:]], device=device)
    picked = logprobs[torch.arange(len(targets), device=device), targets].cpu().tolist()
    per_row, start = [], 0
    for tail in tails:
        per_row.append(picked[start : start + len(tail) - 1])
        start += len(tail) - 1
    return per_row


@torch.inference_mode()
def score_from_contexts(model: Any, contexts: ContextCache, scored: list[tuple[int, int]],
                        pairs: list[tuple[list[int], list[int]]], results: list[list[float]], pad_id: int,
                        max_tokens: int) -> None:
    """Fill results[index] for each (context row, pair index) of `scored` from the read contexts."""
    # Every first continuation token from its context's last logit, in one transfer.
    device = contexts.next_logprobs.device
    firsts = contexts.next_logprobs[torch.tensor([row for row, _ in scored], device=device),
                                    torch.tensor([pairs[index][1][0] for _, index in scored], device=device)].tolist()
    for (_, index), first in zip(scored, firsts, strict=True):
        results[index] = [first]
    longer = [(row, index) for row, index in scored if len(pairs[index][1]) > 1]  # continuations of 2+ tokens
    # Option rows are bounded like context batches: each holds a copy of its context's cache.
    padded_context = contexts.mask.shape[1]
    lengths = [padded_context + len(pairs[index][1]) - 1 for _, index in longer]
    for chunk in length_batches(lengths, max_tokens):
        tails = continuation_tail_logprobs(model, contexts, [longer[k][0] for k in chunk],
                                           [pairs[longer[k][1]][1] for k in chunk], pad_id)
        for k, tail in zip(chunk, tails, strict=True):
            results[longer[k][1]] += tail


@torch.inference_mode()
def continuation_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                          max_tokens: int = MAX_BATCH_TOKENS) -> list[list[float]]:
    """Per-token log-probabilities of each continuation given its context.

    Pairs sharing a context (an item's options) read it once: contexts go through the model in batches,
    the first continuation token is scored from the context's last logit, and the rest of every
    continuation from a copy of the context's key/value cache, so a long prompt is not re-read per option;
    the head every context shares (the chat template's system turn, the benchmark's instruction) is read once.
    """
    groups = shared_context_groups(pairs)
    prefix = shared_context_prefix(model, [group.context for group in groups])
    skip = prefix.length if prefix is not None else 0
    results: list[list[float]] = [[] for _ in pairs]
    progress = Progress(log, "scored", len(pairs), "options")
    for batch in length_batches([len(group.context) - skip for group in groups], max_tokens, batch_size):
        contexts = read_contexts(model, [groups[g].context for g in batch], pad_id, prefix)
        scored = [(row, index) for row, g in enumerate(batch) for index in groups[g].members if pairs[index][1]]
        if scored:
            score_from_contexts(model, contexts, scored, pairs, results, pad_id, max_tokens)
        progress.update(sum(len(groups[g].members) for g in batch))
    return results


def tied_best(totals: list[float]) -> list[int]:
    """Indices of every option sharing the highest score (exact float equality)."""
    best = max(totals)
    return [index for index, total in enumerate(totals) if total == best]


def loglik_pairs(tokenizer: Any, items: list[dict[str, Any]], system_prompt: str | None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every option, item by item: the chat prompt, or the option's own
    context (start of text when empty), then the option tokenized on its own."""
    pairs: list[tuple[list[int], list[int]]] = []
    for item in items:
        prompt_ids = context_ids(tokenizer, prompt_text(tokenizer, item, system_prompt))
        contexts = item["choice_contexts"] or [None] * len(item["choices"])
        for context, choice in zip(contexts, item["choices"], strict=True):
            ctx = prompt_ids if context is None else context_ids(tokenizer, context)
            pairs.append((ctx, tokenizer(choice, add_special_tokens=False)["input_ids"]))
    return pairs


def score_loglik_items(model: Any, tokenizer: Any, items: list[dict[str, Any]], system_prompt: str | None, batch_size: int) -> list[dict[str, Any]]:
    pairs = loglik_pairs(tokenizer, items, system_prompt)
    token_logprobs = iter(continuation_logprobs(model, pairs, batch_size, tokenizer.pad_token_id))
    rows = []
    tied_items = 0
    for item in items:
        per_choice = [next(token_logprobs) for _ in item["choices"]]
        # Multiple choice is length-normalised (options differ in length); a sentence pair is compared whole.
        totals = [sum(lp) / len(lp) if item["scoring"] == "mc_loglik" else sum(lp) for lp in per_choice]
        tied = tied_best(totals)
        tied_items += len(tied) > 1
        # A tie is broken at random: p_i is the expected accuracy of that draw, not a win for option 0.
        score = 1 / len(tied) if item["gold_index"] in tied else 0.0
        rows.append({
            "item_id": item["item_id"], "scoring": item["scoring"], "score": score,
            "prediction": ",".join(map(str, tied)),
            # The first tied option's text stands in as the response (saliency may read it).
            "response": item["choices"][tied[0]], "choice_logprobs": totals,
        })
    if tied_items:
        log.warning("%d item(s) with several options tied for the best score: scored 1/k if the gold is among the k", tied_items)
    return rows


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


# Assistant text that no template alters, to find what a template writes right after an answer.
_ANSWER_MARKER = "ANSWERMARKER7x9"


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <end_of_turn>, <|end|>, …).

    Read from the template itself: render an assistant answer, tokenize what follows it, and keep the
    first token if it is a special/added token. None without a template or when none follows.
    """
    if not _has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as error:  # a template that refuses this conversation: fall back to the eos ids
        log.warning("could not render an assistant turn to find the end-of-turn token: %s", error)
        return None
    if _ANSWER_MARKER not in text:
        return None
    after = tokenizer(text.split(_ANSWER_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    if not after:
        return None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return after[0] if after[0] in special else None


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a response: `generate(eos_token_id=...)` replaces the model's own stop ids, so
    they are united with the tokenizer's eos and the template's end-of-turn token (order kept, no duplicates)."""
    generation_config = getattr(model, "generation_config", None)
    candidates = [
        *_ids(getattr(generation_config, "eos_token_id", None)),
        *_ids(tokenizer.eos_token_id),
        *_ids(end_of_turn_token_id(tokenizer)),
    ]
    return list(dict.fromkeys(candidates))


@dataclass(frozen=True)
class Generation:
    text: str
    cut_off: bool  # hit max_new_tokens before any stop token


def until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """A row's new tokens up to and including its first stop token (what follows is padding)."""
    stops = set(stop_ids)
    end = next((index + 1 for index, token in enumerate(tokens) if token in stops), len(tokens))
    return tokens[:end]


def is_cut_off(tokens: list[int], stop_ids: list[int], max_new_tokens: int) -> bool:
    """Did decoding stop at max_new_tokens rather than at a stop token? (`tokens`: the row's, as `until_stop`.)"""
    return len(tokens) >= max_new_tokens and (not tokens or tokens[-1] not in set(stop_ids))


# Generation-config settings that change which token greedy decoding picks. `generate` applies them;
# `greedy_decode` does not, so a model whose generation config sets one is decoded by `generate`.
LOGITS_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                   "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens",
                   "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                   "exponential_decay_length_penalty")


def logits_settings(model: Any) -> list[str]:
    """The LOGITS_SETTINGS the model's generation config sets to other than the default."""
    from transformers import GenerationConfig

    config, default = getattr(model, "generation_config", None), GenerationConfig()
    if config is None:
        return []
    return [key for key in LOGITS_SETTINGS if getattr(config, key, None) != getattr(default, key, None)]


@torch.inference_mode()
def greedy_decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_ids: list[int],
                  max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of a left-padded batch: each row's new tokens, up to and including its first stop token.

    A row leaves the batch, with its rows of the key/value cache, as soon as it stops. `generate` keeps a
    finished row in the batch until the last one stops, and on a CPU the cache's attention costs more than the
    weights. Measured on GSM8K's 40 prompts in one batch (up to 512 new tokens), the same 40 responses: one
    thread, 147 s against 219–233 s for `generate` with a static cache; two threads, 110 s against 206 s for plain
    `generate` (bench/generation.py). transformers' continuous batching (`generate_batch`), which also retires
    finished requests, took 359 s on one thread.
    """
    stops = torch.tensor(stop_ids, device=input_ids.device)
    positions = padded_positions(attention_mask)
    cache = new_cache(model)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **with_cache(model, cache)).logits
    rows, position = torch.arange(input_ids.shape[0], device=input_ids.device), positions[:, -1]
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    progress = Progress(log, "decoding", max_new_tokens, "steps", total_is_bound=True)  # it ends once every row stops
    for step in range(max_new_tokens):
        progress.update(1, f"{len(rows)} of {input_ids.shape[0]} rows still decoding")
        token = logits[:, -1].argmax(-1)
        for row, value in zip(rows.tolist(), token.tolist()):
            new_tokens[row].append(value)
        going = ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            rows, token, position, attention_mask = rows[kept], token[kept], position[kept], attention_mask[kept]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                       use_cache=True, **with_cache(model, cache)).logits
    return new_tokens


@torch.inference_mode()
def generate_new_tokens(model: Any, encoded: Any, stop_ids: list[int], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """`generate`'s greedy continuation of a left-padded batch, each row as `until_stop` (for models whose
    generation config processes the logits, see `logits_settings`)."""
    # A static cache: the default dynamic one concatenates every layer's keys and values at every step
    # (measured on CPU, SmolLM2, batch 40: 29 % of decoding time).
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
                            eos_token_id=stop_ids, pad_token_id=pad_id)
    return [until_stop(row, stop_ids) for row in output[:, encoded["input_ids"].shape[1]:].tolist()]


def greedy_responses(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[Generation]:
    """Greedy completions, batched with left padding."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model, tokenizer)
    processed = logits_settings(model)
    if processed:
        log.info("decoding with generate: the model's generation config sets %s", ", ".join(processed))
    generations: list[Generation] = []
    progress = Progress(log, "generated", len(prompts), "prompts", every_s=0.0)  # a line per batch: batches are slow
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not _has_chat_template(tokenizer)).to(device)
        rows = (generate_new_tokens(model, encoded, stop_ids, max_new_tokens, tokenizer.pad_token_id) if processed
                else greedy_decode(model, encoded["input_ids"], encoded["attention_mask"], stop_ids, max_new_tokens))
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        generations += [Generation(text, is_cut_off(row, stop_ids, max_new_tokens)) for text, row in zip(texts, rows)]
        progress.update(len(texts))
    return generations


def score_generation_items(model: Any, tokenizer: Any, items: list[dict[str, Any]], system_prompt: str | None,
                           batch_size: int, max_new_tokens: int, judge: str | None = None) -> list[dict[str, Any]]:
    prompts = [prompt_text(tokenizer, item, system_prompt) for item in items]
    rows = []
    for item, generated in zip(items, greedy_responses(model, tokenizer, prompts, batch_size, max_new_tokens), strict=True):
        scored = score_generation(item["scoring"], generated.text, item, judge, cut_off=generated.cut_off)
        rows.append({"item_id": item["item_id"], "scoring": item["scoring"], "score": scored.score,
                     "prediction": scored.prediction, "response": generated.text, "cut_off": generated.cut_off})
    return rows


def log_cut_off(items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Per benchmark, how many generated responses ran into max_new_tokens (their answers may be missing)."""
    benchmark = {item["item_id"]: item.get("benchmark") or "?" for item in items}
    generated = Counter(benchmark[row["item_id"]] for row in rows if row.get("cut_off") is not None)
    cut_off = Counter(benchmark[row["item_id"]] for row in rows if row.get("cut_off"))
    for name, total in sorted(generated.items()):
        log.log(logging.WARNING if cut_off[name] else logging.INFO, "%s: %d / %d generated responses cut off at max_new_tokens (%.1f%%)",
                name, cut_off[name], total, 100 * cut_off[name] / total)


def evaluate_items(model: Any, tokenizer: Any, items: list[dict[str, Any]], *, system_prompt: str | None,
                   batch_size: int, generation_batch_size: int, max_new_tokens: int, judge: str | None = None) -> pl.DataFrame:
    """Score every item; rows come back in the items' order."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_policy.setdefault(item["scoring"], []).append(item)
    rows: list[dict[str, Any]] = []
    for policy, group in sorted(by_policy.items()):
        if policy == "judge" and judge is None:
            # Nothing could score a response: skip decoding, the items are coverage-only (χ_model N/A).
            log.warning("%d judge-scored item(s) and no judge configured: coverage only", len(group))
            rows += [{"item_id": item["item_id"], "scoring": policy, "score": None} for item in group]
        elif policy in LOGLIK_POLICIES:
            rows += score_loglik_items(model, tokenizer, group, system_prompt, batch_size)
        elif policy in GENERATION_POLICIES:
            rows += score_generation_items(model, tokenizer, group, system_prompt, generation_batch_size, max_new_tokens, judge)
        else:  # "none": coverage only, χ_model is N/A for these items
            rows += [{"item_id": item["item_id"], "scoring": policy, "score": None} for item in group]
    log_cut_off(items, rows)
    position = {item["item_id"]: index for index, item in enumerate(items)}
    rows.sort(key=lambda row: position[row["item_id"]])
    return pl.from_arrow(table_from_rows(rows, SCORES))


def run_import(items_path: str, scores_path: str, import_spec: dict[str, Any]) -> pl.DataFrame:
    """Take per-item scores from an lm-evaluation-harness log or a plain table instead of running the model."""
    from competency_gaps.import_scores import import_scores

    scores = import_scores(import_spec, pl.read_parquet(items_path))
    write_parquet(scores.to_arrow(), scores_path, SCORES)
    log.info("imported scores for %d items from %s", scores.height, import_spec.get("table") or import_spec.get("lm_eval_samples"))
    return scores


def run_evaluate(model: Any, tokenizer: Any, items_path: str, scores_path: str, model_spec: dict[str, Any],
                 bench_spec: dict[str, Any], *, batch_size: int = 8, generation_batch_size: int = 8) -> pl.DataFrame:
    """Score the items of one benchmark; batch sizes are throughput settings, not part of the job's spec."""
    items = pl.read_parquet(items_path).to_dicts()
    scores = evaluate_items(
        model, tokenizer, items, system_prompt=model_spec.get("system_prompt"), batch_size=batch_size,
        generation_batch_size=generation_batch_size, max_new_tokens=bench_spec["max_new_tokens"],
        judge=bench_spec.get("judge"),
    )
    write_parquet(scores.to_arrow(), scores_path, SCORES)
    scored = scores["score"].drop_nulls()
    log.info("scored %d items; mean p_i = %s", len(scored), f"{scored.mean():.3f}" if len(scored) else "n/a (coverage only)")
    return scores
