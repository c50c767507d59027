"""Test-only hook: pause a pipeline job at a named point so a test can `kill -9` it (or run a second Snakemake
beside it) at a known moment. It lives here, not in the package: the crash tests put this folder on the jobs'
PYTHONPATH, and Python imports `sitecustomize` at start-up. Without the environment variable below it does nothing.

COMPETENCY_GAPS_PAUSE_POINTS is a JSON list of {"stage", "target", "after_calls"}: in a
`python -m competency_gaps <stage>` process, after the `after_calls`-th return of `target`
("package.module:function" or "package.module:Class.method") the process claims the marker file
`<COMPETENCY_GAPS_PAUSE_DIR>/<stage>.pid` (holding its pid) and waits: until it is killed, or until the file
`<stage>.release` appears. A stage whose marker already exists is not paused again, so the same command can
be rerun with the same environment and each stage pauses exactly once.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

POINTS_VARIABLE = "COMPETENCY_GAPS_PAUSE_POINTS"
DIR_VARIABLE = "COMPETENCY_GAPS_PAUSE_DIR"


def current_stage() -> str | None:
    """The stage of a `python -m competency_gaps <stage> …` process, else None."""
    argv = getattr(sys, "orig_argv", [])
    if "competency_gaps" in argv:
        index = argv.index("competency_gaps")
        return argv[index + 1] if index + 1 < len(argv) else None
    return None


def claim_marker(folder: Path, stage: str) -> bool:
    """Create `<stage>.pid` with this pid, atomically; False when an earlier run already claimed it."""
    staging = folder / f".{stage}.{os.getpid()}"
    staging.write_text(str(os.getpid()))
    try:
        os.link(staging, folder / f"{stage}.pid")
        return True
    except FileExistsError:
        return False
    finally:
        staging.unlink()


def pause(folder: Path, stage: str) -> None:
    if not claim_marker(folder, stage):
        return
    while not (folder / f"{stage}.release").exists():
        time.sleep(0.1)


def paused_after(function, calls: int, folder: Path, stage: str):
    count = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal count
        result = function(*args, **kwargs)
        count += 1
        if count == calls:
            pause(folder, stage)
        return result

    return wrapper


def patch(module, qualified_name: str, calls: int, folder: Path, stage: str) -> None:
    owner_path, _, name = qualified_name.rpartition(".")
    owner = module
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    setattr(owner, name, paused_after(getattr(owner, name), calls, folder, stage))


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch each target right after its module has executed, before anyone imports names from it."""

    def __init__(self, targets: dict[str, list[tuple[str, int]]], folder: Path, stage: str):
        self.targets, self.folder, self.stage = targets, folder, stage

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            for qualified_name, calls in self.targets[fullname]:
                patch(module, qualified_name, calls, self.folder, self.stage)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    points, folder, stage = os.environ.get(POINTS_VARIABLE), os.environ.get(DIR_VARIABLE), current_stage()
    if not points or not folder or stage is None:
        return
    targets: dict[str, list[tuple[str, int]]] = {}
    for point in json.loads(points):
        if point["stage"] == stage:
            module, _, qualified_name = point["target"].partition(":")
            targets.setdefault(module, []).append((qualified_name, int(point.get("after_calls", 1))))
    if targets:
        sys.meta_path.insert(0, PatchOnImport(targets, Path(folder), stage))


install()
