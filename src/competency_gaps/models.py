"""Model sources (packaged GGUF, Hugging Face hub id, local folder), conversion and loading.

Each model gets a small manifest (results/models/model=<slug>/manifest.json) written by the
`prepare_model` rule: it says which folder or hub id `from_pretrained` should read. A packaged GGUF is
converted once into a safetensors folder there, because de-quantising it costs ~20 s per load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from competency_gaps.config import gguf_file
from competency_gaps.tables import write_json

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~10x slower there), bfloat16 on accelerators, unless configured."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def convert_gguf(package: str, file: str | None, out_dir: Path) -> Path:
    """De-quantise a packaged GGUF into a transformers safetensors folder (model + tokenizer)."""
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


def prepare_model(source: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    """Write the manifest for one model source, converting a packaged GGUF first."""
    if "gguf_package" in source:
        folder = convert_gguf(source["gguf_package"], source.get("file"), manifest_path.parent / "hf")
        manifest = {"load_from": str(folder.resolve()), "revision": None, "source": source}
    elif "path" in source:
        manifest = {"load_from": str(Path(source["path"]).resolve()), "revision": None, "source": source}
    else:
        manifest = {"load_from": source["hub"], "revision": source.get("revision"), "source": source}
    write_json(manifest, manifest_path)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_tokenizer(manifest: dict[str, Any]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(manifest["load_from"], revision=manifest.get("revision"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(manifest: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """The causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(manifest["load_from"], revision=manifest.get("revision"), dtype=dtype)
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
