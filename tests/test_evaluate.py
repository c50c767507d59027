"""Evaluation: stop tokens and cut-off generations, the start of text for sentence scoring, and tied choices."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from competency_gaps import evaluate

# A Gemma-style template: the turn ends with <end_of_turn>, which is neither the eos nor in ChatML.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tokenizer_with(specials: list[str], **kwargs):
    """A small byte-level BPE tokenizer whose only special tokens are `specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["The cat sat on the mat.", "The dog sat."] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return tokenizer_with(["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos_token="<bos>",
                          eos_token="<eos>", pad_token="<pad>", chat_template=GEMMA_TEMPLATE)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A Llama-like tokenizer that prepends <s> itself (add_special_tokens=True)."""
    from tokenizers import processors

    tokenizer = tokenizer_with(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tokenizer


# --- stop tokens -----------------------------------------------------------------------------------

def test_end_of_turn_token_is_read_from_the_chat_template(tiny_model, gemma_tokenizer):
    _, tokenizer = tiny_model
    assert evaluate.end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert evaluate.end_of_turn_token_id(gemma_tokenizer) == gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")


def test_no_chat_template_has_no_end_of_turn_token(bos_tokenizer):
    assert evaluate.end_of_turn_token_id(bos_tokenizer) is None


def test_stop_set_unites_generation_config_tokenizer_eos_and_end_of_turn(gemma_tokenizer):
    ids = gemma_tokenizer.convert_tokens_to_ids
    # Like Gemma-2-it: the generation config lists several stop ids, one of them the tokenizer's eos.
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[ids("<eos>"), ids("<pad>")]))
    assert evaluate.stop_token_ids(model, gemma_tokenizer) == [ids("<eos>"), ids("<pad>"), ids("<end_of_turn>")]


@pytest.mark.parametrize("configured", [None, 7])
def test_stop_set_accepts_a_single_or_no_generation_config_id(gemma_tokenizer, configured):
    ids = gemma_tokenizer.convert_tokens_to_ids
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    expected = ([] if configured is None else [configured]) + [ids("<eos>"), ids("<end_of_turn>")]
    assert evaluate.stop_token_ids(model, gemma_tokenizer) == expected


# --- cut-off generations on the tiny model ---------------------------------------------------------

def test_a_row_ends_at_its_first_stop_token_and_is_cut_off_without_one():
    stop, word = 2, 9
    assert evaluate.until_stop([word, stop, 0, 0], [stop, 5]) == [word, stop]  # finished early: padding dropped
    assert evaluate.until_stop([word, word], [stop]) == [word, word]
    assert not evaluate.is_cut_off([word, stop], [stop], max_new_tokens=4)
    assert not evaluate.is_cut_off([word, word, word, stop], [stop], max_new_tokens=4)  # stopped on the last token
    assert evaluate.is_cut_off([word] * 4, [stop], max_new_tokens=4)  # ran out of tokens


def varied_model(architecture: str, vocab_size: int):
    """A random model whose greedy tokens change from step to step (large initial weights), so that a row decoded
    from a misaligned cache or mask would come out different."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.5)
    torch.manual_seed(0)
    if architecture == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=6)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_greedy_decoding_equals_generate_as_rows_finish(tiny_model, architecture):
    """Rows that stop leave the batch (and the cache); the rows still decoding come out as `generate` decodes them."""
    _, tokenizer = tiny_model
    model = varied_model(architecture, len(tokenizer))
    tokenizer.padding_side = "left"
    prompts = ["Question: one?", "Question: how many apples does Janet have in all?", "Hi", "Tell me a story about a cat."]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    never = [len(tokenizer) - 1]
    free = evaluate.generate_new_tokens(model, encoded, never, 12, tokenizer.pad_token_id)
    assert evaluate.greedy_decode(model, encoded["input_ids"], encoded["attention_mask"], never, 12) == free
    # Stop two rows early, at different steps, on tokens they emit.
    stops = [free[0][2], free[2][1]]
    expected = evaluate.generate_new_tokens(model, encoded, stops, 12, tokenizer.pad_token_id)
    got = evaluate.greedy_decode(model, encoded["input_ids"], encoded["attention_mask"], stops, 12)
    assert got == expected
    assert sorted(len(row) for row in got)[:2] == [2, 3] and max(len(row) for row in got) == 12


def test_decoding_progress_counts_the_rows_still_decoding(tiny_model, caplog):
    _, tokenizer = tiny_model
    model = varied_model("llama", len(tokenizer))
    tokenizer.padding_side = "left"
    encoded = tokenizer(["Question: one?", "Hi", "Tell me a story about a cat."], return_tensors="pt", padding=True)
    free = evaluate.generate_new_tokens(model, encoded, [len(tokenizer) - 1], 8, tokenizer.pad_token_id)
    with caplog.at_level("INFO", logger="competency_gaps.evaluate"):
        evaluate.greedy_decode(model, encoded["input_ids"], encoded["attention_mask"], [free[1][1]], 8)
    # the last step's line: one row stopped at its second token, and the run may end before max_new_tokens
    assert "decoding: 8 / 8 steps" in caplog.text
    assert "ETA at most 0 s); 2 of 3 rows still decoding" in caplog.text


def test_a_generation_config_that_processes_logits_decodes_with_generate(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    assert evaluate.logits_settings(model) == []
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    assert evaluate.logits_settings(model) == ["repetition_penalty"]
    calls = []
    monkeypatch.setattr(evaluate, "generate_new_tokens", lambda *args: calls.append(args) or [[1]])
    evaluate.greedy_responses(model, tokenizer, ["Hi"], batch_size=1, max_new_tokens=3)
    assert len(calls) == 1


@pytest.fixture()
def forced_tokens(tiny_model) -> Iterator[list[list[int]]]:
    """Make the tiny model emit, in batch row r, the token forced[r][step] at each decoding step. A row that stops
    leaves the batch, so the rows after it move up: give the rows that stop early the last places."""
    model, _ = tiny_model
    forced: list[list[int]] = []
    step = {"call": 0}

    def force(module, inputs, logits):
        # One forward call per generated token (the first one reads the prompt).
        bias = torch.zeros_like(logits[:, -1])
        for row, tokens in enumerate(forced[: bias.shape[0]]):
            bias[row, tokens[min(step["call"], len(tokens) - 1)]] = 1e4
        step["call"] += 1
        return logits + bias[:, None]

    handle = model.lm_head.register_forward_hook(force)
    yield forced
    handle.remove()


def test_generation_stops_at_stop_tokens_and_records_cut_off(tiny_model, forced_tokens):
    model, tokenizer = tiny_model
    word, im_end = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced_tokens += [[word, word, word, im_end], [word], [im_end]]
    # Prompts of different lengths, so the batch is left padded.
    prompts = ["Question: how many apples does Janet have in all?", "Hi", "Question: one?"]
    generated = evaluate.greedy_responses(model, tokenizer, prompts, batch_size=3, max_new_tokens=4)
    assert [g.cut_off for g in generated] == [False, True, False]
    assert [g.text for g in generated] == ["aaa", "aaaa", ""]


def test_generation_stops_at_the_models_own_eos(tiny_model, forced_tokens, monkeypatch):
    """A stop id only the model's generation config names (Gemma's <end_of_turn>, Phi-3's <|end|>) ends decoding."""
    model, tokenizer = tiny_model
    own_stop = tokenizer.convert_tokens_to_ids("!")
    monkeypatch.setattr(model.generation_config, "eos_token_id", [own_stop])
    forced_tokens.append([tokenizer.convert_tokens_to_ids("a"), own_stop])
    [generated] = evaluate.greedy_responses(model, tokenizer, ["Question: one?"], batch_size=1, max_new_tokens=5)
    assert (generated.text, generated.cut_off) == ("a!", False)


# --- CrowS-Pairs: start of text ---------------------------------------------------------------------

def test_start_of_text_is_the_document_separator_not_the_chatml_role_marker(tiny_model):
    _, tokenizer = tiny_model
    assert tokenizer.bos_token == "<|im_start|>"
    assert evaluate.start_of_text_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert evaluate.context_ids(tokenizer, "") == [tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def test_start_of_text_is_the_bos_a_tokenizer_adds_itself(bos_tokenizer):
    assert evaluate.start_of_text_id(bos_tokenizer) == bos_tokenizer.convert_tokens_to_ids("<s>")


def test_start_of_text_falls_back_to_eos():
    tokenizer = tokenizer_with(["<eot>"], eos_token="<eot>")
    assert evaluate.start_of_text_id(tokenizer) == tokenizer.convert_tokens_to_ids("<eot>")


# --- multiple-choice ties ---------------------------------------------------------------------------

def mc_item(item_id: str, gold_index: int, scoring: str = "mc_loglik") -> dict:
    return {"item_id": item_id, "messages": [{"role": "user", "content": f"Pick one ({item_id})."}],
            "field_spans": [], "scoring": scoring, "gold": None, "choices": ["A", "B", "C"],
            "gold_index": gold_index, "choice_contexts": None}


def test_tied_options_score_the_expected_accuracy_of_a_random_tie_break(tiny_model, monkeypatch, caplog):
    _, tokenizer = tiny_model
    per_choice = {"tie-gold": [[-1.0], [-1.0], [-3.0]], "tie-wrong": [[-2.0], [-1.0], [-1.0]],
                  "clear": [[-2.0], [-1.0], [-3.0]]}
    items = [mc_item("tie-gold", 1), mc_item("tie-wrong", 0), mc_item("clear", 1)]
    logprobs = [lp for item in items for lp in per_choice[item["item_id"]]]
    monkeypatch.setattr(evaluate, "continuation_logprobs", lambda model, pairs, batch_size, pad_id: logprobs)
    with caplog.at_level(logging.WARNING, logger=evaluate.__name__):
        rows = evaluate.score_loglik_items(None, tokenizer, items, None, batch_size=4)
    assert [(row["score"], row["prediction"]) for row in rows] == [(0.5, "0,1"), (0.0, "1,2"), (1.0, "1")]
    assert "2 item(s)" in caplog.text


# --- shared-prefix log-likelihood scoring ----------------------------------------------------------

def reference_logprobs(model, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """The plain definition: each context + continuation read whole, unpadded, one at a time."""
    results = []
    with torch.inference_mode():
        for context, continuation in pairs:
            logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            results.append([logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation)])
    return results


def assert_logprobs_match(got: list[list[float]], expected: list[list[float]]) -> None:
    assert [len(row) for row in got] == [len(row) for row in expected]
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=1e-4)


# Contexts of differing lengths, each with 2-5 options of differing token counts (one to several).
MIXED_ITEMS = [
    ("Janet has", [" 8", " apples and more"]),
    ("How many apples does Janet have in all? Answer with a number:", [" 8", " 3 apples", " no", " 100 apples, yes"]),
    ("The doctor and the nurse", [" walked in together. walked in.", " yes", " cannot be determined", " a", " the"]),
    ("Tracy wanted to help her friend. What will Tracy want to do next?", [" go home", " say thanks", " help"]),
]


def mixed_pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(tokenizer(context)["input_ids"], tokenizer(option, add_special_tokens=False)["input_ids"])
            for context, options in MIXED_ITEMS for option in options]


@pytest.mark.parametrize(("batch_size", "max_tokens"), [(1, 4096), (3, 4096), (8, 4096), (8, 40)])
def test_shared_prefix_logprobs_equal_full_sequence_scoring(tiny_model, batch_size, max_tokens):
    """Left-padded context batches, and option rows split by the token budget (max_tokens=40: one option
    per forward, every one from the same context cache, which must stay unchanged), change nothing."""
    model, tokenizer = tiny_model
    pairs = mixed_pairs(tokenizer)
    assert len({len(context) for context, _ in pairs}) == len(MIXED_ITEMS)
    option_lengths = {len(continuation) for _, continuation in pairs}
    assert 1 in option_lengths and len(option_lengths) >= 4
    got = evaluate.continuation_logprobs(model, pairs, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens)
    assert_logprobs_match(got, reference_logprobs(model, pairs))


@pytest.mark.parametrize("architecture", ["mistral", "gemma2"])
def test_shared_prefix_logprobs_on_sliding_window_models(tiny_model, architecture):
    """Contexts longer than a sliding window (all layers: Mistral; every other layer: Gemma 2)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    _, tokenizer = tiny_model
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6)
    torch.manual_seed(0)
    model = (MistralForCausalLM(MistralConfig(**shape)) if architecture == "mistral"
             else Gemma2ForCausalLM(Gemma2Config(**shape))).eval()
    head = tokenizer("Answer the question about Janet and her apples.")["input_ids"]
    for pairs in (mixed_pairs(tokenizer), [(head + context, option) for context, option in mixed_pairs(tokenizer)]):
        assert max(len(context) for context, _ in pairs) > 2 * shape["sliding_window"]
        got = evaluate.continuation_logprobs(model, pairs, batch_size=8, pad_id=tokenizer.pad_token_id)
        assert_logprobs_match(got, reference_logprobs(model, pairs))
    # A shared head is not read apart: the padding after it would take window slots from the context.
    assert evaluate.shared_context_prefix(model, [context for context, _ in pairs]) is None


@pytest.fixture()
def embedded_tokens(tiny_model) -> Iterator[list[int]]:
    """Counts the tokens every forward of the tiny model reads (padding included)."""
    model, _ = tiny_model
    counts: list[int] = []
    handle = model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: counts.append(inputs[0].numel()))
    yield counts
    handle.remove()


def test_a_shared_context_is_read_once(tiny_model, embedded_tokens):
    model, tokenizer = tiny_model
    context, options = MIXED_ITEMS[1]
    pairs = [(tokenizer(context)["input_ids"], tokenizer(option)["input_ids"]) for option in options]
    expected = reference_logprobs(model, pairs)
    embedded_tokens.clear()
    got = evaluate.continuation_logprobs(model, pairs, batch_size=8, pad_id=tokenizer.pad_token_id)
    assert_logprobs_match(got, expected)
    # The context once, then every option of 2+ tokens but its last token (right padded to the longest);
    # a one-token option is scored from the context's last logit alone.
    longer = [continuation for _, continuation in pairs if len(continuation) > 1]
    assert 0 < len(longer) < len(pairs)
    assert embedded_tokens == [len(pairs[0][0]), len(longer) * (max(map(len, longer)) - 1)]


def test_one_token_options_are_scored_from_the_context_forward_alone(tiny_model, embedded_tokens):
    model, tokenizer = tiny_model
    items = [mc_item("letters-1", 0), {**mc_item("letters-2", 2), "choices": ["A", "B", "C", "D", "E"]}]
    pairs = [(evaluate.context_ids(tokenizer, evaluate.prompt_text(tokenizer, item, None)),
              tokenizer(choice, add_special_tokens=False)["input_ids"]) for item in items for choice in item["choices"]]
    assert all(len(continuation) == 1 for _, continuation in pairs)
    expected = reference_logprobs(model, pairs)
    embedded_tokens.clear()
    got = evaluate.continuation_logprobs(model, pairs, batch_size=8, pad_id=tokenizer.pad_token_id)
    assert_logprobs_match(got, expected)
    # The head both prompts share, once; then the rest of both in one left-padded batch; no option forward.
    contexts = [pairs[0][0], pairs[-1][0]]
    head = len(os.path.commonprefix(contexts))
    assert embedded_tokens == [head, 2 * (max(map(len, contexts)) - head)]


def test_scored_items_mix_prompts_and_start_of_text_sentences(tiny_model):
    """Through score_loglik_items: chat-prompt options (2-5 of them) and CrowS-Pairs-style sentences whose
    empty context is the start-of-text token, shared by every such sentence; each total as before."""
    model, tokenizer = tiny_model
    items = [{**mc_item(f"mc-{n}", 0), "choices": [option.strip() for option in options]}
             for n, (_, options) in enumerate(MIXED_ITEMS)]
    items += [{**mc_item(f"pair-{n}", 1, scoring="pair_loglik"), "choices": sentences, "choice_contexts": ["", ""]}
              for n, sentences in enumerate([["The cat sat.", "The dog sat."], ["A doctor walked in.", "The nurse sat on the mat."]])]
    rows = evaluate.score_loglik_items(model, tokenizer, items, None, batch_size=3)
    start = [evaluate.start_of_text_id(tokenizer)]
    for item, row in zip(items, rows, strict=True):
        context = start if item["choice_contexts"] else evaluate.context_ids(tokenizer, evaluate.prompt_text(tokenizer, item, None))
        pairs = [(context, tokenizer(choice, add_special_tokens=False)["input_ids"]) for choice in item["choices"]]
        expected = [sum(lp) / len(lp) if item["scoring"] == "mc_loglik" else sum(lp) for lp in reference_logprobs(model, pairs)]
        assert row["choice_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_an_empty_context_is_refused(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="empty context"):
        evaluate.continuation_logprobs(model, [([], [5, 6])], batch_size=1, pad_id=tokenizer.pad_token_id)


# --- end to end -------------------------------------------------------------------------------------

def test_evaluate_items_end_to_end(tiny_model, tiny_item):
    model, tokenizer = tiny_model
    generated = {**tiny_item, "benchmark": "gen", "scoring": "numeric_match", "gold": "8", "choices": None,
                 "gold_index": None, "choice_contexts": None}
    pair = {**mc_item("pair-1", 1, scoring="pair_loglik"), "choices": ["The cat sat.", "The dog sat."],
            "choice_contexts": ["", ""], "benchmark": "pairs"}
    mc = {**mc_item("mc-1", 2), "benchmark": "mc"}
    items = [mc, generated, pair]
    scores = evaluate.evaluate_items(model, tokenizer, items, system_prompt=None, batch_size=4,
                                     generation_batch_size=2, max_new_tokens=3)
    assert scores["item_id"].to_list() == ["mc-1", "x-1", "pair-1"]
    assert scores["cut_off"].to_list()[0] is None and scores["cut_off"].to_list()[2] is None
    assert isinstance(scores["cut_off"][1], bool)
    assert scores["score"].is_between(0, 1).all()


def test_cut_off_responses_are_logged_per_benchmark(caplog):
    items = [{"item_id": f"{name}-{i}", "benchmark": name} for name in ("gsm8k", "math") for i in range(4)]
    cut = {"gsm8k-0", "math-0", "math-1"}
    rows = [{"item_id": item["item_id"], "cut_off": item["item_id"] in cut} for item in items]
    rows.append({"item_id": "mc-1", "cut_off": None})  # a log-likelihood item counts nowhere
    items.append({"item_id": "mc-1", "benchmark": "mc"})
    with caplog.at_level(logging.INFO, logger=evaluate.__name__):
        evaluate.log_cut_off(items, rows)
    assert "gsm8k: 1 / 4 generated responses cut off at max_new_tokens (25.0%)" in caplog.text
    assert "math: 2 / 4 generated responses cut off at max_new_tokens (50.0%)" in caplog.text
    assert "mc:" not in caplog.text
