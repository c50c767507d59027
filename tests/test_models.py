"""Model manifests (movable results, pinned hub revisions), loading placement, and resource estimates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from competency_gaps import models
from competency_gaps.config import estimate_parameters, resolve_device
from competency_gaps.models import pin_hub_revision, prepare_model, read_manifest
from competency_gaps.workflow import model_job_memory_mb, sae_job_memory_mb


def test_converted_model_is_recorded_relative_to_the_manifest(tmp_path, tiny_model_dir):
    results = tmp_path / "results" / "models" / "model=tiny"
    shutil.copytree(tiny_model_dir, results / "hf")
    prepare_model({"gguf_package": "some_pkg"}, results / "manifest.json", converted=results / "hf")
    assert json.loads((results / "manifest.json").read_text())["load_from"] == "hf"
    # Move the whole results folder: the manifest still finds the weights.
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "results", moved)
    manifest = read_manifest(moved / "models" / "model=tiny" / "manifest.json")
    assert Path(manifest["load_from"]) == (moved / "models" / "model=tiny" / "hf").resolve()
    assert models.load_tokenizer(manifest).eos_token == "<|im_end|>"


def test_local_path_is_kept_as_given(tmp_path):
    manifest = prepare_model({"path": "models/mine"}, tmp_path / "manifest.json")
    assert read_manifest(tmp_path / "manifest.json")["load_from"] == "models/mine" == manifest["load_from"]


def fake_hub_cache(cache: Path, repo: str, commit: str) -> None:
    """The Hugging Face cache layout: refs/main holds the commit, snapshots/<commit>/ the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")


def test_hub_model_is_pinned_to_a_commit_from_the_cache_when_offline(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(tmp_path, "org/model", commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pin_hub_revision("org/model", None, cache_dir=tmp_path) == commit


def test_hub_model_pin_fails_clearly_without_hub_or_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot pin model 'org/absent'.*no snapshot"):
        pin_hub_revision("org/absent", None, cache_dir=tmp_path)


def test_hub_manifest_records_the_pinned_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "pin_hub_revision", lambda repo, revision: f"sha-of-{repo}-{revision}")
    manifest = prepare_model({"hub": "org/model", "revision": "v1"}, tmp_path / "manifest.json")
    assert manifest["revision"] == "sha-of-org/model-v1"
    assert read_manifest(tmp_path / "manifest.json")["revision"] == "sha-of-org/model-v1"


class _Loaded:
    def __init__(self):
        self.moved_to = None

    def to(self, device):
        self.moved_to = device
        return self

    def eval(self):
        return self


@pytest.mark.parametrize(("device", "placement"), [("cpu", None), ("cuda", "cuda"), ("cuda:1", "cuda:1")])
def test_weights_load_straight_onto_an_accelerator(monkeypatch, device, placement):
    """On a GPU, from_pretrained places the weights itself (device_map): the host never holds the whole model."""
    import transformers

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append(kwargs)
        return _Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))
    models.load_model({"load_from": "x", "revision": "abc"}, torch.device(device), torch.bfloat16)
    assert calls[0].get("device_map") == placement
    assert calls[0]["low_cpu_mem_usage"] is True and calls[0]["revision"] == "abc"


def test_parameter_estimate_matches_a_real_model(tiny_model):
    model, _ = tiny_model
    actual = sum(parameter.numel() for parameter in model.parameters())
    assert estimate_parameters(model.config.to_dict()) == pytest.approx(actual, rel=0.02)


def test_parameter_estimate_of_smollm2_matches_its_gguf():
    # SmolLM2-135M's config.json; its GGUF holds 134,515,008 parameters.
    smollm2 = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
               "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
    assert estimate_parameters(smollm2) == pytest.approx(134_515_008, rel=0.001)
    assert estimate_parameters({"hidden_size": 8}) is None


def test_memory_requests_follow_the_model():
    llama_8b = 8_030_000_000
    on_cpu = model_job_memory_mb(llama_8b, "cpu", "auto")
    on_gpu = model_job_memory_mb(llama_8b, "cuda", "auto")
    assert on_cpu > 2 * llama_8b * 4 / 2**20  # fp32 weights, twice
    assert on_gpu < 8000  # weights go to the device, not host memory
    assert model_job_memory_mb(None, "cpu", "auto") == 16000
    small = model_job_memory_mb(134_515_008, "cpu", "auto")
    assert 2900 < small < 4000  # measured peak of SmolLM2's largest evaluation: 2.9 GB
    train = {"d_sae": 4608, "training_tokens": 300_000, "heldout_tokens": 20_000, "batch_size": 256}
    assert sae_job_memory_mb(134_515_008, 576, train, "cpu", "auto") > small  # + the shuffle buffer (tests/test_sae.py)


@pytest.mark.parametrize(("capabilities", "expected"), [({"avx512_bf16": True}, torch.bfloat16),
                                                        ({"amx_bf16": True}, torch.bfloat16),
                                                        ({"avx512_f": True, "avx2": True}, torch.float32)])
def test_activations_are_read_in_bfloat16_where_the_cpu_multiplies_it(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cpu = torch.device("cpu")
    assert models.pick_read_dtype("auto", cpu, torch.float32) == expected
    assert models.pick_read_dtype("float32", cpu, torch.float32) == torch.float32  # configured: as given
    assert models.pick_dtype("auto", cpu) == torch.float32  # scores and saliency: float32 on any CPU


def test_auto_device_is_resolved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda") == "cuda"
