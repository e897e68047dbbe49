"""docs/opacus_migration.md: its runnable code blocks run, and its claims about what dp_attn
computes (the sampling rate, the divisor q·N, loss_reduction="sum") hold."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_attn import PrivacyEngine

PAGE = Path(__file__).resolve().parent.parent / "docs" / "opacus_migration.md"
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.DOTALL)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def test_runnable_blocks_run_in_order(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch twins: the kernels are slow here
    blocks = RUNNABLE.findall(PAGE.read_text())
    assert len(blocks) == 4
    namespace = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    assert namespace["engine"].stats.steps == 5  # 3 steps of the loop, 2 with physical batches
    assert "ε = " in capsys.readouterr().out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_release_is_the_sum_over_the_expected_batch_size(reduction):
    """N = 1000, batch_size = 64: q = 0.064 and the divisor is q·N = 64 (not Opacus's
    1 / len(loader) and int(N / len(loader)) = 62), for a mean loss and a summed loss alike.
    No noise, a threshold no example reaches: the release is Σ_i g_i / 64."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    loss = F.cross_entropy(model(x), y, reduction="sum")
    expected = torch.autograd.grad(loss, (model.weight, model.bias))

    engine = PrivacyEngine()
    dataset = TensorDataset(torch.zeros(1000, 8))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(dataset, batch_size=64), noise_multiplier=0.0,
        max_grad_norm=1e6, loss_reduction=reduction,
    )  # fmt: skip
    assert loader.sample_rate == pytest.approx(0.064)
    assert engine.state_dict()["settings"]["expected_batch_size"] == pytest.approx(64.0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    optimizer.step()
    for p, g in zip((model.weight, model.bias), expected, strict=True):
        torch.testing.assert_close(p.grad, g / 64, atol=1e-6, rtol=1e-5)
