"""Benchmark adapters, by the name a config's `adapter:` key uses.

The registry maps names to "module:Class" so that validating a config (at Snakemake parse time)
needs no adapter imports.
"""

from __future__ import annotations

import importlib

from competency_gaps.benchmarks.base import Adapter

ADAPTERS: dict[str, str] = {
    "gsm8k": "competency_gaps.benchmarks.gsm8k:GSM8K",
}


def get_adapter(name: str, options: dict | None = None) -> Adapter:
    """Instantiate the adapter registered under `name`."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown benchmark adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[name].split(":")
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    return adapter_class(options)
