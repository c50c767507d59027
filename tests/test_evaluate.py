"""Evaluation: stop tokens and cut-off generations, the start of text for sentence scoring, and tied choices."""

from __future__ import annotations

import logging
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

def test_cut_off_rows_of_a_left_padded_batch():
    pad, stop, word = 0, 2, 9
    new_tokens = torch.tensor([
        [word, stop, pad, pad],  # finished early: padded after its stop token
        [word, word, word, stop],  # stopped on the last allowed token
        [word, word, word, word],  # ran out of tokens
    ])
    assert evaluate.cut_off_rows(new_tokens, [stop, 5], max_new_tokens=4) == [False, False, True]
    # The whole batch stopped before max_new_tokens: nothing was cut off.
    assert evaluate.cut_off_rows(new_tokens[:, :2], [stop], max_new_tokens=4) == [False, False, False]


@pytest.fixture()
def forced_tokens(tiny_model) -> Iterator[list[list[int]]]:
    """Make the tiny model emit, in batch row r, the token forced[r][step] at each decoding step."""
    model, _ = tiny_model
    forced: list[list[int]] = []
    step = {"call": 0}

    def force(module, inputs, logits):
        # One forward call per generated token (the first one reads the prompt).
        bias = torch.zeros_like(logits[:, -1])
        for row, tokens in enumerate(forced):
            bias[row, tokens[min(step["call"], len(tokens) - 1)]] = 1e4
        step["call"] += 1
        return logits + bias[:, None]

    handle = model.lm_head.register_forward_hook(force)
    yield forced
    handle.remove()


def test_generation_stops_at_stop_tokens_and_records_cut_off(tiny_model, forced_tokens):
    model, tokenizer = tiny_model
    word, im_end = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced_tokens += [[im_end], [word, word, word, im_end], [word]]
    # Prompts of different lengths, so the batch is left padded.
    prompts = ["Question: one?", "Question: how many apples does Janet have in all?", "Hi"]
    generated = evaluate.greedy_responses(model, tokenizer, prompts, batch_size=3, max_new_tokens=4)
    assert [g.cut_off for g in generated] == [False, False, True]
    assert [g.text for g in generated] == ["", "aaa", "aaaa"]


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
