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
    "probe_arithmetic": "competency_gaps.benchmarks.probes:ArithmeticProbe",
    "probe_palindrome": "competency_gaps.benchmarks.probes:PalindromeProbe",
    "probe_dates": "competency_gaps.benchmarks.probes:DateProbe",
    "probe_letter_count": "competency_gaps.benchmarks.probes:LetterCountProbe",
    "generic": "competency_gaps.benchmarks.generic:Generic",
}


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class registered under `name` (its module is imported on first use)."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown benchmark adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_adapter(name: str, options: dict | None = None) -> Adapter:
    """Instantiate the adapter registered under `name`."""
    return adapter_class(name)(options)
