"""SAE stage: activation collection, the streamed training data (corpus rows and chat-formatted documents),
streamed evaluation (held-out corpus rows, benchmark prompts), TopK training with sae-lens, fetching
pretrained/local SAEs, and the layer/width checks. All offline, on CPU, in seconds."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from competency_gaps import sae as sae_module
from competency_gaps.extract import run_extract
from competency_gaps.prompts import EncodedPrompt, encode_item
from competency_gaps.sae import (
    SAEEvaluation,
    batches_forever,
    chat_prompts,
    check_sae_fits,
    collect_activations,
    evaluate_sae,
    evaluate_stream,
    fetch_sae,
    hook_name,
    interleave,
    layer_of_hook,
    load_sae,
    prompt_activations,
    rechunked,
    row_activations,
    run_sae_quality,
    sae_quality,
    token_chunks,
    tokenize_corpus,
    train_sae_for_layer,
    training_data,
    train_topk_sae,
)
from conftest import D_MODEL, D_SAE, N_LAYERS, REPO, save_random_sae

CPU = torch.device("cpu")
DOCS = ["Janet has 3 apples and buys 5 more.", "How many apples does she have?", "Answer: 8", "yes no true false"]


# ---------------------------------------------------------------- token_chunks


def test_token_chunks_joins_documents_with_eos_and_drops_the_remainder(tiny_model):
    _, tokenizer = tiny_model
    context_length = 7
    stream: list[int] = []
    for text in DOCS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.eos_token_id not in ids
        stream += ids + [tokenizer.eos_token_id]
    assert len(stream) % context_length != 0, "pick a length that leaves a remainder"

    chunks = token_chunks(tokenizer, DOCS, context_length)

    n_rows = len(stream) // context_length
    assert chunks.shape == (n_rows, context_length)
    assert chunks.dtype == torch.long
    assert chunks.flatten().tolist() == stream[: n_rows * context_length]  # in order, remainder dropped
    # every document but the ones cut off is followed by exactly one EOS
    assert chunks.flatten().tolist().count(tokenizer.eos_token_id) == stream[: n_rows * context_length].count(tokenizer.eos_token_id)


def test_tokenize_corpus_gives_each_token_its_document(tiny_model):
    _, tokenizer = tiny_model
    rows, documents = tokenize_corpus(tokenizer, DOCS, 5)
    assert torch.equal(rows, token_chunks(tokenizer, DOCS, 5))
    assert documents.shape == rows.shape and documents.dtype == torch.int32
    expected = [i for i, text in enumerate(DOCS) for _ in range(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)]
    assert documents.flatten().tolist() == expected[: rows.numel()]  # each document's EOS is its own


def test_token_chunks_of_a_corpus_shorter_than_one_row_is_empty_but_integer(tiny_model):
    _, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, ["yes"], 64)
    assert chunks.shape == (0, 64)
    assert chunks.dtype == torch.long


# ---------------------------------------------------------------- collect_activations


def test_collect_activations_matches_hidden_states_without_position_zero(tiny_model):
    model, tokenizer = tiny_model
    layer, context_length = 1, 6
    chunks = token_chunks(tokenizer, DOCS * 3, context_length)
    n_vectors = 23  # not a multiple of the 5 vectors per row: the last row is cut
    n_rows = -(-n_vectors // (context_length - 1))
    assert chunks.shape[0] > n_rows, "more rows than needed, so the extra ones must be ignored"

    acts = collect_activations(model, layer, chunks, n_vectors, batch_size=2, device=CPU)

    with torch.no_grad():
        hidden = model(input_ids=chunks[:n_rows], attention_mask=torch.ones_like(chunks[:n_rows]),
                       output_hidden_states=True).hidden_states[layer + 1]
    expected = hidden[:, 1:].reshape(-1, D_MODEL)[:n_vectors]
    assert acts.shape == (n_vectors, D_MODEL)
    assert acts.dtype == torch.float32
    torch.testing.assert_close(acts, expected)


def test_collect_activations_reads_the_requested_layer(tiny_model):
    model, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, DOCS * 3, 6)
    one, two = (collect_activations(model, layer, chunks, 10, 4, CPU) for layer in (1, 2))
    assert not torch.allclose(one, two)


def test_collect_activations_fails_clearly_when_the_corpus_is_too_small(tiny_model):
    model, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, DOCS, 6)
    available = chunks.shape[0] * 5
    assert collect_activations(model, 1, chunks, available, 4, CPU).shape[0] == available  # exactly enough is fine
    with pytest.raises(ValueError, match=rf"corpus too small: {available} tokens, {available + 1} needed"):
        collect_activations(model, 1, chunks, available + 1, 4, CPU)


def test_row_activations_stream_the_same_vectors_in_row_batches(tiny_model):
    model, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, DOCS * 3, 6)
    parts = list(row_activations(model, 1, chunks, 23, batch_size=2, device=CPU))
    assert [len(part) for part in parts] == [10, 10, 3]  # 2 rows of 5 vectors per chunk, the last one cut
    torch.testing.assert_close(torch.cat(parts), collect_activations(model, 1, chunks, 23, 4, CPU))
    with pytest.raises(ValueError, match="corpus too small"):  # checked before the first forward pass
        row_activations(model, 1, chunks[:2], 11, 2, CPU)


def test_drop_massive_leaves_out_attention_sink_norms_only():
    x = torch.ones(50, 4)
    x[7] *= 11  # 11x the median norm: an attention-sink outlier
    x[9] *= 9  # 9x: large, but under the ratio of 10, so kept
    kept, dropped = sae_module.drop_massive(x)
    assert dropped == 1
    assert kept.shape == (49, 4)
    assert kept.norm(dim=1).max() == x[9].norm()


def test_row_activations_replace_massive_vectors_from_the_next_row(tiny_model, monkeypatch):
    """A massive activation is left out and counted, and the stream reads on so that it still gives exactly
    n_vectors; without spare rows it says the corpus is too small."""
    model, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, DOCS * 3, 6)  # 5 vectors per row
    real = sae_module.residual_stream

    def with_a_sink(model, layer, ids, mask):  # the second vector of every batch's first row: 100x its norm
        resid = real(model, layer, ids, mask).clone()
        resid[0, 2] *= 100
        return resid

    monkeypatch.setattr(sae_module, "residual_stream", with_a_sink)
    dropped: dict[str, int] = {}
    parts = list(row_activations(model, 1, chunks, 10, batch_size=2, device=CPU, dropped=dropped))
    assert [len(part) for part in parts] == [9, 1]  # 2 rows gave 9 vectors, a third row the tenth
    assert dropped == {"massive": 2}  # one in each batch: rows 0 and 2
    monkeypatch.setattr(sae_module, "residual_stream", real)
    plain = collect_activations(model, 1, chunks, 15, 4, CPU)
    torch.testing.assert_close(torch.cat(parts), torch.cat([plain[:1], plain[2:11]]))
    monkeypatch.setattr(sae_module, "residual_stream", with_a_sink)
    with pytest.raises(ValueError, match="once 2 massive activations are left out"):
        list(row_activations(model, 1, chunks[:2], 10, batch_size=1, device=CPU))


def test_prompt_activations_read_the_counted_tokens(tiny_model):
    model, tokenizer = tiny_model
    prompts = [EncodedPrompt(tokenizer(text)["input_ids"], [i % 2 == 1 for i in range(len(tokenizer(text)["input_ids"]))])
               for text in DOCS]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        expected.append(hidden[0, torch.tensor(prompt.counted)])
    expected_ND = torch.cat(expected)
    for batch_tokens in (1, 40, 10_000):  # one prompt per batch, a few, all together (right-padded)
        got = torch.cat(list(prompt_activations(model, 1, prompts, batch_tokens=batch_tokens)))
        assert got.shape == expected_ND.shape
        # the same multiset of vectors, whatever the batching (batches are length-sorted)
        torch.testing.assert_close(got[got[:, 0].argsort()], expected_ND[expected_ND[:, 0].argsort()], rtol=1e-4, atol=1e-5)
    cut = list(prompt_activations(model, 1, prompts, batch_tokens=10_000, n_vectors=7))
    assert sum(len(part) for part in cut) == 7


def test_chat_rows_count_only_the_documents_own_tokens(tiny_model):
    _, tokenizer = tiny_model
    texts = ["Janet has 3 apples and buys 5 more.", "  ", "How many apples does she have?", "Answer: 8"]
    first = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    prompts, skipped = chat_prompts(tokenizer, texts, [0, 1, 2, 3], n_vectors=first + 1, context_length=64)
    assert skipped == 1  # the blank document
    assert len(prompts) == 2, "stops once the counted tokens reach n_vectors"
    assert sum(prompts[0].counted) == first
    specials = set(tokenizer.all_special_ids)
    for prompt, text in zip(prompts, [texts[0], texts[2]]):
        whole = encode_item(tokenizer, {"messages": [{"role": "user", "content": text}], "field_spans": []}, "content")
        # The prompt as extraction renders it, cut after the document: no later token changes its activations.
        assert prompt.input_ids == whole.input_ids[: len(prompt.input_ids)]
        assert tokenizer.decode(whole.input_ids[len(prompt.input_ids):]) == "<|im_end|>\n<|im_start|>assistant\n"
        counted_ids = [i for i, c in zip(prompt.input_ids, prompt.counted) if c]
        assert tokenizer.decode(counted_ids) == text  # exactly the document: no template, no system prompt
        assert not specials & set(counted_ids)
        assert not prompt.counted[0]
        rendered = tokenizer.decode(prompt.input_ids)
        assert rendered.startswith("<|im_start|>system\nYou are a helpful tiny assistant.<|im_end|>")  # the default system prompt...
        head = prompt.counted.index(True)
        assert tokenizer.decode(prompt.input_ids[:head]).endswith("<|im_start|>user\n")  # ...and header, uncounted
        assert prompt.counted[head:] == [True] * len(counted_ids)

    # A configured system prompt is not counted either; long documents are cut after context_length - 1 counted tokens.
    long_text = " ".join(["Janet has 3 apples and buys 5 more."] * 10)
    (prompt,), _ = chat_prompts(tokenizer, [long_text], [0], n_vectors=1, context_length=8, system_prompt="Be brief.")
    counted_ids = [i for i, c in zip(prompt.input_ids, prompt.counted) if c]
    assert len(counted_ids) == 7 and prompt.counted[-1]
    assert long_text.startswith(tokenizer.decode(counted_ids))
    assert "Be brief." in tokenizer.decode(prompt.input_ids) and "Be brief" not in tokenizer.decode(counted_ids)
    with pytest.raises(ValueError, match="corpus too small for chat-formatted training: 7 content tokens, 8 needed"):
        chat_prompts(tokenizer, [long_text], [0], n_vectors=8, context_length=8)


def test_interleave_keeps_each_producer_at_its_share():
    a = [torch.full((4, 1), 0.0)] * 10  # 40 vectors
    b = [torch.full((2, 1), 1.0)] * 5  # 10 vectors
    order = [int(chunk[0, 0]) for chunk in interleave([(a, 40), (b, 10), ([], 0)])]
    assert order.count(0) == 10 and order.count(1) == 5
    produced_b = [sum(2 for x in order[: i + 1] if x == 1) for i in range(len(order))]
    produced_a = [sum(4 for x in order[: i + 1] if x == 0) for i in range(len(order))]
    assert all(abs(pa / 40 - pb / 10) <= 0.2 + 1e-9 for pa, pb in zip(produced_a, produced_b))  # within one chunk


def test_rechunked_keeps_the_order_in_chunks_of_the_given_size():
    chunks = [torch.arange(n, dtype=torch.float32)[:, None] + 100 * i for i, n in enumerate([3, 7, 1, 0, 5])]
    out = list(rechunked(chunks, 4))
    assert [len(c) for c in out] == [4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(out), torch.cat(chunks), rtol=0, atol=0)
    assert [len(c) for c in rechunked(chunks, 6)] == [6, 6, 4] and not list(rechunked([], 4))


def test_the_training_stream_does_not_depend_on_the_tokens_per_forward_pass(tiny_model, corpus_parquet, monkeypatch):
    monkeypatch.setattr(sae_module, "STREAM_CHUNK", 50)  # several chunks of each producer to interleave
    model, tokenizer = tiny_model
    texts = pl.read_parquet(corpus_parquet)["text"].to_list()
    data = training_data(tokenizer, texts, {**LAYER_SPEC, "chat_fraction": 0.4}, CONTEXT_LENGTH)
    streams = {tokens: list(data.first_pass(model, 1, tokens, CPU)) for tokens in (CONTEXT_LENGTH, 5 * CONTEXT_LENGTH, 10_000)}
    reference = torch.cat(streams[CONTEXT_LENGTH])
    assert len(reference) == data.n_plain + data.n_chat
    for chunks in streams.values():
        # The same vectors in the same order (chat batches pad differently: float rounding at most).
        torch.testing.assert_close(torch.cat(chunks), reference, rtol=1e-4, atol=1e-5)
        assert [len(c) for c in chunks] == [len(c) for c in streams[CONTEXT_LENGTH]]


# ---------------------------------------------------------------- batches_forever


def ids_of(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def take(stream, n: int) -> list[list[int]]:
    return [ids_of(next(stream)) for _ in range(n)]


def test_batches_forever_each_epoch_is_a_permutation():
    acts = torch.arange(12, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i is all i
    stream = batches_forever(acts, 4, seed=0)
    epochs = [sum(take(stream, 3), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))  # every vector exactly once per epoch
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2], "reshuffled each epoch"
    assert epochs[0] != list(range(12)), "shuffled, not in order"
    batch = next(batches_forever(acts, 4, seed=0))
    assert batch.shape == (4, 3) and torch.equal(batch[:, 0], batch[:, 2])  # whole rows


def test_batches_forever_drops_the_partial_tail_batch():
    acts = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    stream = batches_forever(acts, 4, seed=1)
    seen: set[int] = set()
    for _ in range(20):
        epoch = take(stream, 2)  # 10 // 4 full batches per epoch
        assert all(len(batch) == 4 for batch in epoch)
        assert len(set(sum(epoch, []))) == 8  # no vector twice within an epoch
        seen |= set(sum(epoch, []))
    assert seen == set(range(10))  # the dropped tail differs between epochs


def test_batches_forever_is_deterministic_under_its_seed():
    acts = torch.arange(32, dtype=torch.float32).unsqueeze(1)
    first, again, other = (take(batches_forever(acts, 8, seed), 12) for seed in (0, 0, 1))
    assert first == again
    assert first != other


def test_batches_forever_rejects_fewer_vectors_than_one_batch():
    # It used to loop forever without yielding (the trainer then hung on its first batch).
    with pytest.raises(ValueError, match="3 activation vectors.*batch size 4"):
        next(batches_forever(torch.zeros(3, 2), 4, seed=0))


# ---------------------------------------------------------------- evaluate_sae


class SplitSignSAE:
    """A perfect autoencoder: latents relu(x) and relu(-x), decoded as their difference."""

    def __init__(self, d_in: int, zero_decoder: bool = False):
        self.cfg = SimpleNamespace(d_sae=2 * d_in)
        self.zero_decoder = zero_decoder

    def encode(self, x):
        return torch.cat([x.relu(), (-x).relu()], dim=1)

    def decode(self, f):
        d = f.shape[1] // 2
        return torch.zeros_like(f[:, :d]) if self.zero_decoder else f[:, :d] - f[:, d:]


ACTS = torch.tensor([
    [1.0, -2.0, 0.0],
    [3.0, 0.0, 0.0],
    [2.0, -1.0, 0.0],
    [0.5, 4.0, 0.0],
    [1.5, 0.0, 0.0],
])
# latents: +x0 +x1 +x2 -x0 -x1 -x2; fire counts per row: 2, 1, 2, 2, 1
# latents that fire at least once: +x0, +x1, -x1  -> 3 of 6 alive


@pytest.mark.parametrize("chunk", [4096, 2])
def test_evaluate_sae_on_a_perfect_autoencoder(chunk):
    result = evaluate_sae(SplitSignSAE(3), ACTS, chunk=chunk)
    assert result["explained_variance"] == pytest.approx(1.0) and result["mse"] == pytest.approx(0.0, abs=1e-12)
    assert result["l0"] == pytest.approx(8 / 5)
    assert result["dead_fraction"] == pytest.approx(3 / 6)
    assert result["heldout_tokens"] == 5


def test_evaluate_sae_with_a_zero_decoder():
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    # squared error = sum x^2 = 10; variance about the mean (2, 0) = 1 + 1 = 2; EV = 1 - 10 / 2
    result = evaluate_sae(SplitSignSAE(2, zero_decoder=True), acts, chunk=1)
    assert result["explained_variance"] == pytest.approx(-4.0)
    assert result["mse"] == pytest.approx(10 / 2)  # per vector: comparable across sets of unequal variance
    assert result["l0"] == pytest.approx(1.0)
    assert result["dead_fraction"] == pytest.approx(3 / 4)


def test_evaluate_sae_on_a_real_sae(random_sae_dirs):
    sae = load_sae(random_sae_dirs[1])
    acts = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(0))
    result = evaluate_sae(sae, acts, chunk=16)
    with torch.no_grad():
        features = sae.encode(acts)
        error = (acts - sae.decode(features)).pow(2).sum()
    assert result["explained_variance"] == pytest.approx(1 - (error / (acts - acts.mean(0)).pow(2).sum()).item(), rel=1e-5)
    assert result["l0"] == pytest.approx((features > 0).sum().item() / 50)
    assert result["dead_fraction"] == pytest.approx(1 - (features > 0).any(0).float().mean().item())


def in_memory_evaluation(sae, acts_ND):
    """The evaluation as it was before streaming: all held-out vectors in one tensor."""
    with torch.no_grad():
        features = sae.encode(acts_ND)
        error = (acts_ND - sae.decode(features)).pow(2).sum().item()
    return {"explained_variance": 1 - error / (acts_ND - acts_ND.mean(0)).pow(2).sum().item(),
            "l0": (features > 0).sum().item() / len(acts_ND),
            "dead_fraction": 1 - (features > 0).any(0).float().mean().item()}


def check_streamed_evaluation(sae, acts, tolerance):
    expected = in_memory_evaluation(sae, acts)
    uneven = acts.split([1, 300, 7, 450, len(acts) - 758])
    for chunks, chunk in ((uneven, 4096), (uneven, 64), ([acts], 5)):
        result = evaluate_stream(sae, chunks, chunk=chunk)
        assert result["tokens"] == len(acts)
        assert tolerance(result["explained_variance"], expected["explained_variance"])
        assert result["l0"] == pytest.approx(expected["l0"], abs=1e-9)
        assert result["dead_fraction"] == pytest.approx(expected["dead_fraction"], abs=1e-9)


def test_streamed_evaluation_equals_the_in_memory_one(trained_synthetic):
    trained, heldout = trained_synthetic
    acts = torch.cat([heldout, sparse_synthetic_acts(4000)[-500:]])  # 1000 vectors with a common mean
    check_streamed_evaluation(trained, acts, lambda got, want: abs(got - want) < 1e-5 and 0.2 < want < 1)


def test_streamed_evaluation_is_exact_under_a_large_mean(random_sae_dirs):
    # A random SAE explains nothing (EV about -7000 here): compare the unexplained fraction relatively.
    sae = load_sae(random_sae_dirs[1])
    acts = torch.randn(1000, D_MODEL, generator=torch.Generator().manual_seed(1)) * 3 + 50.0
    check_streamed_evaluation(sae, acts, lambda got, want: abs((1 - got) / (1 - want) - 1) < 1e-5)


def test_streamed_evaluation_of_nothing_has_no_metrics():
    assert SAEEvaluation().result() == {"explained_variance": None, "l0": None, "dead_fraction": None, "mse": None, "tokens": 0}


def test_extraction_measures_the_sae_on_exactly_the_counted_tokens(tiny_model, random_sae_dirs, tiny_item):
    from competency_gaps.concept_labels import read_prompts

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    prompts = [encode_item(tokenizer, tiny_item, mode) for mode in ("fields", "content", "all")]
    quality = SAEEvaluation()
    for _ in read_prompts(model, sae, 1, prompts, tokenizer.pad_token_id, 64, [], quality=quality):
        pass
    result = quality.result()
    counted = torch.cat(list(prompt_activations(model, 1, prompts, batch_tokens=10_000)))
    assert result["tokens"] == len(counted) == sum(sum(p.counted) for p in prompts)
    expected = in_memory_evaluation(sae, counted)  # dense codes; extraction decodes the sparse ones
    # A random SAE explains nothing (EV far below 0): compare the unexplained fraction relatively.
    assert (1 - result["explained_variance"]) == pytest.approx(1 - expected["explained_variance"], rel=1e-5)
    assert result["l0"] == pytest.approx(expected["l0"])
    assert result["dead_fraction"] == pytest.approx(expected["dead_fraction"])


def merged_result(*evaluations: SAEEvaluation) -> dict:
    merged = SAEEvaluation()
    for evaluation in evaluations:
        merged.add({"n": evaluation.n, "squared_error": evaluation.squared_error, "active": evaluation.active,
                    "fired": evaluation.fired, "mean": evaluation.mean, "m2": evaluation.m2})
    return merged.result()


def test_an_evaluation_survives_its_json_state():
    g = torch.Generator().manual_seed(0)
    first, second = SAEEvaluation(), SAEEvaluation()
    for evaluation, shift in ((first, 0.0), (second, 5.0)):
        x = torch.randn(50, 4, generator=g) + shift
        evaluation.add(evaluation.sparse_stats(x, x * 0.5, torch.tensor([1, 1, 3]), d_sae=6))
    restored = SAEEvaluation()
    for evaluation in (first, second):
        restored.add(SAEEvaluation.stats_of_state(json.loads(json.dumps(evaluation.state()))))
    assert restored.result()["tokens"] == 100
    assert restored.result()["explained_variance"] == pytest.approx(merged_result(first, second)["explained_variance"])
    assert restored.result()["dead_fraction"] == pytest.approx(4 / 6)  # concepts 1 and 3 fired
    assert restored.result()["l0"] == pytest.approx(6 / 100)


# ---------------------------------------------------------------- train_topk_sae


def sparse_synthetic_acts(n: int, d_in: int = 32, n_directions: int = 16, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Each vector a positive combination of `active` of a few random directions, plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d_in, generator=g)
    codes = torch.zeros(n, n_directions)
    chosen = torch.stack([torch.randperm(n_directions, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, chosen, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ directions + 0.5


TRAIN_SPEC = {"d_sae": 64, "k": 4, "training_tokens": 4000, "batch_size": 64, "lr": 3e-3, "heldout_tokens": 500, "seed": 0}


@pytest.fixture(scope="module")
def trained_synthetic():
    acts = sparse_synthetic_acts(3000)
    train, heldout = acts[:2500], acts[2500:]
    return train_topk_sae(train, TRAIN_SPEC, 2, "tiny-model", CPU), heldout


def test_train_topk_sae_learns_the_sparse_structure(trained_synthetic):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    trained, heldout = trained_synthetic
    result = evaluate_sae(trained, heldout)
    torch.manual_seed(0)
    fresh = evaluate_sae(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4)), heldout)
    assert result["explained_variance"] > 0.3
    assert result["explained_variance"] > fresh["explained_variance"] + 0.5
    assert TRAIN_SPEC["k"] - 0.5 <= result["l0"] <= TRAIN_SPEC["k"]
    assert result["dead_fraction"] < 0.5
    assert trained.cfg.metadata.hook_name == "blocks.2.hook_resid_post" == hook_name(2)
    assert trained.cfg.metadata.model_name == "tiny-model"
    assert (trained.cfg.d_in, trained.cfg.d_sae, trained.cfg.k) == (32, 64, 4)


def test_trained_sae_saves_and_loads_with_sae_lens(trained_synthetic, tmp_path):
    from sae_lens import SAE

    trained, heldout = trained_synthetic
    trained.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    # The activation-norm scaling is folded into the weights: the inference SAE reads raw activations.
    assert cfg["normalize_activations"] == "none"
    assert evaluate_sae(loaded, heldout) == pytest.approx(evaluate_sae(trained, heldout))


def test_train_topk_sae_on_a_stream_of_batches():
    acts = sparse_synthetic_acts(3000)
    train, heldout = acts[:2500], acts[2500:]
    pulled = []

    def stream():
        for batch in batches_forever(train, TRAIN_SPEC["batch_size"], 0):
            pulled.append(len(batch))
            yield batch

    trained = train_topk_sae(stream(), TRAIN_SPEC, 2, "tiny-model", CPU)
    # exactly training_tokens // batch_size batches: the norm scale comes from the first batches, not extra ones
    assert len(pulled) == TRAIN_SPEC["training_tokens"] // TRAIN_SPEC["batch_size"]
    assert evaluate_sae(trained, heldout)["explained_variance"] > 0.3


@pytest.mark.parametrize("autocast", [True, False])
def test_sae_lens_trains_with_and_without_bfloat16_autocast(autocast, monkeypatch):
    import sae_lens.config

    made = []
    trainer_config = sae_lens.config.SAETrainerConfig
    monkeypatch.setattr(sae_lens.config, "SAETrainerConfig", lambda **kwargs: made.append(trainer_config(**kwargs)) or made[-1])
    acts = sparse_synthetic_acts(3000)
    trained = train_topk_sae(acts[:2500], {**TRAIN_SPEC, "autocast": autocast}, 2, "tiny-model", CPU)
    assert made[0].autocast is autocast
    assert evaluate_sae(trained, acts[2500:])["explained_variance"] > 0.3
    assert trained.W_enc.dtype == torch.float32  # autocast leaves the weights in float32


@pytest.mark.parametrize(("capabilities", "expected"), [({"avx512_bf16": True}, True), ({"avx2": True}, False)])
def test_autocast_auto_follows_native_bfloat16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert sae_module.training_autocast({"autocast": "auto"}, CPU) is expected
    assert sae_module.training_autocast({}, CPU) is expected  # a spec without the key: the default, auto
    assert sae_module.training_autocast({"autocast": False}, CPU) is False


def test_train_topk_sae_rejects_a_batch_larger_than_the_training_budget():
    # It used to die inside sae-lens with "ZeroDivisionError: float division by zero" (zero training steps).
    spec = {**TRAIN_SPEC, "training_tokens": 1000, "batch_size": 2000}
    with pytest.raises(ValueError, match=r"training_tokens=1000 is less than one batch \(batch_size=2000\)"):
        train_topk_sae(torch.randn(1000, 32), spec, 2, "m", CPU)


# ---------------------------------------------------------------- train_sae_for_layer


LAYER_SPEC = {"d_sae": D_SAE, "k": 4, "training_tokens": 1000, "batch_size": 50, "lr": 3e-3, "heldout_tokens": 200, "seed": 3}
CONTEXT_LENGTH = 16


@pytest.fixture(scope="module")
def corpus_parquet(tmp_path_factory) -> Path:
    texts = [f"Janet has {i} apples and buys {i % 7} more. Answer: {i + i % 7}" for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    pl.DataFrame({"text": texts}).write_parquet(path)
    return path


def run_layer_training(tiny_model, corpus_parquet, out_dir: Path, spec=LAYER_SPEC, **kwargs) -> dict:
    model, tokenizer = tiny_model
    return train_sae_for_layer(model, tokenizer, 1, spec, corpus_parquet, CONTEXT_LENGTH, "tiny", out_dir, CPU, batch_tokens=8 * CONTEXT_LENGTH,
                               **kwargs)


def test_train_sae_for_layer_writes_sae_and_heldout_summary(tiny_model, corpus_parquet, tmp_path):
    out_dir = tmp_path / "sae"
    summary = run_layer_training(tiny_model, corpus_parquet, out_dir)

    assert {"cfg.json", "sae_weights.safetensors", "summary.json"} <= {p.name for p in out_dir.iterdir()}
    written = json.loads((out_dir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["heldout_tokens"] == LAYER_SPEC["heldout_tokens"]
    assert written["training_tokens"] == LAYER_SPEC["training_tokens"]
    assert written["corpus_documents"] == 300
    assert (written["layer"], written["hook_name"], written["d_in"], written["d_sae"]) == (1, "blocks.1.hook_resid_post", D_MODEL, D_SAE)
    assert written["source"] == {"train": LAYER_SPEC}
    assert 0.0 < written["explained_variance"] <= 1.0  # 0.14 on this random tiny model; above the mean predictor
    assert 0 < written["l0"] <= LAYER_SPEC["k"]
    assert 0.0 <= written["dead_fraction"] < 1.0

    sae = load_sae(out_dir)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    check_sae_fits(sae, 1, D_MODEL, "trained")

    # The summary is measured on the last rows of the seeded row order, which training never reads.
    model, tokenizer = tiny_model
    chunks = token_chunks(tokenizer, pl.read_parquet(corpus_parquet)["text"].to_list(), CONTEXT_LENGTH)
    chunks = chunks[torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(LAYER_SPEC["seed"]))]
    heldout_rows = math.ceil(200 / (CONTEXT_LENGTH - 1)) + 1  # one spare row, for left-out massive activations
    acts = collect_activations(model, 1, chunks[-heldout_rows:], 200, 8, CPU)
    expected = in_memory_evaluation(sae, acts)
    assert abs(written["explained_variance"] - expected["explained_variance"]) < 1e-5
    assert written["l0"] == pytest.approx(expected["l0"])
    assert written["dead_fraction"] == pytest.approx(expected["dead_fraction"])

    # Half the training vectors come from chat-formatted documents; one pass of the producer feeds training.
    stream = written["stream"]
    assert stream["corpus_tokens"] == stream["chat_tokens"] == 500
    assert stream["corpus_rows"] == math.ceil(500 / (CONTEXT_LENGTH - 1)) and stream["heldout_rows"] == heldout_rows
    assert stream["corpus_rows"] + heldout_rows <= chunks.shape[0]
    assert stream["chat_documents"] > 0 and stream["passes"] == 1
    assert stream["buffer_vectors"] == 1000 and stream["buffer_on_disk"] is False  # capped at training_tokens
    assert stream["massive_dropped"] == {"train": 0, "heldout": 0}  # a random tiny model has no attention sinks
    assert "benchmarks" not in written


def test_train_sae_for_layer_is_deterministic(tiny_model, corpus_parquet, tmp_path):
    first = run_layer_training(tiny_model, corpus_parquet, tmp_path / "a")
    torch.manual_seed(12345)  # global RNG state must not matter
    second = run_layer_training(tiny_model, corpus_parquet, tmp_path / "b")
    a, b = (load_file(tmp_path / name / "sae_weights.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert first == second
    third = run_layer_training(tiny_model, corpus_parquet, tmp_path / "c", {**LAYER_SPEC, "seed": 4})
    c = load_file(tmp_path / "c" / "sae_weights.safetensors")
    assert not torch.equal(a["W_dec"], c["W_dec"])
    assert third["heldout_tokens"] == first["heldout_tokens"]


def test_chat_documents_never_touch_the_heldout_rows(tiny_model, corpus_parquet, tmp_path, monkeypatch):
    seen = {}
    original = sae_module.chat_prompts

    def spy(tokenizer, texts, documents, *args, **kwargs):
        seen["documents"] = list(documents)
        prompts, skipped = original(tokenizer, texts, seen["documents"], *args, **kwargs)
        seen["used"] = len(prompts) + skipped
        return prompts, skipped

    monkeypatch.setattr(sae_module, "chat_prompts", spy)
    spec = {**LAYER_SPEC, "chat_fraction": 0.3}
    summary = run_layer_training(tiny_model, corpus_parquet, tmp_path / "sae", spec, system_prompt="Be brief.")

    _, tokenizer = tiny_model
    rows, documents = tokenize_corpus(tokenizer, pl.read_parquet(corpus_parquet)["text"].to_list(), CONTEXT_LENGTH)
    documents = documents[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(LAYER_SPEC["seed"]))]
    heldout_docs = set(documents[-summary["stream"]["heldout_rows"]:].flatten().tolist())
    plain_docs = set(documents[: summary["stream"]["corpus_rows"]].flatten().tolist())
    assert heldout_docs and not heldout_docs & set(seen["documents"])
    assert not plain_docs & set(seen["documents"][: seen["used"]]), "documents the corpus rows read come last"
    assert summary["stream"]["chat_tokens"] == 300 and summary["stream"]["corpus_tokens"] == 700


def test_train_sae_for_layer_with_a_small_buffer(tiny_model, corpus_parquet, tmp_path):
    spec = {**LAYER_SPEC, "buffer_vectors": 100, "chat_fraction": 0.0}
    summary = run_layer_training(tiny_model, corpus_parquet, tmp_path / "sae", spec)
    assert summary["stream"]["buffer_vectors"] == 100 and summary["stream"]["chat_tokens"] == 0
    assert summary["stream"]["chat_documents"] == 0 and summary["stream"]["passes"] == 1
    assert 0.0 < summary["explained_variance"] <= 1.0


def test_sae_quality_merges_what_each_extract_job_measured(tiny_model, random_sae_dirs, tiny_item, tmp_path):
    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    fits, prompts = [], {}
    for name, n in (("tiny", 3), ("other", 1)):
        folder = tmp_path / f"benchmark={name}"
        folder.mkdir()
        items = [{**tiny_item, "item_id": f"{name}{i}"} for i in range(n)]
        pl.DataFrame(items).write_parquet(folder / "items.parquet")
        run_extract(model, tokenizer, sae, 1, str(folder / "items.parquet"), None, str(folder / "saliency.parquet"),
                    str(folder / "item_tokens.parquet"), str(folder / "contexts.parquet"),
                    {"max_length": 1024, "system_prompt": "Be brief."}, {"context_policy": "truncate"},
                    {"tokens": "fields", "include_response": False}, {"top_k": 2, "before": 2, "after": 1}, name,
                    batch_tokens=64, sae_fit_path=str(folder / "sae_fit.json"))
        fits.append(folder / "sae_fit.json")
        prompts[name] = [encode_item(tokenizer, item, "fields", "Be brief.", None, 1024) for item in items]
    corpus = {"explained_variance": 0.5, "l0": 3.0, "dead_fraction": 0.1, "mse": 2.0, "heldout_tokens": 200}
    (tmp_path / "summary.json").write_text(json.dumps({"source": {"train": {}}, "layer": 1, **corpus}))
    quality = run_sae_quality(fits, tmp_path / "summary.json", tmp_path / "quality.json", 1)
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written == json.loads(json.dumps(quality))
    assert written["corpus"] == corpus and written["layer"] == 1
    assert set(written["benchmarks"]) == {"tiny", "other", "all"}
    assert written["benchmarks"]["tiny"]["prompts"] == 3 and written["benchmarks"]["all"]["prompts"] == 4
    # Pooled over both benchmarks: the same figures as one evaluation of all their counted tokens.
    counted = torch.cat(list(prompt_activations(model, 1, prompts["tiny"] + prompts["other"], batch_tokens=10_000)))
    expected = in_memory_evaluation(sae, counted)
    pooled = written["benchmarks"]["all"]
    assert pooled["tokens"] == len(counted)
    assert (1 - pooled["explained_variance"]) == pytest.approx(1 - expected["explained_variance"], rel=1e-5)
    assert pooled["dead_fraction"] == pytest.approx(expected["dead_fraction"])
    # An SAE trained elsewhere has no held-out corpus figures.
    assert sae_quality(fits[:1], {"source": {"path": "x"}}, 1)["corpus"] is None


def test_train_sae_for_layer_with_the_buffer_on_disk(tiny_model, corpus_parquet, tmp_path):
    buffer_dir = tmp_path / "buffers"
    buffer_dir.mkdir()
    ram = run_layer_training(tiny_model, corpus_parquet, tmp_path / "ram")
    disk = run_layer_training(tiny_model, corpus_parquet, tmp_path / "disk", {**LAYER_SPEC, "buffer_max_ram_mb": 0},
                              buffer_dir=buffer_dir)
    assert disk["stream"]["buffer_on_disk"] is True and ram["stream"]["buffer_on_disk"] is False
    assert not list(buffer_dir.iterdir()), "the memory-mapped file is removed after training"
    # The same vectors in the same order, rounded to float16: nearly the same SAE.
    assert disk["explained_variance"] == pytest.approx(ram["explained_variance"], abs=0.02)


def test_further_epochs_replay_the_first_pass_without_the_model(tiny_model, corpus_parquet, tmp_path, monkeypatch):
    """epochs=2: the model reads half the training tokens once (one producer call each for corpus rows and chat
    documents, one more for the held-out rows) and the second epoch comes from the replay cache."""
    calls = {"rows": 0, "prompts": 0}
    rows_of, prompts_of = sae_module.row_activations, sae_module.prompt_activations

    def count(name, real):
        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return spy

    monkeypatch.setattr(sae_module, "row_activations", count("rows", rows_of))
    monkeypatch.setattr(sae_module, "prompt_activations", count("prompts", prompts_of))
    buffer_dir = tmp_path / "buffers"
    buffer_dir.mkdir()
    spec = {**LAYER_SPEC, "epochs": 2, "buffer_max_ram_mb": 0}  # the cache (and the buffer) on disk
    summary = run_layer_training(tiny_model, corpus_parquet, tmp_path / "sae", spec, buffer_dir=buffer_dir)
    stream = summary["stream"]
    assert stream["read_tokens"] == stream["corpus_tokens"] + stream["chat_tokens"] == 500
    assert (stream["epochs"], stream["passes"], stream["replayed_passes"]) == (2, 2, 1)
    assert stream["trained_vectors"] == LAYER_SPEC["training_tokens"] and stream["replay_on_disk"] is True
    assert calls == {"rows": 2, "prompts": 1}  # training's corpus rows, the held-out rows; the chat documents
    assert not list(buffer_dir.iterdir()), "the cache's file is removed after training"
    assert 0.0 < summary["explained_variance"] <= 1.0


def test_train_sae_for_layer_fails_clearly_when_the_corpus_is_too_small(tiny_model, corpus_parquet, tmp_path):
    spec = {**LAYER_SPEC, "training_tokens": 100_000}
    with pytest.raises(ValueError, match=r"corpus too small: \d+ rows of 16 tokens, \d+ training \+ 15 held-out rows needed"):
        run_layer_training(tiny_model, corpus_parquet, tmp_path / "sae", spec)


def test_importing_the_sae_module_leaves_sae_lens_and_polars_unloaded():
    code = "import sys, competency_gaps.sae; print(sorted(m for m in ('sae_lens', 'polars', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- fetch_sae


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "sae_weights.safetensors")


def test_fetch_sae_copies_a_local_sae(random_sae_dirs, tmp_path):
    source = {"path": str(random_sae_dirs[2])}
    out_dir = tmp_path / "out" / "sae"
    fetch_sae(source, out_dir)

    original, copied = weights(random_sae_dirs[2]), weights(out_dir)
    assert original.keys() == copied.keys()
    for key in original:
        torch.testing.assert_close(copied[key], original[key])
    assert load_sae(out_dir).cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary == {"source": source, "d_in": D_MODEL, "d_sae": D_SAE, "hook_name": "blocks.2.hook_resid_post"}


def test_fetch_sae_from_the_registry_asks_for_release_and_id(monkeypatch, tmp_path):
    from sae_lens import SAE

    random_dir = save_random_sae(tmp_path / "random", layer=3, d_sae=48, seed=7)
    calls = []

    def fake_from_pretrained(*args, **kwargs):
        calls.append((args, kwargs))
        return SAE.load_from_disk(str(random_dir), device="cpu")

    monkeypatch.setattr(SAE, "from_pretrained", fake_from_pretrained)
    source = {"release": "some-release-res", "id": "layer_3/width_48/canonical"}
    out_dir = tmp_path / "sae"
    fetch_sae(source, out_dir)

    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == ("some-release-res", "layer_3/width_48/canonical")
    assert kwargs.get("device") == "cpu"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary == {"source": source, "d_in": D_MODEL, "d_sae": 48, "hook_name": "blocks.3.hook_resid_post"}
    for key, value in weights(random_dir).items():
        torch.testing.assert_close(weights(out_dir)[key], value)
    assert load_sae(out_dir).cfg.d_sae == 48


# ---------------------------------------------------------------- layer_of_hook / check_sae_fits


@pytest.mark.parametrize(("name", "layer"), [
    ("blocks.3.hook_resid_post", 3),
    ("blocks.12.hook_resid_post", 12),
    ("blocks.3.hook_resid_pre", 2),  # resid_pre of L is the output of L-1
    ("blocks.0.hook_resid_pre", -1),  # the embeddings: no decoder layer
    ("model.blocks.5.hook_resid_post", 5),
    ("blocks.3.hook_resid_mid", None),
    ("blocks.3.hook_mlp_out", None),
    ("blocks.3.hook_resid_post.hook_sae_acts_post", None),
    ("model.layers.3", None),
    ("", None),
    (None, None),
])
def test_layer_of_hook(name, layer):
    assert layer_of_hook(name) == layer


def test_hook_name_round_trips():
    assert all(layer_of_hook(hook_name(layer)) == layer for layer in range(N_LAYERS))


def test_check_sae_fits_accepts_the_matching_layer(random_sae_dirs):
    sae = load_sae(random_sae_dirs[2])
    check_sae_fits(sae, 2, D_MODEL, "here")
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_pre"  # the same residual stream, named from above
    check_sae_fits(sae, 2, D_MODEL, "here")


def test_check_sae_fits_rejects_another_width(random_sae_dirs):
    sae = load_sae(random_sae_dirs[1])
    with pytest.raises(ValueError, match=rf"^SAE in x: SAE width d_in={D_MODEL} does not match the model's residual width 48$"):
        check_sae_fits(sae, 1, 48, "SAE in x")


def test_check_sae_fits_rejects_another_layer(random_sae_dirs):
    sae = load_sae(random_sae_dirs[1])
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post \(output of layer 1\), config says layer 2"):
        check_sae_fits(sae, 2, D_MODEL, "where")
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    with pytest.raises(ValueError, match=r"output of layer 0\), config says layer 1"):
        check_sae_fits(sae, 1, D_MODEL, "where")


def test_check_sae_fits_warns_on_a_non_residual_hook(random_sae_dirs, caplog):
    sae = load_sae(random_sae_dirs[1])
    sae.cfg.metadata.hook_name = "blocks.1.hook_mlp_out"
    with caplog.at_level(logging.WARNING, logger=sae_module.__name__):
        check_sae_fits(sae, 3, D_MODEL, "where")
    assert "not a residual-stream hook" in caplog.text and "layer 3" in caplog.text



# ---------------------------------------------------------------- wiring: config -> job spec -> CLI -> training


def train_config(tiny_model_dir, corpus_parquet) -> dict:
    from competency_gaps.config import validate_config

    return validate_config({
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, "system_prompt": "Be brief.",
                            "layers": [{"layer": 1, "sae": {"train": {**LAYER_SPEC, "buffer_vectors": 300}}}]}},
        "benchmarks": {"b": {"adapter": "probe_arithmetic", "options": {"n": 2}}},
        "sae_corpus": {"sae_probes_package": None, "text_files": [str(corpus_parquet)], "context_length": CONTEXT_LENGTH},
        "device": "cpu",
    })


def run_cmd_sae(monkeypatch, tmp_path, config: dict, tiny_model_dir, corpus_parquet, *extra: str) -> dict:
    """`competency-gaps sae` as the rule runs it, with training replaced by a spy: what reaches the trainer."""
    from competency_gaps.cli import main
    from competency_gaps.workflow import spec_json

    seen = {}
    monkeypatch.setattr(sae_module, "train_sae_for_layer", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"load_from": str(tiny_model_dir)}))
    main(["sae", "--model", "tiny", "--layer", "1", "--spec", spec_json(config, "sae", model="tiny", layer=1),
          "--manifest", str(manifest), "--corpus", str(corpus_parquet), "--out-dir", str(tmp_path / "sae"), *extra])
    return seen


def test_the_training_settings_reach_the_trainer(monkeypatch, tmp_path, tiny_model_dir, corpus_parquet):
    config = train_config(tiny_model_dir, corpus_parquet)
    seen = run_cmd_sae(monkeypatch, tmp_path, config, tiny_model_dir, corpus_parquet, "--buffer-dir", str(tmp_path), "--mem-mb", "100000",
                       "--batch-tokens", "96")
    train, batch_tokens = seen["args"][3], seen["args"][9]
    assert batch_tokens == 96
    # The schema's defaults fill what the config leaves out; what it sets wins.
    assert train == {**LAYER_SPEC, "buffer_vectors": 300, "chat_fraction": 0.5, "buffer_max_ram_mb": 4096, "epochs": 1,
                     "autocast": "auto"}
    assert seen["kwargs"] == {"system_prompt": "Be brief.", "buffer_dir": str(tmp_path)}


@pytest.mark.parametrize("read_dtype", ["bfloat16", "float32"])
def test_the_model_reads_training_activations_in_read_dtype(monkeypatch, tmp_path, tiny_model_dir, corpus_parquet, read_dtype):
    config = train_config(tiny_model_dir, corpus_parquet)
    config["read_dtype"] = read_dtype
    model = run_cmd_sae(monkeypatch, tmp_path, config, tiny_model_dir, corpus_parquet, "--mem-mb", "100000")["args"][0]
    assert model.dtype == getattr(torch, read_dtype)


def test_a_training_job_over_its_memory_request_refuses_to_start(monkeypatch, tmp_path, tiny_model_dir, corpus_parquet):
    config = train_config(tiny_model_dir, corpus_parquet)
    with pytest.raises(MemoryError, match=r"SAE training needs about \d+ MB of host memory but was granted mem_mb=100"):
        run_cmd_sae(monkeypatch, tmp_path, config, tiny_model_dir, corpus_parquet, "--mem-mb", "100")
    assert not (tmp_path / "sae").exists()


def test_the_memory_request_follows_the_buffer_not_the_training_tokens():
    from competency_gaps.workflow import model_job_memory_mb, sae_buffer_vectors, sae_job_memory_mb

    smollm2, d_model = 134_515_008, 576
    train = {"d_sae": 4608, "training_tokens": 300_000, "heldout_tokens": 20_000, "batch_size": 256}
    base = model_job_memory_mb(smollm2, "cpu", "auto")
    request = sae_job_memory_mb(smollm2, d_model, train, "cpu", "auto")
    buffer_mb, sample_mb, sae_state_mb = 131072 * d_model * 4 / 2**20, 2 * 20000 * d_model * 4 / 2**20, 32 * d_model * 4608 / 2**20
    assert request == int(base + buffer_mb + sample_mb + sae_state_mb)
    assert sae_job_memory_mb(smollm2, d_model, {**train, "training_tokens": 10**8}, "cpu", "auto") == request
    # Two epochs: the tokens read once (150k) wait in a float16 replay cache.
    replay_mb = 150_000 * d_model * 2 / 2**20
    assert sae_job_memory_mb(smollm2, d_model, {**train, "epochs": 2}, "cpu", "auto") == int(base + buffer_mb + sample_mb + sae_state_mb + replay_mb)
    # A buffer larger than the training run is capped at it; one above buffer_max_ram_mb is float16 on disk.
    assert sae_buffer_vectors({**train, "training_tokens": 5000}) == 5000
    assert sae_buffer_vectors({**train, "training_tokens": 300, "buffer_vectors": 100}) == 512  # two batches at least
    on_disk = sae_job_memory_mb(smollm2, d_model, {**train, "buffer_max_ram_mb": 100}, "cpu", "auto")
    assert on_disk == int(base + buffer_mb / 2 + sample_mb + sae_state_mb)
    # On a GPU the SAE's training state lives on the device: host memory is the buffer and the sample.
    gpu = sae_job_memory_mb(smollm2, d_model, train, "cuda", "auto")
    assert gpu == int(model_job_memory_mb(smollm2, "cuda", "auto") + buffer_mb + sample_mb)


def test_the_runtime_request_follows_the_tokens_and_the_model():
    from competency_gaps.workflow import sae_job_runtime_min

    train = {"training_tokens": 300_000, "heldout_tokens": 20_000}
    smollm2 = sae_job_runtime_min(134_515_008, train, "cpu")
    assert 228 / 60 < smollm2 < 60  # above the measured 228 s on 2 quiet cores
    assert sae_job_runtime_min(134_515_008, {**train, "training_tokens": 3_000_000}, "cpu") > 5 * smollm2 - 50
    assert sae_job_runtime_min(134_515_008, train, "cuda") < smollm2
    assert sae_job_runtime_min(None, train, "cpu") == 240  # a model whose size is unknown
