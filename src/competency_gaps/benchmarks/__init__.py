"""Benchmark adapters, by the name a config's `adapter:` key uses.

The registry maps names to "module:Class" so that validating a config (at Snakemake parse time)
needs no adapter imports.
"""

from __future__ import annotations

import importlib

from competency_gaps.benchmarks.base import Adapter

ADAPTERS: dict[str, str] = {
    "gsm8k": "competency_gaps.benchmarks.gsm8k:GSM8K",
    "social_iqa": "competency_gaps.benchmarks.social_iqa:SocialIQa",
    "bbq": "competency_gaps.benchmarks.bbq:BBQ",
    "winogrande": "competency_gaps.benchmarks.winogrande:WinoGrande",
    "agieval_en": "competency_gaps.benchmarks.agieval_en:AGIEvalEnglish",
    "logicbench": "competency_gaps.benchmarks.logicbench:LogicBench",
    "math": "competency_gaps.benchmarks.math:MATH",
    "natural_questions": "competency_gaps.benchmarks.natural_questions:NaturalQuestions",
    "crows_pairs": "competency_gaps.benchmarks.crows_pairs:CrowsPairs",
    "vectara": "competency_gaps.benchmarks.vectara:Vectara",
}


def get_adapter(name: str, options: dict | None = None) -> Adapter:
    """Instantiate the adapter registered under `name`."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown benchmark adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[name].split(":")
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    return adapter_class(options)
