"""compare.py's engine, after pytest-benchmark's split by concern.

- one module per report (`agreement`, `conventions`, ...): the child-process tasks it needs
  (`TASKS`, run by `reports.child` in the backend's process) and pure functions that turn backend
  results into rows, verdicts and Markdown (`run(session) -> Section`), testable with no child
  process and no framework;
- `child`: running one task of one backend in a child process;
- `render`: Markdown, plots, JSON-safe values, atomic writes;
- `store`: results.json / results.md (merging runs, interrupted runs);
- `session`: the orchestrator: validates the input before any backend starts and owns the one
  failure policy.

Adding a report is a module plus a line in ORDER. Importing this package imports no framework.

A report module provides:
    SUMMARY: str          one line for --help
    QUICK: str            what --quick changes in it (optional)
    NEEDS_DATA: bool      whether it reads Fashion-MNIST (validated up front if so)
    TASKS: dict           name -> fn(backend_module, args) run in the backend's child process
    run(session) -> Section
and optionally `validate(session)`, raising session.UsageError for bad input up front.
"""
from __future__ import annotations

import dataclasses
import importlib

ORDER = ("agreement", "conventions", "trajectory", "train", "speed", "precision", "port", "sync")
# --quick trains on at most this many images (the train report; the batch-size check uses it)
QUICK_TRAIN_LIMIT = 10_000


@dataclasses.dataclass
class Section:
    """What a report hands back: the JSON payload, its Markdown, the checks that failed (each a
    short line), the plot files it wrote (names inside the output directory) and the backends
    that could not take part, with why."""

    payload: dict
    markdown: str
    failures: list = dataclasses.field(default_factory=list)
    plots: list = dataclasses.field(default_factory=list)


def load(name: str):
    if name not in ORDER:
        raise ValueError(f"unknown report {name!r}; choose from {', '.join(ORDER)}")
    return importlib.import_module(f"reports.{name}")


def summaries() -> dict[str, str]:
    return {name: load(name).SUMMARY for name in ORDER}


def worst(values, start: float = 0.0) -> float:
    """The largest of `values` (and `start`), NaN if any is NaN: Python's max() would hide a
    NaN behind any number that comes first."""
    out = start
    for v in values:
        v = float(v)
        if v != v or out != out:
            return float("nan")
        out = max(out, v)
    return out


def within(err, tol) -> bool:
    """err <= tol, and False for NaN (the NaN-safe form of every verdict)."""
    return bool(err <= tol)
