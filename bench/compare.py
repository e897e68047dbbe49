"""Compare pytest-benchmark runs with the last committed results of the same GPU.

    python bench/compare.py NEW.json [NEW.json ...] [--baseline OLD.json | --baseline-dir DIR]
                            [--margin 0.10]

Benchmarks are matched by fullname, and only against results measured on a GPU of the same
name (machine_info["gpu"], written by bench/conftest.py): timings of different GPUs say
nothing about each other. With --baseline-dir (default: bench/results beside this script)
every benchmark is compared with its most recent result on that GPU (the JSON's "datetime").

Per benchmark the compared number is the extra_info "tflops" when both runs have it (higher is
better; it stays comparable when a benchmark changes how many calls it times per round), else
the median time (lower is better). A table of new/old ratios is printed per run.

Exit status: 1 when some benchmark is slower than its baseline by more than the margin
(new median > old median * (1 + margin), or new TFLOP/s < old TFLOP/s / (1 + margin)); 0
otherwise, also when there is no baseline for the GPU (which is said); 2 for bad arguments or
files that are not pytest-benchmark JSON.

The default margin is 10%. Medians of the same GPU kernel on the same machine move by a few
percent between runs: boost clocks follow temperature and power draw, Triton's autotuner can
pick a different one of two near-equal configurations, and the suites take only 5-10 rounds
per benchmark. 10% sits above that spread, while the regressions worth stopping a merge for
(a lost tile configuration, an extra pass over memory, a fall-back to the reference path)
cost 20% to several times. The margin applies to each of a few hundred benchmarks, so a lone
case just past it is more likely noise than one that repeats on a re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_MARGIN = 0.10
# extra_info numbers where higher is better, preferred over the median time when both runs
# have them
HIGHER_IS_BETTER = ("tflops",)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class InvalidResults(ValueError):
    """A file that is not a readable pytest-benchmark JSON file."""


@dataclass(frozen=True)
class Measurement:
    median_s: float
    rates: dict[str, float]  # the HIGHER_IS_BETTER numbers of its extra_info


@dataclass(frozen=True)
class Run:
    """One pytest-benchmark JSON file."""

    path: Path
    gpu: str | None
    when: datetime
    software: str
    commit: str
    benchmarks: dict[str, Measurement]  # by fullname

    def describe(self) -> str:
        return (
            f"{self.path.name}: {self.gpu or 'no GPU'}; {self.software}; "
            f"{self.when:%Y-%m-%d %H:%M} UTC; commit {self.commit}"
        )


@dataclass(frozen=True)
class Comparison:
    name: str
    metric: str
    old: float
    new: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        return self.new / self.old

    @property
    def slowdown(self) -> float:
        """How many times longer the new run takes (above 1: slower)."""
        return 1 / self.ratio if self.higher_is_better else self.ratio


SUMMARY_NAME = re.compile(r"\d{4}-\d{2}-\d{2}-.+\.json$")


def _positive(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def load_run(path: Path) -> Run:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidResults(f"{path}: cannot read it as JSON ({error})") from error
    if not (
        isinstance(data, dict)
        and isinstance(data.get("machine_info"), dict)
        and isinstance(data.get("benchmarks"), list)
    ):
        raise InvalidResults(
            f"{path}: not a pytest-benchmark JSON file (expected 'machine_info' and 'benchmarks')"
        )
    try:
        when = datetime.fromisoformat(data["datetime"])
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidResults(f"{path}: expected an ISO date and time in 'datetime'") from error
    if when.tzinfo is None:  # older pytest-benchmark versions wrote naive UTC times
        when = when.replace(tzinfo=timezone.utc)
    benchmarks = {}
    for entry in data["benchmarks"]:
        try:
            name, median, extra = entry["fullname"], entry["stats"]["median"], entry["extra_info"]
        except (KeyError, TypeError) as error:
            raise InvalidResults(
                f"{path}: every benchmark needs 'fullname', 'stats.median' and 'extra_info'"
            ) from error
        if not isinstance(extra, dict):
            raise InvalidResults(f"{path}: {name} has extra_info {extra!r}, expected a mapping")
        if not _positive(median):
            raise InvalidResults(f"{path}: {name} has median {median!r}, expected seconds > 0")
        rates = {key: extra[key] for key in HIGHER_IS_BETTER if _positive(extra.get(key))}
        benchmarks[name] = Measurement(median, rates)
    info = data["machine_info"]
    software = ", ".join(f"{lib} {info.get(lib) or '?'}" for lib in ("torch", "triton", "cuda"))
    commit_info = data.get("commit_info") or {}
    commit = str(commit_info.get("id") or "unknown")[:12]
    return Run(path, info.get("gpu"), when.astimezone(timezone.utc), software, commit, benchmarks)


def latest_on_gpu(baselines: list[Run], gpu: str) -> dict[str, tuple[Run, Measurement]]:
    """Every benchmark's most recent result measured on `gpu`."""
    latest: dict[str, tuple[Run, Measurement]] = {}
    for run in sorted((run for run in baselines if run.gpu == gpu), key=lambda run: run.when):
        for name, measurement in run.benchmarks.items():
            latest[name] = (run, measurement)
    return latest


def compare(name: str, old: Measurement, new: Measurement) -> Comparison:
    for metric in HIGHER_IS_BETTER:
        if metric in old.rates and metric in new.rates:
            return Comparison(name, metric, old.rates[metric], new.rates[metric], True)
    return Comparison(name, "median ms", old.median_s * 1e3, new.median_s * 1e3, False)


def verdict(comparison: Comparison, margin: float) -> str:
    if comparison.slowdown > 1 + margin:
        return "REGRESSION"
    return "faster" if comparison.slowdown < 1 / (1 + margin) else ""


def _test_file(name: str) -> str:
    return name.split("::", 1)[0]


def report(new: Run, baselines: list[Run], where: str, margin: float) -> list[Comparison]:
    """Print how `new` compares with its baselines; return the comparisons made."""
    print(f"\n== {new.describe()}")
    if new.gpu is None:
        print("this run names no GPU (machine_info 'gpu' is missing or null): nothing compared")
        return []
    if not new.benchmarks:
        print("no benchmarks in this run (all skipped?): nothing compared")
        return []
    latest = latest_on_gpu(baselines, new.gpu)
    if not latest:
        others = sorted({str(run.gpu) for run in baselines})
        print(
            f"no baseline for GPU {new.gpu!r} in {where} (results there are for: "
            f"{', '.join(others) or 'none'}): nothing compared, passing"
        )
        return []

    comparisons = [
        compare(name, latest[name][1], measurement)
        for name, measurement in new.benchmarks.items()
        if name in latest
    ]
    used = {latest[c.name][0].path: latest[c.name][0] for c in comparisons}
    for run in sorted(used.values(), key=lambda run: run.when):
        print(f"baseline {run.describe()}")
        if run.software != new.software:
            print("  note: other software versions than this run; the ratios include that change")
    width = max((len(c.name) for c in comparisons), default=0)
    if comparisons:
        print(f"{'benchmark':<{width}}  {'metric':>9}  {'old':>10}  {'new':>10}  {'new/old':>7}")
    verdicts = [verdict(c, margin) for c in comparisons]
    for c, says in zip(comparisons, verdicts, strict=True):
        print(
            f"{c.name:<{width}}  {c.metric:>9}  {c.old:10.4g}  {c.new:10.4g}  "
            f"{c.ratio:7.3f}  {says}".rstrip()
        )
    print(
        f"{len(comparisons)} compared: {verdicts.count('REGRESSION')} slower and "
        f"{verdicts.count('faster')} faster by more than {margin:.0%}"
    )
    unmatched = sorted(set(new.benchmarks) - set(latest))
    if unmatched:
        print(f"{len(unmatched)} without a baseline on this GPU (new benchmarks?):")
        print("\n".join(f"  {name}" for name in unmatched))
    # baseline benchmarks of the test files this run ran that it did not record
    files = {_test_file(name) for name in new.benchmarks}
    vanished = sorted(
        name for name in latest if name not in new.benchmarks and _test_file(name) in files
    )
    if vanished:
        print(f"{len(vanished)} in the baseline but not in this run (skipped, out of memory?):")
        print("\n".join(f"  {name}" for name in vanished))
    return comparisons


def _margin(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a fraction >= 0 such as 0.1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare pytest-benchmark JSON files with earlier results of the same GPU; "
        "exit 1 on a slowdown beyond the margin."
    )
    parser.add_argument("new", nargs="+", type=Path, help="pytest-benchmark JSON of this run")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--baseline", type=Path, help="one pytest-benchmark JSON to compare with")
    source.add_argument(
        "--baseline-dir",
        type=Path,
        default=RESULTS_DIR,
        help="folder of committed results; each benchmark's latest on the same GPU is used "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--margin",
        type=_margin,
        default=DEFAULT_MARGIN,
        help="allowed slowdown as a fraction (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    try:
        runs = [load_run(path) for path in args.new]
        if args.baseline is not None:
            where, paths = str(args.baseline), [args.baseline]
        elif args.baseline_dir.is_dir():
            mine = {path.resolve() for path in args.new}
            where = str(args.baseline_dir)
            # Not the run summaries of bench/gpu_summary.py (<date>-<gpu>.json) beside them.
            paths = [
                p
                for p in sorted(args.baseline_dir.glob("*.json"))
                if p.resolve() not in mine and not SUMMARY_NAME.match(p.name)
            ]
        else:
            where, paths = f"{args.baseline_dir} (no such folder)", []
        baselines = [load_run(path) for path in paths]
    except InvalidResults as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    comparisons = [c for run in runs for c in report(run, baselines, where, args.margin)]
    regressions = [c for c in comparisons if verdict(c, args.margin) == "REGRESSION"]
    if regressions:
        print(
            f"\nFAIL: {len(regressions)} benchmark(s) slower than their baseline by more than "
            f"{args.margin:.0%}:"
        )
        for c in regressions:
            print(f"  {c.name}: {c.metric} {c.old:.4g} -> {c.new:.4g} ({c.slowdown - 1:+.1%} time)")
        return 1
    print(
        f"\nOK: {len(comparisons)} benchmark(s) compared, none slower than its baseline by more "
        f"than {args.margin:.0%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
