"""Model sources (packaged GGUF, Hugging Face hub id, local folder), conversion and loading.

Each model gets a small manifest (results/models/model=<slug>/manifest.json) written by the
`prepare_model` rule: it says which folder or hub id (pinned to a commit) `from_pretrained` should read.
A packaged GGUF is converted once (rule `convert_gguf`) into the safetensors folder hf/ beside it,
because de-quantising it costs ~20 s per load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from competency_gaps.config import gguf_file
from competency_gaps.tables import write_json

log = logging.getLogger(__name__)

# What a model may do while it loads, off unless the model's config turns it on (models.M.trust_remote_code,
# models.M.allow_pickle): run Python code shipped with the weights, read pickle-based weight files
# (pytorch_model.bin, .pt), which can run code too. Recorded in the manifest, so every job loads alike.
LOADING_POLICY = ("trust_remote_code", "allow_pickle")


class UnsafeWeightsError(OSError):
    """The weights exist only in a form the loading policy refuses (pickle); the message says how to allow it."""


def loading_policy(spec: dict[str, Any]) -> dict[str, bool]:
    """trust_remote_code and allow_pickle of a manifest or a prepare_model spec, False when absent."""
    return {key: bool(spec.get(key, False)) for key in LOADING_POLICY}


@contextmanager
def pickle_refused(what: str) -> Iterator[None]:
    """Within the block, torch.load (pickle) raises UnsafeWeightsError naming `what` instead of reading a file;
    for loaders that pick a file format themselves (sae-lens's pretrained-SAE converters)."""
    original = torch.load

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeWeightsError(f"{what}: its weights are a pickle-based file ({file}); they load only when the "
                                 "model's config sets allow_pickle: true")

    torch.load = refuse
    try:
        yield
    finally:
        torch.load = original


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (the scores and saliency in full precision, whatever the CPU), bfloat16 on accelerators,
    unless configured."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def native_bfloat16(device: torch.device) -> bool:
    """Does `device` multiply bfloat16 matrices in hardware? A CUDA GPU that does (not emulated), or an x86 CPU
    with AVX512-BF16 or AMX-BF16; elsewhere torch emulates it, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def pick_read_dtype(requested: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The model's dtype where it only reads activations (the SAE's training stream, the labels' corpus pass):
    bfloat16 where `device` multiplies it natively, else `dtype` (the model jobs'), unless configured."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if native_bfloat16(device) else dtype


def convert_gguf(package: str, file: str | None, out_dir: Path) -> Path:
    """De-quantise a packaged GGUF into a transformers safetensors folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file(package, file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to serialise a GGUF-loaded model; the weights are plain fp32 tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def pin_hub_revision(repo: str, revision: str | None, cache_dir: str | Path | None = None) -> str:
    """The commit a hub branch/tag points to now, so every job loads the same snapshot: asked of the hub,
    or, offline, read from the warm Hugging Face cache."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    try:
        return HfApi().model_info(repo, revision=revision).sha
    except Exception as error:  # offline, or no access: fall back to what the cache holds
        cached = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached).parent.name  # …/snapshots/<commit>/config.json
        raise RuntimeError(f"cannot pin model {repo!r} at revision {revision or 'main'}: the hub is unreachable "
                           f"({type(error).__name__}) and the Hugging Face cache has no snapshot of it") from error


def prepare_model(source: dict[str, Any], manifest_path: Path, converted: Path | None = None) -> dict[str, Any]:
    """Write the manifest for one model source (with its loading policy: trust_remote_code, allow_pickle).
    A converted GGUF folder (`converted`) is recorded relative to the manifest, so a results folder can be
    moved; a hub id is pinned to a commit."""
    policy = loading_policy(source)
    source = {key: value for key, value in source.items() if key not in LOADING_POLICY}
    if "gguf_package" in source:
        if converted is None:
            raise ValueError("a gguf_package model needs its converted folder (--converted)")
        manifest = {"load_from": os.path.relpath(converted, manifest_path.parent), "relative": True, "revision": None}
    elif "path" in source:
        manifest = {"load_from": source["path"], "relative": False, "revision": None}
    else:
        manifest = {"load_from": source["hub"], "relative": False,
                    "revision": pin_hub_revision(source["hub"], source.get("revision"))}
    manifest["source"] = source
    manifest.update(policy)
    write_json(manifest, manifest_path)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest, with a folder recorded relative to it made absolute."""
    path = Path(path)
    manifest = json.loads(path.read_text())
    if manifest.get("relative"):
        manifest["load_from"] = str((path.parent / manifest["load_from"]).resolve())
    return manifest


def load_tokenizer(manifest: dict[str, Any]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(manifest["load_from"], revision=manifest.get("revision"),
                                              trust_remote_code=loading_policy(manifest)["trust_remote_code"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(manifest: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """The causal LM in eval mode on `device`. On an accelerator the weights load straight onto it
    (device_map), never all at once into host memory (16 GB for an 8B model). Code shipped with the model
    runs only with trust_remote_code, and weights load from safetensors only, unless allow_pickle."""
    from transformers import AutoModelForCausalLM

    policy = loading_policy(manifest)
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            manifest["load_from"], revision=manifest.get("revision"), dtype=dtype, low_cpu_mem_usage=True,
            trust_remote_code=policy["trust_remote_code"], use_safetensors=None if policy["allow_pickle"] else True,
            **placement)
    except OSError as error:
        if policy["allow_pickle"] or "safetensors" not in str(error):
            raise
        raise UnsafeWeightsError(
            f"{manifest['load_from']}: no safetensors weights ({error}). Weights in pickle-based files "
            "(pytorch_model.bin) load only when the model's config sets allow_pickle: true") from None
    return model.to(device).eval()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks of a transformers causal LM (Llama/Gemma/Qwen/Mistral or GPT-2 style)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
