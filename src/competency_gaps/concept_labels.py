"""Stage: what each concept is, per (model, layer): top contexts, the logit lens, a label and its detection score.

Extraction collects each benchmark's top contexts while it reads the items (`benchmark_contexts`); the corpus
pass (`run_corpus_contexts`, a job of its own that needs only the SAE) reads a seeded slice of the SAE corpus for
corpus contexts, a seeded random sample of activating contexts (held out: the label is made from the top ones)
and a pool of non-activating windows; the labels job then labels every live concept. The maths is in labels.py,
the optional LLM labeller in labellers.py.

Cost: one forward pass to the hooked layer over `corpus_tokens` tokens (plus the top-k bookkeeping, which
follows the non-zero activations), one (concepts × vocabulary) logit-lens product in chunks, and
`n_detection` × 2 lexical judgements per concept: linear in concepts and in tokens read.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from competency_gaps.figure_data import concept_markdown, markdown_escape
from competency_gaps.labels import (
    BYTE_PIECES,
    NegativePool,
    TopContexts,
    detection_score,
    feed,
    firing_tokens,
    heuristic_label,
    label_terms,
    lexical_judge,
    logit_lens_extremes,
)
from competency_gaps.hooks import read_shared_prefix
from competency_gaps.progress import Progress
from competency_gaps.prompts import EncodedPrompt
from competency_gaps.saliency import SparseSaliency, batch_saliency, length_batches
from competency_gaps.tables import CONTEXTS, LABELS, atomic_path, table_from_rows, write_json, write_parquet, write_text
from competency_gaps.workflow import BATCH_TOKENS

if TYPE_CHECKING:
    from competency_gaps.sae import SAEEvaluation

log = logging.getLogger(__name__)

CARD_CONTEXTS = 5  # contexts shown per concept card (the table keeps top_k)


# ---------------------------------------------------------------- contexts as tables


@functools.cache
def _byte_of_character() -> dict[str, int]:
    """Byte-level BPE's table (GPT-2's): the printable character that stands for each byte in a token's piece."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def bytes_text(raw: bytes) -> str:
    """`raw` decoded as UTF-8, each byte of an incomplete character written as SentencePiece writes it: <0xE6>."""
    parts, start = [], 0
    while start < len(raw):
        try:
            parts.append(raw[start:].decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(raw[start : start + error.start].decode("utf-8"))
            parts += [f"<0x{byte:02X}>" for byte in raw[start + error.start : start + error.end]]
            start += error.end
    return "".join(parts)


def partial_character_text(piece: str) -> str | None:
    """The text of a token holding part of a multi-byte character (which decodes alone to U+FFFD), its loose
    bytes written "<0xE6>": SentencePiece's byte-fallback pieces already read so; a byte-level BPE piece is
    mapped back to its bytes. None for any other piece."""
    if BYTE_PIECES.fullmatch(piece):
        return piece
    byte_of = _byte_of_character()
    if piece and all(char in byte_of for char in piece):
        return bytes_text(bytes(byte_of[char] for char in piece))
    return None


class TokenText:
    """Each token id's text, decoded once (a context table repeats ids many times). A token holding part of a
    character shows its bytes ("<0xE6><0x97>") rather than the "�" its decoding alone gives."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            text = self.tokenizer.decode([token_id]) if token_id >= 0 else ""
            if "\ufffd" in text:
                text = partial_character_text(self.tokenizer.convert_ids_to_tokens(token_id)) or text
            self.cache[token_id] = text
        return self.cache[token_id]


def window_lists(values: pa.Array, width: int) -> pa.ListArray:
    """Flat per-token values, `width` per window, as one list per window."""
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)


def context_frame(result: dict[str, Any], kind: str, source: str, item_ids: list[str] | None, text: TokenText) -> pl.DataFrame:
    """A `TopContexts.result()` as CONTEXTS rows (item_ids maps a sequence to its item; None for the corpus).
    The windows' lists are built from flat arrays: the corpus pass has some 10^5 contexts."""
    windows = result["window_tokens"].numpy()
    n, width = windows.shape
    sequences = result["seq"].numpy()
    ids, inverse = np.unique(windows, return_inverse=True)  # each distinct token's text decoded once
    texts = pa.array([text(int(t)) for t in ids], pa.string()).take(pa.array(inverse.reshape(-1)))
    table = pa.table({
        "concept": result["concept"].numpy().astype(np.int32), "kind": pa.array([kind] * n, pa.string()),
        "rank": result["rank"].numpy().astype(np.int32), "source": pa.array([source] * n, pa.string()),
        "item_id": pa.array([item_ids[s] for s in sequences.tolist()] if item_ids is not None else [None] * n, pa.string()),
        "sequence": sequences.astype(np.int64), "position": result["pos"].numpy().astype(np.int32),
        "activation": result["activation"].numpy().astype(np.float32),
        "token_ids": window_lists(pa.array(windows.reshape(-1).astype(np.int32)), width),
        "tokens": window_lists(texts, width),
        "activations": window_lists(pa.array(result["window_acts"].numpy().reshape(-1).astype(np.float32)), width),
        "peak_index": np.full(n, int(result["peak_index"]), dtype=np.int32),
    })
    return pl.from_arrow(table.select(CONTEXTS.names).cast(CONTEXTS))


def read_prompts(model: Any, sae: Any, layer: int, prompts: list[EncodedPrompt], pad_id: int, batch_tokens: int,
                 contexts: list[TopContexts], pool: NegativePool | None = None, what: str = "read",
                 quality: SAEEvaluation | None = None) -> Iterator[tuple[list[int], SparseSaliency]]:
    """Each token-budget batch's prompt indices and sparse saliency, feeding `contexts` (and `pool`, and
    `quality`) on the way; the head all prompts share is read once (`read_shared_prefix`), and the budget
    counts the tokens after it. Progress with rate and ETA goes to the log."""
    prefix = read_shared_prefix(model, layer, prompts)
    skip = prefix.length if prefix is not None else 0
    progress = Progress(log, what, sum(len(p.input_ids) for p in prompts), "tokens")
    for batch in length_batches([len(p.input_ids) - skip for p in prompts], batch_tokens):
        chosen = [prompts[i] for i in batch]
        rows = torch.tensor(batch, dtype=torch.long)
        observe = (lambda acts, rows=rows: feed(contexts, pool, acts, rows)) if contexts else None
        yield batch, batch_saliency(model, sae, layer, chosen, pad_id, observe, quality, prefix)
        progress.update(sum(len(p.input_ids) for p in chosen))


def best_per_concept(frames: list[pl.DataFrame], k: int) -> pl.DataFrame:
    """The k strongest contexts per concept across shards (ties: source, then sequence), re-ranked."""
    if not frames:
        return pl.from_arrow(CONTEXTS.empty_table())
    merged = pl.concat(frames).sort(["concept", "activation", "source", "sequence"], descending=[False, True, False, False])
    top = merged.group_by("concept", maintain_order=True).head(k)
    return top.with_columns(rank=pl.int_range(pl.len()).over("concept").cast(pl.Int32))


# ---------------------------------------------------------------- the corpus slice


def corpus_prompts(tokenizer: Any, corpus_path: str | Path, context_length: int, n_tokens: int, seed: int) -> list[EncodedPrompt]:
    """A seeded sample of the SAE corpus's rows of `context_length` tokens, about `n_tokens` in all; every
    token but the first counts (position 0 is the attention-sink outlier the SAE never trained on; a sink further
    on is left out when read, by `saliency.leave_out_massive`)."""
    from competency_gaps.sae import token_chunks

    texts = pl.read_parquet(corpus_path)["text"].to_list()
    chunks = token_chunks(tokenizer, texts, context_length)
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed))
    n_rows = min(chunks.shape[0], math.ceil(n_tokens / max(context_length - 1, 1)))
    counted = [False] + [True] * (context_length - 1)
    return [EncodedPrompt(input_ids=chunks[row].tolist(), counted=counted) for row in order[:n_rows].tolist()]


# ---------------------------------------------------------------- vocabulary views and labels


def unembedding_and_norm(model: Any) -> tuple[torch.Tensor, torch.nn.Module]:
    """The unembedding (V, D) and the final norm module the model applies before it (Identity if none)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    norm = next((getattr(base, name) for name in ("norm", "final_layernorm", "ln_f") if hasattr(base, name)), None)
    return model.get_output_embeddings().weight, norm if norm is not None else torch.nn.Identity()


def vocabulary_views(model: Any, sae: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids each concept's decoder direction promotes most and suppresses most (K, n), via the logit lens."""
    W_U, norm = unembedding_and_norm(model)
    (promoted, _), (suppressed, _) = logit_lens_extremes(sae.W_dec.detach(), norm, W_U.detach(), top=n)
    return promoted.cpu(), suppressed.cpu()


def firing_token_ids(top: pl.DataFrame, n_concepts: int, n: int) -> torch.Tensor:
    """(K, n) ids of the tokens each concept fires on most in its top contexts (-1 padded)."""
    if top.is_empty():
        return torch.full((n_concepts, n), -1, dtype=torch.long)
    ids, _ = firing_tokens(torch.tensor(top["concept"].to_numpy(), dtype=torch.long),
                           torch.tensor(np.stack(top["token_ids"].to_numpy()), dtype=torch.long),
                           torch.tensor(np.stack(top["activations"].to_numpy())), n_concepts, top=n)
    return ids


def heldout_samples(sample: pl.DataFrame, top: pl.DataFrame) -> dict[int, list[list[str]]]:
    """Per concept, the tokens of its sampled activating contexts that are not among the top contexts the
    label was made from (held out)."""
    shown = top.filter(pl.col("source") == "corpus").select("concept", "sequence")
    heldout = sample.join(shown, on=["concept", "sequence"], how="anti").sort("concept", "rank")
    return {concept: group["tokens"].to_list() for (concept,), group in heldout.group_by("concept", maintain_order=True)}


DetectionSet = tuple[list[list[str]], list[bool]]  # contexts (token strings) and whether each activates


def detection_sets(concepts: list[int], samples: dict[int, list[list[str]]], pool: NegativePool, text: TokenText,
                   n: int) -> dict[int, DetectionSet]:
    """Per concept: up to n held-out activating contexts and as many non-activating pool windows."""
    sets = {}
    for concept in concepts:
        positives = samples.get(concept, [])[:n]
        negatives = [[text(t) for t in window] for window in pool.negatives_for(concept, len(positives))]
        sets[concept] = (positives + negatives, [True] * len(positives) + [False] * len(negatives))
    return sets


def lexical_detection(label: str, detection: DetectionSet) -> float:
    """Detection score of a heuristic label under the offline lexical judge."""
    contexts, truth = detection
    terms = label_terms(label)
    return detection_score([lexical_judge(terms, context) for context in contexts], truth) if contexts else math.nan


def label_frame(n_concepts: int, top: pl.DataFrame, promoted: torch.Tensor, suppressed: torch.Tensor,
                sets: dict[int, DetectionSet], text: TokenText, n_tokens: int) -> pl.DataFrame:
    """One LABELS row per concept: the heuristic label of each live concept, scored by the lexical judge."""
    firing = firing_token_ids(top, n_concepts, n_tokens)
    peak = dict(top.group_by("concept").agg(pl.col("activation").max()).iter_rows())
    rows = []
    for concept in range(n_concepts):
        live = concept in peak
        fired = [text(t) for t in firing[concept].tolist() if t >= 0]
        promotes = [text(t) for t in promoted[concept].tolist()]
        # Two promoted tokens at most: mid-layer logit lenses are noisy, the firing tokens say more.
        label = heuristic_label(fired, promotes[:2]) if live else None
        rows.append({
            "concept": concept, "live": live, "label": label, "label_source": "heuristic" if live else None,
            "detection_score": lexical_detection(label, sets[concept]) if live else math.nan,
            "detection_judge": "lexical" if live else None, "n_detection": len(sets[concept][0]) if live else 0,
            "firing_tokens": fired, "promoted_tokens": promotes,
            "suppressed_tokens": [text(t) for t in suppressed[concept].tolist()], "max_activation": peak.get(concept),
        })
    return pl.from_arrow(table_from_rows(rows, LABELS))


def with_neuronpedia(labels: pl.DataFrame, source: dict[str, Any] | None) -> pl.DataFrame:
    """Neuronpedia explanations replace the labels of the concepts they cover (their detection score is unknown
    until a judge reads them: NaN without an LLM judge)."""
    if not source:
        return labels
    from competency_gaps.labellers import read_neuronpedia_explanations

    explained = read_neuronpedia_explanations(source["path"], source.get("model_id"), source.get("layer"))
    explained = explained.select(pl.col("concept").cast(pl.Int32), pl.col("label").alias("explanation"))
    covered = pl.col("explanation").is_not_null()
    return (labels.join(explained, on="concept", how="left")
            .with_columns(label=pl.when(covered).then("explanation").otherwise("label"),
                          label_source=pl.when(covered).then(pl.lit("neuronpedia")).otherwise("label_source"),
                          detection_score=pl.when(covered).then(float("nan")).otherwise("detection_score"),
                          detection_judge=pl.when(covered).then(None).otherwise("detection_judge"))
            .drop("explanation"))


def with_llm(labels: pl.DataFrame, top: pl.DataFrame, sets: dict[int, DetectionSet], llm: dict[str, Any],
             cache: str | None) -> pl.DataFrame:
    """LLM labels for every live concept without an imported explanation, and the LLM judge's detection score
    for every live label (delphi's protocol; answers cached, so a rerun resumes)."""
    from competency_gaps.labellers import ContextText, LabellerConfig, explain_concepts, judge_detection_many, make_completer

    config = LabellerConfig.from_mapping({**llm, "cache": cache})
    complete = make_completer(config)
    to_explain = labels.filter(pl.col("live") & (pl.col("label_source") != "neuronpedia"))["concept"].to_list()
    examples = {c: [ContextText(row["tokens"], row["activations"]) for row in group.iter_rows(named=True)]
                for (c,), group in top.filter(pl.col("concept").is_in(to_explain)).sort("concept", "activation", descending=[False, True])
                .group_by("concept", maintain_order=True)}
    explained = explain_concepts(examples, complete, config)
    current = dict(labels.select("concept", "label").iter_rows())
    current.update(explained)
    judged = {c: (current[c], sets[c][0]) for c in labels.filter("live")["concept"].to_list() if sets[c][0]}
    verdicts = judge_detection_many(judged, complete, config)
    scores = {c: detection_score(verdicts[c], sets[c][1]) for c in verdicts}
    update = pl.DataFrame({"concept": list(current), "new_label": list(current.values())},
                          schema={"concept": pl.Int32, "new_label": pl.String})
    llm_scores = pl.DataFrame({"concept": list(scores), "llm_score": list(scores.values())},
                              schema={"concept": pl.Int32, "llm_score": pl.Float64})
    is_llm = pl.col("concept").is_in(list(explained))
    return (labels.join(update, on="concept", how="left").join(llm_scores, on="concept", how="left")
            .with_columns(label=pl.col("new_label"),
                          label_source=pl.when(is_llm).then(pl.lit("llm")).otherwise("label_source"),
                          detection_score=pl.when(pl.col("llm_score").is_not_null()).then("llm_score").otherwise("detection_score"),
                          detection_judge=pl.when(pl.col("llm_score").is_not_null()).then(pl.lit("llm")).otherwise("detection_judge"))
            .drop("new_label", "llm_score"))


# ---------------------------------------------------------------- cards


def _split_space(text: str) -> tuple[str, str, str]:
    """Leading whitespace, the rest without trailing whitespace, and the trailing whitespace."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = text.index(core)
    return text[:start], core, text[start + len(core):]


def _highlighted(tokens: list[str], activations: list[float]) -> str:
    """A context as inert Markdown (`markdown_escape` on each token's text) with the active tokens in bold and
    their activation in brackets; a token's surrounding whitespace stays outside the bold, which Markdown needs
    to render it, and line breaks show as ⏎."""
    out = []
    for token, value in zip(tokens, activations):
        lead, core, trail = _split_space(token.replace("\n", "⏎"))
        text = markdown_escape(core)
        out.append(f"{lead}**{text}**[{value:.2g}]{trail}" if value > 0 and text else f"{lead}{text}{trail}")
    return "".join(out)


def _token_list(tokens: list[str], n: int = 8) -> str:
    return ", ".join(markdown_escape(repr(token)) for token in tokens[:n])


def concept_cards(labels: pl.DataFrame, top: pl.DataFrame, title: str) -> str:
    """One Markdown card per live concept: label, detection score, vocabulary views, its strongest contexts."""
    strongest_first = top.sort(["concept", "activation"], descending=[False, True])
    by_concept = {c: g for (c,), g in strongest_first.group_by("concept", maintain_order=True)}
    cards = [f"# {title}\n", "Active tokens in **bold** with their activation; ⏎ is a line break.\n"]
    for row in labels.filter("live").iter_rows(named=True):
        concept = row["concept"]
        score = row["detection_score"]
        lines = [f'<a id="concept-{concept}"></a>', f"## {concept_markdown(concept, {concept: row['label']}, limit=None)}", "",
                 f"- detection score ({row['detection_judge']} judge, {row['n_detection']} contexts): "
                 f"{'N/A' if score is None or math.isnan(score) else f'{score:.2f}'}; max activation {row['max_activation']:.3g}",
                 f"- fires on: {_token_list(row['firing_tokens'])}",
                 f"- promotes: {_token_list(row['promoted_tokens'])}",
                 f"- suppresses: {_token_list(row['suppressed_tokens'])}", ""]
        contexts = by_concept.get(concept)
        for context in (contexts.head(CARD_CONTEXTS).iter_rows(named=True) if contexts is not None else []):
            where = markdown_escape(context["source"] if context["item_id"] is None else f"{context['source']} {context['item_id']}")
            lines.append(f"1. ({where}, {context['activation']:.3g}) {_highlighted(context['tokens'], context['activations'])}")
        cards.append("\n".join(lines) + "\n")
    return "\n".join(cards)


# ---------------------------------------------------------------- the stage


@dataclass
class Collected:
    """What the corpus pass keeps: top contexts, the activating sample (held out) and the negative pool."""

    top: TopContexts
    sample: TopContexts
    pool: NegativePool


def collect_corpus_contexts(model: Any, tokenizer: Any, sae: Any, layer: int, corpus_path: str, spec: dict[str, Any],
                            batch_tokens: int) -> Collected:
    """Stream `labels.corpus_tokens` tokens of the SAE corpus through the model and SAE into the accumulators."""
    labels_spec = spec["labels"]
    window = (labels_spec["before"], labels_spec["after"])
    n_concepts, k = sae.cfg.d_sae, labels_spec["top_k"]
    # The sample holds k more than it needs: those also among the top contexts are not held out.
    collected = Collected(TopContexts(n_concepts, k, *window),
                          TopContexts(n_concepts, labels_spec["n_detection"] + k, *window, sample_seed=labels_spec["seed"]),
                          NegativePool(labels_spec["negative_pool"], *window, seed=labels_spec["seed"]))
    prompts = corpus_prompts(tokenizer, corpus_path, spec["context_length"], labels_spec["corpus_tokens"], labels_spec["seed"])
    for _ in read_prompts(model, sae, layer, prompts, tokenizer.pad_token_id, batch_tokens,
                          [collected.top, collected.sample], collected.pool, what="corpus contexts"):
        pass
    return collected


def corpus_context_frame(collected: Collected, text: TokenText) -> pl.DataFrame:
    """The corpus pass's top contexts and activating sample as CONTEXTS rows (kind top, then sample)."""
    return pl.concat([context_frame(collected.top.result(), "top", "corpus", None, text),
                      context_frame(collected.sample.result(), "sample", "corpus", None, text)])


def run_corpus_contexts(model: Any, tokenizer: Any, sae: Any, layer: int, corpus_path: str, spec: dict[str, Any],
                        contexts_path: Path, pool_path: Path, *, batch_tokens: int = BATCH_TOKENS) -> None:
    """The corpus pass of the labels stage, a job of its own: it reads the SAE corpus only, so it runs once the SAE
    is trained and a new benchmark does not rerun it. Writes the corpus's top contexts and the activating sample
    (CONTEXTS rows, kind top / sample) and the negative pool (its tensors, for `NegativePool.from_result`)."""
    from safetensors.torch import save_file

    collected = collect_corpus_contexts(model, tokenizer, sae, layer, corpus_path, spec, batch_tokens)
    contexts = corpus_context_frame(collected, TokenText(tokenizer))
    write_parquet(contexts.to_arrow(), contexts_path, CONTEXTS)
    with atomic_path(pool_path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in collected.pool.result().items()}, str(temporary))
    top = int((contexts["kind"] == "top").sum())
    log.info("corpus contexts: %d top and %d sampled, %d pooled windows", top, contexts.height - top, len(collected.pool))


def read_negative_pool(path: str | Path, labels_spec: dict[str, Any]) -> NegativePool:
    """The negative pool the corpus pass saved, as it was."""
    from safetensors.torch import load_file

    return NegativePool.from_result(load_file(str(path)), labels_spec["negative_pool"], labels_spec["before"],
                                    labels_spec["seed"])


def context_tables(corpus_contexts: pl.DataFrame, benchmark_contexts: list[str], k: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Top contexts (the corpus's k and the benchmarks' k best, per concept) and the activating sample."""
    bench_top = best_per_concept([pl.read_parquet(path) for path in benchmark_contexts], k)
    corpus_top = corpus_contexts.filter(pl.col("kind") == "top")
    return pl.concat([corpus_top, bench_top]), corpus_contexts.filter(pl.col("kind") == "sample")


def label_concepts(model: Any, sae: Any, top: pl.DataFrame, sample: pl.DataFrame, pool: NegativePool, text: TokenText,
                   spec: dict[str, Any], llm_cache: str | None = None) -> pl.DataFrame:
    """The LABELS table: heuristic labels scored by the lexical judge, then imported and LLM labels if configured."""
    labels_spec = spec["labels"]
    promoted, suppressed = vocabulary_views(model, sae, labels_spec["n_tokens"])
    sets = detection_sets(sorted(set(top["concept"].to_list())), heldout_samples(sample, top), pool, text,
                          labels_spec["n_detection"])
    labels = label_frame(sae.cfg.d_sae, top, promoted, suppressed, sets, text, labels_spec["n_tokens"])
    labels = with_neuronpedia(labels, spec.get("neuronpedia"))
    if labels_spec.get("llm"):
        labels = with_llm(labels, top, sets, labels_spec["llm"], llm_cache)
    return labels


def run_labels(model: Any, tokenizer: Any, sae: Any, corpus_contexts: str | Path, negative_pool: str | Path,
               benchmark_contexts: list[str], spec: dict[str, Any], out_dir: Path, title: str, *,
               llm_cache: str | None = None) -> pl.DataFrame:
    """Write labels.parquet, contexts.parquet, concept_cards.md and label_quality.json for one (model, layer), from
    the corpus pass's outputs (`run_corpus_contexts`) and the benchmarks' top contexts (extraction's)."""
    text = TokenText(tokenizer)
    top, sample = context_tables(pl.read_parquet(corpus_contexts), benchmark_contexts, spec["labels"]["top_k"])
    pool = read_negative_pool(negative_pool, spec["labels"])
    labels = label_concepts(model, sae, top, sample, pool, text, spec, llm_cache)
    quality = label_quality(labels)
    write_parquet(labels.to_arrow(), out_dir / "labels.parquet", LABELS)
    write_parquet(pl.concat([top, sample]).to_arrow(), out_dir / "contexts.parquet", CONTEXTS)
    write_text(concept_cards(labels, top, title), out_dir / "concept_cards.md")
    write_json(quality, out_dir / "label_quality.json")
    log.info("labelled %d live concepts of %d; detection scores %s", quality["live"], quality["concepts"], quality["by_source"])
    return labels


def label_quality(labels: pl.DataFrame) -> dict[str, Any]:
    """Live concepts and the mean detection score per label source (NaN scores left out, counted)."""
    live = labels.filter("live")
    by_source = {}
    for (source,), group in live.group_by("label_source", maintain_order=True):
        scored = group.filter(pl.col("detection_score").is_not_nan())
        by_source[source] = {"concepts": group.height, "scored": scored.height,
                             "mean_detection_score": scored["detection_score"].mean() if scored.height else None}
    return {"concepts": labels.height, "live": live.height, "by_source": by_source}
