"""The residual-stream hook and the counted-token mask, on a tiny random Llama."""

from __future__ import annotations

import os

import pytest
import torch

from competency_gaps.extract import extract_saliency
from competency_gaps.saliency import batch_activations
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


def long_item() -> dict:
    from competency_gaps.templates import render_prompt

    question = "Janet has 3 apples and buys 5 more. " * 6 + "How many apples does Janet have?"
    prompt = render_prompt({"user": "Answer the question.\n\nQuestion: {question}\nAnswer briefly."},
                           {"question": question})
    return {"item_id": "long-1", "messages": prompt.messages,
            "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans]}


def prefix_and_suffix_lengths(counted: list[bool]) -> tuple[int, int]:
    """Tokens before the first counted one, and after the last counted one."""
    return counted.index(True), counted[::-1].index(True)


@pytest.mark.parametrize("mode", ["fields", "content"])
def test_truncation_keeps_prefix_and_suffix_and_cuts_the_items_text(tiny_model, mode):
    _, tokenizer = tiny_model
    full = encode_item(tokenizer, long_item(), mode)
    prefix, suffix = prefix_and_suffix_lengths(full.counted)
    max_length = prefix + suffix + 5
    short = encode_item(tokenizer, long_item(), mode, max_length=max_length)
    assert short.truncated and len(short.input_ids) == max_length
    # BOS, chat header, default system prompt and instruction stay in front; the assistant header at the end.
    assert short.input_ids[:prefix] == full.input_ids[:prefix]
    assert short.input_ids[-suffix:] == full.input_ids[-suffix:]
    # The cut drops the earliest tokens of the item's text; its end (the question) survives.
    assert short.input_ids[prefix:] == full.input_ids[-(max_length - prefix):]
    assert short.counted == full.counted[:prefix] + full.counted[-(max_length - prefix):]
    assert sum(short.counted) == 5 and counted_text(tokenizer, full).endswith(counted_text(tokenizer, short))
    assert short.total_tokens == len(full.input_ids)


def test_truncation_falls_back_to_the_last_tokens_when_prefix_and_suffix_do_not_fit(tiny_model):
    _, tokenizer = tiny_model
    full = encode_item(tokenizer, long_item(), "fields")
    prefix, suffix = prefix_and_suffix_lengths(full.counted)
    max_length = prefix + suffix - 1
    short = encode_item(tokenizer, long_item(), "fields", max_length=max_length)
    assert short.truncated and short.input_ids == full.input_ids[-max_length:]
    assert short.counted == full.counted[-max_length:]


def test_truncation_in_all_mode_keeps_the_first_token(tiny_model):
    _, tokenizer = tiny_model
    full = encode_item(tokenizer, long_item(), "all")
    short = encode_item(tokenizer, long_item(), "all", max_length=10)
    assert short.truncated and short.input_ids == full.input_ids[:1] + full.input_ids[-9:] and all(short.counted)
    assert short.total_tokens == len(full.input_ids)


def test_untruncated_prompt_is_unchanged(tiny_model):
    _, tokenizer = tiny_model
    full = encode_item(tokenizer, long_item(), "fields")
    same = encode_item(tokenizer, long_item(), "fields", max_length=len(full.input_ids))
    assert not same.truncated and same == full and same.total_tokens == len(full.input_ids)


def item_with_system_message() -> dict:
    """An item whose template brings its own system message; one field sits in it, one in the user turn."""
    system, user = "You solve riddles. Context: Janet has 3 apples.", "Riddle: How many apples does Janet have?"
    return {"item_id": "s-1", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "field_spans": [{"message": 0, "start": system.index("Janet"), "end": len(system)},
                            {"message": 1, "start": user.index("How"), "end": len(user)}]}


def test_configured_system_prompt_is_merged_with_the_templates_own(tiny_model):
    from competency_gaps.prompts import prompt_text

    _, tokenizer = tiny_model
    item = item_with_system_message()
    merged = "Be terse.\n\nYou solve riddles. Context: Janet has 3 apples."
    assert merged in prompt_text(tokenizer, item, "Be terse.")
    encoded = encode_item(tokenizer, item, "fields", system_prompt="Be terse.")
    assert merged in tokenizer.decode(encoded.input_ids)
    # The field spans still land on the item's text, past the configured prompt.
    assert counted_text(tokenizer, encoded) == "Janet has 3 apples. How many apples does Janet have?"


def test_merged_configured_system_prompt_does_not_count_as_content(tiny_model):
    _, tokenizer = tiny_model
    encoded = encode_item(tokenizer, item_with_system_message(), "content", system_prompt="Be terse.")
    assert "Be terse." in tokenizer.decode(encoded.input_ids)
    text = counted_text(tokenizer, encoded)
    assert "You solve riddles. Context: Janet has 3 apples." in text and "Riddle: How many" in text
    assert "Be terse" not in text and "system" not in text


def standard_sae(layer: int):
    """A ReLU (non-TopK) sae-lens SAE: it has no sparse output switch, so extraction takes the dense route."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from conftest import D_MODEL, D_SAE

    torch.manual_seed(3)
    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
    return sae


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_batched_saliency_equals_per_item_mean_over_counted_tokens(tiny_model, tiny_item, random_sae_dirs, kind):
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1]) if kind == "topk" else standard_sae(1)
    long_item = {**tiny_item, "messages": [{"role": "user", "content": tiny_item["messages"][0]["content"] + " And pears?"}]}
    prompts = [encode_item(tokenizer, tiny_item, "fields"), encode_item(tokenizer, long_item, "fields")]
    mean, peak, active, counted = batch_activations(model, sae, 1, prompts, tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.input_ids])
        acts = sae.encode(residual_stream(model, 1, ids, torch.ones_like(ids))[0])[torch.tensor(prompt.counted)]
        torch.testing.assert_close(mean[row], acts.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(peak[row], acts.max(0).values, rtol=1e-4, atol=1e-5)
        assert torch.equal(active[row], (acts > 0).sum(0).float())
        assert counted[row] == sum(prompt.counted)
    assert (mean > 0).any(), "a random SAE should fire on something"


def test_loglik_batches_respect_the_token_budget_and_keep_every_item():
    from competency_gaps.saliency import length_batches

    lengths = [1500, 30, 900, 30, 5000, 30, 30]
    batches = length_batches(lengths, max_tokens=2000, max_items=3)
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


def test_massive_activation_is_left_out_of_the_counted_tokens(tiny_model, tiny_item, random_sae_dirs):
    """An attention-sink-sized vector (100x the others) at a counted token is neither encoded nor counted: the
    item's mean runs over its other counted tokens and the top-context observer never sees it."""
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    prompt = encode_item(tokenizer, tiny_item, "fields")
    counted_positions = [i for i, c in enumerate(prompt.counted) if c]
    sink = counted_positions[2]

    def plant(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, sink] *= 100
        return output

    seen = []
    handle = decoder_layers(model)[1].register_forward_hook(plant)
    try:
        mean, _, active, counted = batch_activations(model, sae, 1, [prompt], tokenizer.pad_token_id,
                                                     observe=lambda acts: seen.append(acts.token_position.tolist()))
        tokens = extract_saliency(model, tokenizer, sae, 1, [{**tiny_item, "item_id": "x"}], mode="fields",
                                  system_prompt=None, max_length=512, context_policy="truncate", batch_tokens=4096)[1]
        ids = torch.tensor([prompt.input_ids])
        resid = residual_stream(model, 1, ids, torch.ones_like(ids))[0]
    finally:
        handle.remove()
    kept = torch.tensor([i for i in counted_positions if i != sink])
    acts = sae.encode(resid[kept])
    torch.testing.assert_close(mean[0], acts.mean(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(active[0], (acts > 0).sum(0).float())
    assert seen == [kept.tolist()]
    # T_i as read: the left-out token is not counted, in the batch and in the extraction's token table.
    assert counted.tolist() == [len(kept)] and tokens["counted_tokens"].to_list() == [len(kept)]


# ---------------------------------------------------------------- the shared head, read once


def items_sharing_a_head() -> list[dict]:
    """Three items in one instruction template: their prompts share the system turn and the instruction."""
    from competency_gaps.templates import render_prompt

    items = []
    for index, question in enumerate(["How many apples does Janet have?", "Who was incompetent?", "What will Tracy do next?"]):
        prompt = render_prompt({"user": "Answer the question.\n\nQuestion: {question}\nAnswer briefly."}, {"question": question})
        items.append({"item_id": f"h-{index}", "messages": prompt.messages,
                      "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans]})
    return items


def test_uncounted_prefix_stops_at_the_first_counted_token_and_leaves_a_token_to_read():
    from competency_gaps.hooks import uncounted_prefix_length
    from competency_gaps.prompts import EncodedPrompt

    def prompt(ids, first_counted):
        return EncodedPrompt(ids, [i >= first_counted for i in range(len(ids))])

    assert uncounted_prefix_length([prompt([1, 2, 3, 4, 5], 4), prompt([1, 2, 3, 9, 9], 4)]) == 3  # ids differ at 3
    assert uncounted_prefix_length([prompt([1, 2, 3, 4, 5], 2), prompt([1, 2, 3, 4, 6], 4)]) == 2  # one counts from 2
    assert uncounted_prefix_length([prompt([1, 2, 3], 3), prompt([1, 2, 3, 4], 4)]) == 2  # nothing counted: keep one
    assert uncounted_prefix_length([prompt([7, 2, 3], 1), prompt([1, 2, 3], 1)]) == 0
    assert uncounted_prefix_length([prompt([1, 2, 3, 4], 3)]) == 0  # one prompt is read once anyway


def test_a_shared_head_is_read_once_and_changes_no_counted_activation(tiny_model, random_sae_dirs):
    """Prompts sharing their chat template's head and instruction: the head goes through the model once, each
    batch reads only what follows it, and every counted token's residual vector and saliency is what the
    whole prompt read from its start gives."""
    from competency_gaps.hooks import read_shared_prefix
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    prompts = [encode_item(tokenizer, item, "fields") for item in items_sharing_a_head()]
    first_counted = min(p.counted.index(True) for p in prompts)
    prefix = read_shared_prefix(model, 1, prompts)
    assert prefix is not None and 0 < prefix.length == first_counted
    assert all(p.input_ids[: prefix.length] == prompts[0].input_ids[: prefix.length] for p in prompts)

    lengths_read = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda module, inputs, output: lengths_read.append(inputs[0].shape[1]))
    try:
        sae = load_sae(random_sae_dirs[1])
        shared = batch_activations(model, sae, 1, prompts, tokenizer.pad_token_id, prefix=prefix)
    finally:
        handle.remove()
    assert lengths_read == [max(len(p.input_ids) for p in prompts) - prefix.length]
    whole = batch_activations(model, sae, 1, prompts, tokenizer.pad_token_id)
    for got, expected in zip(shared, whole, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids])
        full = residual_stream(model, 1, ids, None)[0, prefix.length :]
        tail = residual_stream(model, 1, ids[:, prefix.length :], None, prefix)[0]
        torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-5)
    # The prefix's cache is never extended by a batch: it still holds the head alone.
    assert prefix.cache.get_seq_length() == prefix.length


def test_extraction_reads_the_shared_head_once(tiny_model, random_sae_dirs, monkeypatch):
    """extract_saliency gives the saliency of reading each prompt whole while the model reads the head once."""
    import competency_gaps.concept_labels as concept_labels
    from competency_gaps.hooks import SharedPrefix
    from competency_gaps.sae import load_sae

    model, tokenizer = tiny_model
    sae = load_sae(random_sae_dirs[1])
    items = items_sharing_a_head()

    def extract():
        return extract_saliency(model, tokenizer, sae, 1, items, mode="fields", system_prompt=None, max_length=512,
                                context_policy="truncate", batch_tokens=4096)[0].sort(["item_id", "concept"])

    prefixes: list[SharedPrefix | None] = []
    real = concept_labels.read_shared_prefix
    monkeypatch.setattr(concept_labels, "read_shared_prefix", lambda *a: prefixes.append(real(*a)) or prefixes[-1])
    shared = extract()
    monkeypatch.setattr(concept_labels, "read_shared_prefix", lambda *a: None)
    whole = extract()
    assert prefixes[0] is not None and prefixes[0].length > 0
    assert shared.select("item_id", "concept", "active_tokens").equals(whole.select("item_id", "concept", "active_tokens"))
    for column in ("saliency", "max_activation"):
        assert (shared[column] - whole[column]).abs().max() < 1e-5


def test_multiple_choice_scores_read_the_shared_head_once(tiny_model, monkeypatch):
    """Option log-probabilities with the items' shared head read once equal those of reading every prompt whole,
    and the forward passes after the head's own read no longer include it."""
    import competency_gaps.evaluate as evaluate

    model, tokenizer = tiny_model
    items = [{**item, "choices": [" yes", " no apples", " three"], "choice_contexts": None}
             for item in items_sharing_a_head()]
    pairs = evaluate.loglik_pairs(tokenizer, items, None)
    head = len(os.path.commonprefix([context for context, _ in pairs]))
    prompt_lengths = {len(context) for context, _ in pairs}
    assert head > 0 and len(prompt_lengths) > 1

    read_lengths = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda module, inputs, output: read_lengths.append(inputs[0].shape[1]))
    try:
        shared = evaluate.continuation_logprobs(model, pairs, 8, tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert read_lengths[0] == head  # the head, once
    assert read_lengths[1] == max(prompt_lengths) - head  # then the rest of every prompt, left padded
    monkeypatch.setattr(evaluate, "shared_context_prefix", lambda model, contexts: None)
    whole = evaluate.continuation_logprobs(model, pairs, 8, tokenizer.pad_token_id)
    for got, expected in zip(shared, whole, strict=True):
        assert got == pytest.approx(expected, abs=1e-5)


def test_a_shared_head_longer_than_a_sliding_window_changes_no_activation(tiny_model):
    """Mistral with a 6-token window: the head (longer than the window) is read once, and each prompt's tokens
    after it get the residual vectors of reading the prompt whole."""
    from transformers import MistralConfig, MistralForCausalLM

    from competency_gaps.hooks import read_shared_prefix
    from competency_gaps.prompts import EncodedPrompt

    _, tokenizer = tiny_model
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, sliding_window=6)).eval()
    head = tokenizer("Answer the question about Janet and her apples.")["input_ids"]
    tails = [tokenizer(text)["input_ids"] for text in ("How many apples?", "Who was incompetent in the end?")]
    prompts = [EncodedPrompt(head + tail, [False] * len(head) + [True] * len(tail)) for tail in tails]
    prefix = read_shared_prefix(model, 1, prompts)
    assert prefix is not None and prefix.length == len(head) > 6
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids])
        full = residual_stream(model, 1, ids, None)[0, prefix.length :]
        tail = residual_stream(model, 1, ids[:, prefix.length :], None, prefix)[0]
        torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-5)
