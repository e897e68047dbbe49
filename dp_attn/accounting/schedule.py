"""Schedules: runs of (noise multiplier, sample rate, steps) read from CSV or JSON files.

CSV: one row per run, columns noise_multiplier, sample_rate, steps (a header row naming
them is optional). JSON: a list of objects with those keys, or of [z, q, steps] triples.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from dp_attn.accounting.steps import Step

COLUMNS = ("noise_multiplier", "sample_rate", "steps")


def parse_count(value: str | float | int, name: str = "steps") -> int:
    """A step count written as an integer or an integral float ("10000", "1e4", 1e4)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0 and number == math.floor(number)):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(number)


def _step(row: object, where: str) -> Step:
    if isinstance(row, dict):
        if set(row) != set(COLUMNS):
            raise ValueError(f"{where}: expected keys {', '.join(COLUMNS)}, got {sorted(row)}")
        row = [row[key] for key in COLUMNS]
    if not isinstance(row, list | tuple) or len(row) != 3:
        raise ValueError(f"{where}: expected noise_multiplier, sample_rate, steps, got {row!r}")
    try:
        z, q = float(row[0]), float(row[1])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: noise multiplier and sample rate must be numbers") from None
    try:
        return Step(z, q, parse_count(row[2]))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def read_schedule(path: str | Path) -> tuple[Step, ...]:
    """The runs of a schedule file, in order (JSON when the name ends in .json, else CSV)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of runs")
        numbered = list(enumerate(rows, 1))
    else:
        lines = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        lines = [[c.strip() for c in r] for r in lines]
        if lines and tuple(lines[0]) == COLUMNS:
            lines = lines[1:]
        numbered = list(enumerate(lines, 1))
    steps = tuple(_step(row, f"{path}: run {i}") for i, row in numbered)
    if not steps:
        raise ValueError(f"{path}: the schedule has no runs")
    return steps
