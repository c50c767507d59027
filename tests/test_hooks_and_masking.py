"""The residual-stream hook and the counted-token mask, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from competency_gaps.extract import batch_saliency
from competency_gaps.hooks import residual_stream
from competency_gaps.models import decoder_layers
from competency_gaps.prompts import encode_item


def hook_counts(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in decoder_layers(model)]


def test_hook_reads_layer_output_and_stops_there(tiny_model):
    model, tokenizer = tiny_model
    ids = torch.tensor([tokenizer("Janet has 3 apples")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    before = hook_counts(model)  # transformers attaches output-recording hooks of its own on first use
    upper_calls = []
    handle = decoder_layers(model)[2].register_forward_hook(lambda *a: upper_calls.append(1))
    try:
        resid = residual_stream(model, 1, ids, mask)
        assert hook_counts(model)[1] == before[1], "hook left attached"
    finally:
        handle.remove()
    # hidden_states[l + 1] is the output of decoder layer l (hidden_states[0] is the embedding).
    torch.testing.assert_close(resid, hidden[2])
    assert upper_calls == [], "layers above the hooked one must not run"


def test_hook_removed_after_exception(tiny_model):
    model, _ = tiny_model
    before = hook_counts(model)
    with pytest.raises(IndexError):
        residual_stream(model, 1, torch.tensor([[10**6]]), torch.ones(1, 1, dtype=torch.long))  # id out of vocab
    assert hook_counts(model) == before


def counted_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, c in zip(encoded.input_ids, encoded.counted) if c])


def test_fields_mode_counts_only_the_items_own_text(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    encoded = encode_item(tokenizer, tiny_item, "fields")
    assert counted_text(tokenizer, encoded).strip() == "How many apples does Janet have?"
    # The default system prompt, template scaffolding and instruction are all present but not counted.
    full = tokenizer.decode(encoded.input_ids)
    assert "You are a helpful tiny assistant." in full and "<|im_start|>" in full


def test_content_mode_adds_the_instruction_but_not_the_scaffolding(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    text = counted_text(tokenizer, encode_item(tokenizer, tiny_item, "content"))
    assert "Answer the question." in text and "Janet" in text
    assert "tiny assistant" not in text and "<|im_start|>" not in text and "assistant" not in text


def test_all_mode_counts_every_token(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    encoded = encode_item(tokenizer, tiny_item, "all")
    assert all(encoded.counted)


def test_response_tokens_count_when_included(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    encoded = encode_item(tokenizer, tiny_item, "fields", response="She has 8 apples.")
    assert counted_text(tokenizer, encoded).replace(" ", "").endswith("Shehas8apples.")


def test_configured_system_prompt_is_not_counted_as_content(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    text = counted_text(tokenizer, encode_item(tokenizer, tiny_item, "content", system_prompt="Be terse."))
    assert "Answer the question." in text and "Be terse" not in text


def test_explicit_system_prompt_replaces_the_default(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    encoded = encode_item(tokenizer, tiny_item, "fields", system_prompt="Be terse.")
    full = tokenizer.decode(encoded.input_ids)
    assert "Be terse." in full and "tiny assistant" not in full
    assert counted_text(tokenizer, encoded).strip() == "How many apples does Janet have?"


def test_truncation_keeps_the_last_tokens(tiny_model, tiny_item):
    _, tokenizer = tiny_model
    full = encode_item(tokenizer, tiny_item, "fields")
    short = encode_item(tokenizer, tiny_item, "fields", max_length=10)
    assert short.truncated and short.input_ids == full.input_ids[-10:] and short.counted == full.counted[-10:]


def test_batched_saliency_equals_per_item_mean_over_counted_tokens(tiny_model, tiny_item, random_sae_dirs):
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    long_item = {**tiny_item, "messages": [{"role": "user", "content": tiny_item["messages"][0]["content"] + " And pears?"}]}
    prompts = [encode_item(tokenizer, tiny_item, "fields"), encode_item(tokenizer, long_item, "fields")]
    mean, peak, active = batch_saliency(model, sae, 1, prompts, tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.input_ids])
        acts = sae.encode(residual_stream(model, 1, ids, torch.ones_like(ids))[0])[torch.tensor(prompt.counted)]
        torch.testing.assert_close(mean[row], acts.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(peak[row], acts.max(0).values, rtol=1e-4, atol=1e-5)
        assert torch.equal(active[row], (acts > 0).sum(0).float())
    assert (mean > 0).any(), "a random SAE should fire on something"


def test_loglik_batches_respect_the_token_budget_and_keep_every_item():
    from competency_gaps.evaluate import length_batches

    lengths = [1500, 30, 900, 30, 5000, 30, 30]
    batches = length_batches(lengths, batch_size=3, max_tokens=2000)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(batch) <= 3 for batch in batches)
    # Longest first; a batch's padded size (count × its longest) stays in budget unless it holds one item.
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2000 for b in batches)
    assert batches[0] == [4]


def test_loglik_scores_do_not_depend_on_batching(tiny_model):
    from competency_gaps.evaluate import continuation_logprobs

    model, tokenizer = tiny_model
    pairs = [(tokenizer(t)["input_ids"], tokenizer(" apples")["input_ids"]) for t in ("Janet has", "How many", "The doctor and the nurse walked in")]
    alone = [continuation_logprobs(model, [pair], 1, tokenizer.pad_token_id)[0] for pair in pairs]
    together = continuation_logprobs(model, pairs, 8, tokenizer.pad_token_id)
    for a, b in zip(alone, together, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
