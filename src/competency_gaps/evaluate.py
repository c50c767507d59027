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
from competency_gaps.prompts import prompt_text
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


# Padded tokens per log-likelihood batch: the logits of a batch take tokens × vocabulary × 4 bytes
# (4,096 × 49k ≈ 0.8 GB for SmolLM2), so long prompts go in smaller batches.
MAX_BATCH_TOKENS = 4096


def length_batches(lengths: list[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices grouped longest first, at most `batch_size` per group and `max_tokens` padded tokens (one at least)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.inference_mode()
def continuation_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[list[float]]:
    """Per-token log-probabilities of each continuation given its context (right-padded batches)."""
    device = next(model.parameters()).device
    results: list[list[float]] = [[] for _ in pairs]
    for indices in length_batches([len(c) + len(x) for c, x in pairs], batch_size):
        batch = [pairs[i] for i in indices]
        length = max(len(c) + len(x) for c, x in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (ctx, cont) in enumerate(batch):
            ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            mask[row, : len(ctx) + len(cont)] = 1
        logits_BLV = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (ctx, cont) in enumerate(batch):
            # Normalise only the rows that predict the continuation: long prompts × a 50k vocabulary
            # would otherwise cost gigabytes.
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logits_BLV.device)
            logprobs = torch.log_softmax(logits_BLV[row, positions].float(), -1).cpu()
            results[indices[row]] = logprobs[torch.arange(len(cont)), torch.tensor(cont)].tolist()
    return results


def tied_best(totals: list[float]) -> list[int]:
    """Indices of every option sharing the highest score (exact float equality)."""
    best = max(totals)
    return [index for index, total in enumerate(totals) if total == best]


def score_loglik_items(model: Any, tokenizer: Any, items: list[dict[str, Any]], system_prompt: str | None, batch_size: int) -> list[dict[str, Any]]:
    pairs: list[tuple[list[int], list[int]]] = []
    for item in items:
        prompt_ids = context_ids(tokenizer, prompt_text(tokenizer, item, system_prompt))
        contexts = item["choice_contexts"] or [None] * len(item["choices"])
        for context, choice in zip(contexts, item["choices"], strict=True):
            ctx = prompt_ids if context is None else context_ids(tokenizer, context)
            pairs.append((ctx, tokenizer(choice, add_special_tokens=False)["input_ids"]))
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


def cut_off_rows(new_tokens: torch.Tensor, stop_ids: list[int], max_new_tokens: int) -> list[bool]:
    """Per row: did decoding stop at max_new_tokens rather than at a stop token?

    A row that finished early is padded after its stop token, so a row was cut off when it holds no stop
    token and the batch ran the full max_new_tokens.
    """
    if new_tokens.shape[1] < max_new_tokens:
        return [False] * new_tokens.shape[0]
    stops = torch.tensor(stop_ids, dtype=new_tokens.dtype, device=new_tokens.device)
    stopped = torch.isin(new_tokens, stops).any(dim=1)
    return (~stopped).tolist()


@dataclass(frozen=True)
class Generation:
    text: str
    cut_off: bool  # hit max_new_tokens before any stop token


@torch.inference_mode()
def greedy_responses(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[Generation]:
    """Greedy completions, batched with left padding."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model, tokenizer)
    generations: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not _has_chat_template(tokenizer)).to(device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        generations += map(Generation, texts, cut_off_rows(new_tokens, stop_ids, max_new_tokens))
        log.info("generated %d / %d", len(generations), len(prompts))
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
