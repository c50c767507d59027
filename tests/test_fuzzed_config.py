"""Fuzzed configs (property-based): an unknown key, a value of another type or a deleted key anywhere in a full
config is either a valid config or a ConfigError naming the key (never another exception), and Snakemake refuses
such a config while parsing the workflow, before any job."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from competency_gaps.config import ConfigError, key_path, validate_config
from conftest import REPO, tally_printer

TALLY: Counter = Counter()
# Containers whose keys the schema leaves open (adapter options, hub arguments, score-import options).
FREE_FORM = {"options", "hub", "scores_from"}
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


print_tally = tally_printer("fuzzed-config", TALLY, "mutation")


@pytest.fixture(scope="module")
def full_config(tiny_model_dir, random_sae_dirs) -> dict:
    """A valid config with every default filled in, so the fuzzer reaches every key."""
    return validate_config({
        "models": {"tiny": {"source": {"path": str(tiny_model_dir)},
                            "layers": [{"layer": 1, "sae": {"path": str(random_sae_dirs[1])}},
                                       {"layer": 2, "sae": {"train": {"d_sae": 64}}}]}},
        "benchmarks": {"gsm8k": {"adapter": "gsm8k", "data_dir": str(REPO)},
                       "probe_arithmetic": {"adapter": "probe_arithmetic", "options": {"n": 5}}},
    })


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path below `value` (dict keys and list indices)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found.append(prefix + (key,))
        found += paths(child, prefix + (key,))
    return found


def container_paths(config: dict) -> list[tuple]:
    return [()] + [path for path in paths(config) if isinstance(lookup(config, path), dict)]


def lookup(config: Any, path: tuple) -> Any:
    for key in path:
        config = config[key]
    return config


def named_keys(message: str) -> set[str]:
    return set(re.findall(r"config key '([^']*)'", message))


def outcome_of(config: dict) -> str | None:
    """None when the config is valid, else the ConfigError's message (any other exception fails the test)."""
    try:
        validate_config(config)
    except ConfigError as error:
        return str(error)
    return None


def ancestors(path: tuple) -> set[str]:
    return {key_path(list(path[:n])) for n in range(len(path) + 1)}


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_an_unknown_key_is_refused_naming_where_it_is(full_config, data):
    config = copy.deepcopy(full_config)
    where = data.draw(st.sampled_from(container_paths(config)))
    name = data.draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(lambda n: n not in lookup(config, where)))
    lookup(config, where)[name] = data.draw(ANY_VALUE)
    message = outcome_of(config)
    if message is None:
        assert FREE_FORM & set(where), f"unknown key {name!r} accepted at {key_path(list(where))}"
        TALLY[("unknown key in an open container", "accepted")] += 1
        return
    own = key_path([*where, name])  # in a map of named entries (models, benchmarks) the key is a new entry
    names_it = (key_path(list(where)) in named_keys(message) and f"'{name}' was unexpected" in message) or any(
        key == own or key.startswith((own + ".", own + "[")) for key in named_keys(message))
    assert names_it, message
    TALLY[("unknown key", "ConfigError naming the key")] += 1


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_value_of_another_type_is_valid_or_refused_naming_its_key(full_config, data):
    config = copy.deepcopy(full_config)
    path = data.draw(st.sampled_from(paths(config)))
    original = lookup(config, path)
    value = data.draw(ANY_VALUE.filter(lambda v: type(v) is not type(original)))
    lookup(config, path[:-1])[path[-1]] = value
    message = outcome_of(config)
    if message is None:
        TALLY[("value of another type", "accepted (the schema allows that type there)")] += 1
        return
    assert named_keys(message) & ancestors(path), f"{key_path(list(path))} = {value!r}: {message}"
    TALLY[("value of another type", "ConfigError naming the key or its parent")] += 1


@given(data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_deleted_key_is_refilled_or_refused_naming_its_parent(full_config, data):
    config = copy.deepcopy(full_config)
    path = data.draw(st.sampled_from([p for p in paths(config) if isinstance(lookup(config, p[:-1]), dict)]))
    del lookup(config, path[:-1])[path[-1]]
    message = outcome_of(config)
    if message is None:
        TALLY[("deleted key", "accepted (default filled in)")] += 1
        return
    assert named_keys(message) & ancestors(path), f"deleting {key_path(list(path))}: {message}"
    TALLY[("deleted key", "ConfigError naming the key or its parent")] += 1


@pytest.mark.parametrize(("change", "key", "says"), [
    (lambda c: c["benchmarks"]["gsm8k"].update(max_new_tokens=6.0), "benchmarks.gsm8k.max_new_tokens", "not of type 'integer'"),
    (lambda c: c["benchmarks"]["gsm8k"].update(template="gsm9k"), "benchmarks.gsm8k.template", "no prompt template named 'gsm9k'"),
    (lambda c: c["benchmarks"]["probe_arithmetic"]["options"].update(digits=[0]), "benchmarks.probe_arithmetic.options",
     "'digits' must be integers 1-18"),
    (lambda c: c["labels"].update(llm={"backend": "openai", "model": "m", "temprature": 0}), "labels.llm", "temprature"),
    (lambda c: c["labels"].update(llm={"backend": "telepathy", "model": "m"}), "labels.llm", "backend must be one of"),
])
def test_values_only_a_job_would_have_tripped_on_are_refused_naming_the_key(full_config, change, key, says):
    config = copy.deepcopy(full_config)
    change(config)
    message = outcome_of(config)
    assert message is not None and key in named_keys(message) and says in message, message
    TALLY[("value a job would have failed on", "ConfigError naming the key")] += 1


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["gaps"].update(min_suport=2), "gaps"),
    (lambda c: c["models"]["tiny"].update(batch_size=[8]), "models.tiny.batch_size"),
    (lambda c: c["benchmarks"]["gsm8k"].update(malformed="ignore"), "benchmarks.gsm8k.malformed"),
])
def test_snakemake_refuses_a_fuzzed_config_before_any_job(full_config, tmp_path, change, key):
    config = copy.deepcopy(full_config)
    change(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1"],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert re.search(rf"\b{re.escape(key)}\b", run.stdout + run.stderr), run.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / ".snakemake" / "incomplete").exists()
    TALLY[("fuzzed config given to snakemake", "refused at parse time, no job")] += 1
