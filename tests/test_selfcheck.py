"""`dp-attn selfcheck`: runs every kernel family against the float64 reference and reports it;
a wrong kernel makes it fail."""

from __future__ import annotations

import json

import dp_attn.functional
from dp_attn.cli import main


def test_selfcheck_reports_every_kernel_within_tolerance(capsys):
    assert main(["selfcheck", "--device", "cpu", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[-1])
    assert report["backend"] == "triton (interpreter)"  # the real kernels, not the twin
    assert {row["kernel"] for row in report["checks"]} == {"flash_attention", "clipped linear"}
    assert all(row["ok"] for row in report["checks"])
    assert any(line.startswith("backend: triton (interpreter)") for line in lines)


def test_selfcheck_fails_on_a_wrong_kernel(monkeypatch, capsys):
    right = dp_attn.functional.clipped_grad_sum

    def off_by_a_little(*args, **kwargs):
        weight, bias = right(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(dp_attn.functional, "clipped_grad_sum", off_by_a_little)
    assert main(["selfcheck", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
