"""bench/compare.py on synthetic pytest-benchmark JSON files (CPU only, no benchmark is run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
_spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up there
_spec.loader.exec_module(compare)

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
ATTN = "bench/test_attention.py::test_attention_tflops[ours-fwd-dense-1024-128]"
SDPA = "bench/test_attention.py::test_attention_tflops[sdpa-flash-fwd-dense-1024-128]"
STEP = "bench/test_training_step.py::test_training_step[ours_flat-T1024]"


def write_run(path, benchmarks, gpu=H100, when="2026-11-01T12:00:00+00:00", torch="2.11.0"):
    """A pytest-benchmark JSON file; `benchmarks` maps fullname to a median in seconds or to
    (median, tflops)."""
    entries = []
    for name, value in benchmarks.items():
        median, tflops = value if isinstance(value, tuple) else (value, None)
        extra = {} if tflops is None else {"tflops": tflops, "provider": "ours"}
        entries.append(
            {
                "group": None,
                "name": name.split("::")[1],
                "fullname": name,
                "params": {},
                "extra_info": extra,
                "options": {"timer": "perf_counter"},
                "stats": {
                    "min": median * 0.95,
                    "max": median * 1.1,
                    "median": median,
                    "mean": median,
                    "rounds": 5,
                    "iterations": 1,
                },
            }
        )
    data = {
        "machine_info": {"node": "gpu-1", "gpu": gpu, "torch": torch, "triton": "3.6.0",
                         "cuda": "12.8"},
        "commit_info": {"id": "0123456789abcdef0123", "dirty": False},
        "benchmarks": entries,
        "datetime": when,
        "version": "5.3.1",
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def results(tmp_path):
    """A results folder holding one committed H100 attention run and one training-step run."""
    folder = tmp_path / "results"
    write_run(folder / "h100_2026-11-01_attention.json", {ATTN: (1e-3, 400.0), SDPA: 2e-3})
    write_run(folder / "h100_2026-11-01_training_step.json", {STEP: 0.5})
    return folder


def run_main(capsys, *argv):
    code = compare.main([str(a) for a in argv])
    return code, capsys.readouterr().out


def table_row(out, name):
    """The cells after the benchmark's name in its row of the printed table."""
    (row,) = [line.split()[1:] for line in out.splitlines() if line.split()[:1] == [name]]
    return row


def test_pass_within_margin(tmp_path, results, capsys):
    # 5% fewer TFLOP/s, 8% more time, the training step unchanged: all within 10%
    new = write_run(tmp_path / "new.json", {ATTN: (1.05e-3, 380.0), SDPA: 2.16e-3})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert "2 compared: 0 slower and 0 faster" in out
    assert table_row(out, ATTN) == ["tflops", "400", "380", "0.950"]
    assert table_row(out, SDPA) == ["median", "ms", "2", "2.16", "1.080"]
    # the training-step baseline belongs to a suite this run did not run: not reported missing
    assert STEP not in out


def test_regression_fails_and_is_listed(tmp_path, results, capsys):
    new = write_run(tmp_path / "new.json", {ATTN: (1e-3, 400.0), SDPA: 2.5e-3})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 1
    assert table_row(out, SDPA) == ["median", "ms", "2", "2.5", "1.250", "REGRESSION"]
    assert "FAIL: 1 benchmark(s)" in out
    assert f"  {SDPA}: median ms 2 -> 2.5 (+25.0% time)" in out


def test_tflops_is_preferred_over_the_median(tmp_path, results, capsys):
    # same median but 20% fewer TFLOP/s (e.g. more calls per round): a regression in TFLOP/s
    new = write_run(tmp_path / "new.json", {ATTN: (1e-3, 320.0)})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 1
    assert "tflops 400 -> 320 (+25.0% time)" in out
    # and 20% more TFLOP/s at a longer median is no regression
    new = write_run(tmp_path / "new.json", {ATTN: (2e-3, 480.0)})
    assert run_main(capsys, new, "--baseline-dir", results)[0] == 0


def test_improvement_passes(tmp_path, results, capsys):
    new = write_run(tmp_path / "new.json", {ATTN: (0.5e-3, 800.0), SDPA: 1.5e-3})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert "2 compared: 0 slower and 2 faster" in out
    assert table_row(out, ATTN) == ["tflops", "400", "800", "2.000", "faster"]


def test_other_gpu_is_not_compared(tmp_path, results, capsys):
    new = write_run(tmp_path / "new.json", {ATTN: (1e-2, 40.0), SDPA: 2e-2}, gpu=A100)
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert f"no baseline for GPU '{A100}'" in out
    assert f"results there are for: {H100}" in out
    assert "OK: 0 benchmark(s) compared" in out


def test_explicit_baseline_of_other_gpu_is_not_compared(tmp_path, capsys):
    old = write_run(tmp_path / "old.json", {SDPA: 1e-3}, gpu=A100)
    new = write_run(tmp_path / "new.json", {SDPA: 5e-3})
    code, out = run_main(capsys, new, "--baseline", old)
    assert code == 0
    assert f"no baseline for GPU '{H100}' in {old}" in out


def test_missing_baseline_passes(tmp_path, capsys):
    new = write_run(tmp_path / "new.json", {ATTN: (1e-3, 400.0)})
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "absent"):
        code, out = run_main(capsys, new, "--baseline-dir", folder)
        assert code == 0
        assert "no baseline for GPU" in out
        assert "nothing compared, passing" in out
    assert "(no such folder)" in out


def test_benchmarks_in_only_one_run_are_listed_not_failed(tmp_path, results, capsys):
    added = ATTN.replace("1024-128", "2048-128")
    new = write_run(tmp_path / "new.json", {ATTN: (1e-3, 400.0), added: (1e-3, 1.0)})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert f"1 without a baseline on this GPU (new benchmarks?):\n  {added}" in out
    assert f"1 in the baseline but not in this run (skipped, out of memory?):\n  {SDPA}" in out


def test_latest_result_of_the_gpu_is_the_baseline(tmp_path, results, capsys):
    # a later run made the step faster (0.5 s -> 0.3 s); 0.4 s is a regression against that
    write_run(results / "h100_2026-11-10_training_step.json", {STEP: 0.3}, when="2026-11-10")
    write_run(
        results / "a100_2026-11-20_training_step.json",
        {STEP: 0.4},
        gpu=A100,
        when="2026-11-20T00:00:00",
    )
    new = write_run(tmp_path / "new.json", {STEP: 0.4}, when="2026-11-23T08:00:00+00:00")
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 1
    assert "baseline h100_2026-11-10_training_step.json" in out
    assert "h100_2026-11-01_training_step.json" not in out
    assert "median ms 300 -> 400 (+33.3% time)" in out


def test_latest_is_decided_by_the_recorded_datetime_not_the_file_name(tmp_path, results, capsys):
    # a file whose name sorts last but which was measured first is not the baseline
    write_run(results / "h100_2026-12-31_training_step.json", {STEP: 0.3}, when="2026-10-01")
    new = write_run(tmp_path / "new.json", {STEP: 0.475})
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert table_row(out, STEP) == ["median", "ms", "500", "475", "0.950"]


def test_new_file_inside_the_results_folder_is_not_its_own_baseline(results, capsys):
    new = write_run(
        results / "h100_2026-11-23_training_step.json",
        {STEP: 0.6},
        when="2026-11-23T08:00:00+00:00",
    )
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 1
    assert "median ms 500 -> 600 (+20.0% time)" in out


@pytest.mark.parametrize(("margin", "expected"), [("0.1", 1), ("0.2", 0), ("0", 1)])
def test_margin(tmp_path, results, capsys, margin, expected):
    new = write_run(tmp_path / "new.json", {STEP: 0.575})  # 15% slower
    assert run_main(capsys, new, "--baseline-dir", results, "--margin", margin)[0] == expected


def test_other_software_versions_are_noted(tmp_path, results, capsys):
    new = write_run(tmp_path / "new.json", {STEP: 0.5}, torch="2.12.0")
    code, out = run_main(capsys, new, "--baseline-dir", results)
    assert code == 0
    assert "note: other software versions than this run" in out


def test_run_without_gpu_or_benchmarks_compares_nothing(tmp_path, results, capsys):
    cpu = write_run(tmp_path / "cpu.json", {STEP: 5.0}, gpu=None)
    skipped = write_run(tmp_path / "skipped.json", {})
    code, out = run_main(capsys, cpu, skipped, "--baseline-dir", results)
    assert code == 0
    assert "this run names no GPU" in out
    assert "no benchmarks in this run (all skipped?)" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read it as JSON"),
        ('{"benchmarks": []}', "not a pytest-benchmark JSON file"),
        ('{"machine_info": {}, "benchmarks": []}', "expected an ISO date and time in 'datetime'"),
        (
            '{"machine_info": {}, "benchmarks": [{"fullname": "a::b"}], "datetime": "2026-11-01"}',
            "every benchmark needs 'fullname', 'stats.median' and 'extra_info'",
        ),
        (
            '{"machine_info": {}, "datetime": "2026-11-01", "benchmarks": '
            '[{"fullname": "a::b", "stats": {"median": 0}, "extra_info": {}}]}',
            "a::b has median 0, expected seconds > 0",
        ),
    ],
)
def test_bad_files_are_refused(tmp_path, results, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert compare.main([str(bad), "--baseline-dir", str(results)]) == 2
    assert message in capsys.readouterr().err
    # a bad committed result is refused too
    good = write_run(tmp_path / "new.json", {STEP: 0.5})
    assert compare.main([str(good), "--baseline", str(bad)]) == 2


@pytest.mark.parametrize("margin", ["-0.1", "nan", "ten"])
def test_bad_margin_is_refused(tmp_path, capsys, margin):
    new = write_run(tmp_path / "new.json", {STEP: 0.5})
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(new), "--margin", margin])
    assert exit_info.value.code == 2
    assert "--margin" in capsys.readouterr().err


def test_command_line_exit_status(tmp_path):
    old = write_run(tmp_path / "old.json", {STEP: 0.5})
    new = write_run(tmp_path / "new.json", {STEP: 0.7})
    command = [sys.executable, str(SCRIPT), str(new), "--baseline", str(old), "--margin", "0.10"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{STEP}: median ms 500 -> 700 (+40.0% time)" in done.stdout
