"""torch.autocast around the forward (issue 12): every DP layer and the attention run in the
autocast dtype, norms and clipped sums accumulate in fp32, and the released gradient matches
the fp32 run (itself equal to the torch.func oracle, tests/test_engine.py) within the 16-bit
tolerance; a float64 model is refused naming its module and dtype."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_attn.engine import PrivacyEngine
from tests.tiny_models import example_losses, make_batch, make_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def released(model, style, autocast_dtype=None, max_grad_norm=0.05, device="cpu"):
    engine = PrivacyEngine()
    loader = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=4)
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        clipping=style,
    )
    ids, targets, mask = (t.to(device) for t in make_batch(batch=4, padded=True))
    optimizer.zero_grad()
    with torch.autocast(
        device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        logits = model(ids, mask)
    example_losses(logits.float(), targets).mean().backward()
    optimizer.step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_autocast_release_matches_fp32(style, dtype):
    model = make_model()
    want = released(copy.deepcopy(model), style)
    got = released(copy.deepcopy(model), style, autocast_dtype=dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        scale = want[name].abs().max()
        assert (g - want[name]).abs().max() <= tol * scale + 1e-6, name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_release_matches_fp32(dtype):
    """The same on a GPU, through the compiled kernels (never run here: no GPU was lent)."""
    model = make_model().cuda()
    want = released(copy.deepcopy(model), "flat", device="cuda")
    got = released(copy.deepcopy(model), "flat", autocast_dtype=dtype, device="cuda")
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        assert (g - want[name]).abs().max() <= tol * want[name].abs().max() + 1e-6, name


def test_float64_model_is_refused_naming_module_and_dtype():
    model = nn.Sequential(nn.Linear(4, 4)).double()
    engine = PrivacyEngine()
    with pytest.raises(TypeError, match=r"0.*float64"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
