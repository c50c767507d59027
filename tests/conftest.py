"""Fixtures: a tiny random Llama with a ChatML tokenizer, and random sae-lens SAEs, built offline in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"
D_MODEL = 32
N_LAYERS = 4
D_SAE = 64

# ChatML, inserting a default system prompt like SmolLM2's template does (its tokens must be masked).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful tiny assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "Solve the following math problem. Reason step by step, then give the final answer as a number.",
    "Janet has 3 apples and buys 5 more. How many apples does she have? Answer: 8",
    "Tracy wanted to help her friend. What will Tracy want to do next? A. go home B. say thanks C. help",
    "The doctor and the nurse walked in. Who was incompetent? Cannot be determined.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . ? ! : ; ( ) yes no true false the a an of to in",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from competency_gaps.models import load_model, load_tokenizer

    manifest = {"load_from": str(tiny_model_dir)}
    return load_model(manifest, torch.device("cpu"), torch.float32), load_tokenizer(manifest)


def save_random_sae(folder: Path, layer: int, d_in: int = D_MODEL, d_sae: int = D_SAE, k: int = 8, seed: int = 0) -> Path:
    """A TopK SAE with random weights, written in sae-lens format."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="session")
def random_sae_dirs(tmp_path_factory) -> dict[int, Path]:
    """Random SAEs for layers 1 and 2 of the tiny model."""
    return {layer: save_random_sae(tmp_path_factory.mktemp(f"sae-l{layer}"), layer, seed=layer) for layer in (1, 2)}


@pytest.fixture()
def tiny_item() -> dict:
    from competency_gaps.templates import render_prompt

    prompt = render_prompt({"user": "Answer the question.\n\nQuestion: {question}\nAnswer briefly."},
                           {"question": "How many apples does Janet have?"})
    return {"item_id": "x-1", "messages": prompt.messages,
            "field_spans": [{"message": m, "start": s, "end": e} for m, s, e in prompt.field_spans]}


def tally_printer(title: str, tally, key: str = "kind"):
    """A module fixture that prints a bad-input test module's tally of cases by (kind, outcome) when the module
    ends (shown with `pytest -s`)."""

    @pytest.fixture(scope="module", autouse=True)
    def print_tally():
        yield
        print(f"\n{title} tally ({key}: outcome -> cases):")
        for (kind, outcome), count in sorted(tally.items()):
            print(f"  {kind}: {outcome} -> {count}")

    return print_tally
