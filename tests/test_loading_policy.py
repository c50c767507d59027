"""Loading a model or an SAE runs no code shipped with it and reads no pickle unless the config allows it
(models.M.trust_remote_code, models.M.allow_pickle; both off by default)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


from competency_gaps.config import validate_config
from competency_gaps.models import UnsafeWeightsError, load_model, prepare_model, read_manifest
from competency_gaps.sae import fetch_sae
from competency_gaps.workflow import job_spec

from conftest import tally_printer

CPU = torch.device("cpu")
TALLY: Counter = Counter()


print_tally = tally_printer("loading-policy", TALLY, "case")


def manifest_for(folder: Path, tmp_path: Path, **policy: bool) -> dict:
    """The manifest prepare_model writes for a local folder under this loading policy."""
    path = tmp_path / f"manifest-{'-'.join(sorted(policy)) or 'default'}.json"
    prepare_model({"path": str(folder), **policy}, path)
    return read_manifest(path)


@pytest.fixture()
def remote_code_model(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny model as a custom architecture whose code (shipped beside the weights) leaves a marker when run."""
    folder, marker = tmp_path / "custom-code-model", tmp_path / "code-ran"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"],
                  auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_marker.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).write_text('ran')\n\n\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n")
    (folder / "modeling_marker.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_marker import MarkerConfig\n\n\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
    return folder, marker


def test_code_shipped_with_a_model_does_not_run_by_default(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(manifest_for(folder, tmp_path), CPU, torch.float32)
    assert not marker.exists()
    TALLY[("model with custom code, default config", "refused, its code never ran")] += 1


def test_code_shipped_with_a_model_runs_when_the_config_trusts_it(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    model = load_model(manifest_for(folder, tmp_path, trust_remote_code=True), CPU, torch.float32)
    assert type(model).__name__ == "MarkerForCausalLM" and marker.read_text() == "ran"
    TALLY[("model with custom code, trust_remote_code: true", "loaded")] += 1


@pytest.fixture()
def pickle_only_model(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with its weights in pytorch_model.bin (a pickle) instead of model.safetensors."""
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickled_weights_are_refused_by_default(pickle_only_model, tmp_path):
    with pytest.raises(UnsafeWeightsError, match="allow_pickle: true") as error:
        load_model(manifest_for(pickle_only_model, tmp_path), CPU, torch.float32)
    assert str(pickle_only_model) in str(error.value)
    TALLY[("model with pickle-only weights, default config", "UnsafeWeightsError naming the folder and the key")] += 1


def test_pickled_weights_load_when_the_config_allows_them(pickle_only_model, tiny_model_dir, tmp_path):
    model = load_model(manifest_for(pickle_only_model, tmp_path, allow_pickle=True), CPU, torch.float32)
    reference = load_file(tiny_model_dir / "model.safetensors")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    TALLY[("model with pickle-only weights, allow_pickle: true", "loaded")] += 1


def test_a_pretrained_sae_stored_as_a_pickle_is_refused_unless_allowed(tmp_path, monkeypatch, random_sae_dirs):
    """sae-lens picks the file format per release; some of its converters torch.load a .pt file."""
    from sae_lens import SAE

    pickled = tmp_path / "sae.pt"
    torch.save({"W_enc": torch.zeros(2, 2)}, pickled)

    def release_stored_as_a_pickle(release, sae_id, device="cpu"):
        torch.load(pickled)  # what such a converter does first
        return SAE.load_from_disk(random_sae_dirs[1], device=device)

    monkeypatch.setattr(SAE, "from_pretrained", release_stored_as_a_pickle)
    source = {"release": "some-release", "id": "layer_1"}
    with pytest.raises(UnsafeWeightsError, match="SAE some-release/layer_1: .*allow_pickle: true"):
        fetch_sae(source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    fetch_sae(source, tmp_path / "allowed", allow_pickle=True)
    assert (tmp_path / "allowed" / "sae_weights.safetensors").is_file()
    TALLY[("pretrained SAE stored as a pickle", "refused by default, loaded with allow_pickle")] += 1


def test_the_policy_is_off_by_default_and_reaches_the_jobs_only_when_on(tiny_model_dir, random_sae_dirs):
    def config(**model_keys):
        return validate_config({
            "models": {"tiny": {"source": {"path": str(tiny_model_dir)}, **model_keys,
                                "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}}]}},
            "benchmarks": {"probe_arithmetic": {"adapter": "probe_arithmetic"}}})

    default = config()
    assert default["models"]["tiny"]["trust_remote_code"] is False and default["models"]["tiny"]["allow_pickle"] is False
    # Off: the job slices are what they were before the keys existed, so no finished result reruns.
    assert job_spec(default, "prepare_model", model="tiny")["config"] == {"path": str(tiny_model_dir)}
    assert "allow_pickle" not in job_spec(default, "sae", model="tiny", layer=1)["config"]
    allowed = config(trust_remote_code=True, allow_pickle=True)
    assert job_spec(allowed, "prepare_model", model="tiny")["config"] == {
        "path": str(tiny_model_dir), "trust_remote_code": True, "allow_pickle": True}
    assert job_spec(allowed, "sae", model="tiny", layer=1)["config"]["allow_pickle"] is True


def test_the_manifest_records_the_policy_apart_from_the_source(tiny_model_dir, tmp_path):
    manifest = manifest_for(tiny_model_dir, tmp_path, allow_pickle=True)
    assert manifest["source"] == {"path": str(tiny_model_dir)}
    assert (manifest["trust_remote_code"], manifest["allow_pickle"]) == (False, True)
