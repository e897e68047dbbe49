"""docs/opacus_migration.md: its runnable code blocks run, and its claims about what dp_attn
computes (the sampling rate, the divisor q·N, loss_reduction="sum") hold."""

import math
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
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(dataset, batch_size=64),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        loss_reduction=reduction,
    )
    assert loader.sample_rate == pytest.approx(0.064)
    assert engine.state_dict()["settings"]["expected_batch_size"] == pytest.approx(64.0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    optimizer.step()
    for p, g in zip((model.weight, model.bias), expected, strict=True):
        torch.testing.assert_close(p.grad, g / 64, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- Opacus' spellings (issue 12)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def make_private(engine=None, model=None, **kwargs):
    engine = engine or PrivacyEngine()
    model = model or tiny()
    kwargs = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, **kwargs}
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(16, 8)), batch_size=4),
        **kwargs,
    )
    return engine, out


def test_gdp_accountant_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match=r"'gdp'.*not an upper bound.*'prv'.*'rdp'"):
        PrivacyEngine(accountant="gdp")


@pytest.mark.parametrize(
    ("engine_mode", "call_mode", "used"),
    [(None, None, True), (False, None, False), (False, True, True), (True, False, False)],
)
def test_secure_mode_engine_default_and_make_private_override(engine_mode, call_mode, used):
    """PrivacyEngine(secure_mode=) is the default (secure unless turned off there);
    make_private(secure_mode=) overrides it."""
    engine = PrivacyEngine() if engine_mode is None else PrivacyEngine(secure_mode=engine_mode)
    extra = {} if call_mode is None else {"secure_mode": call_mode}
    engine, _ = make_private(engine, **extra)
    assert engine.state_dict()["settings"]["secure_mode"] is used


def test_engine_secure_mode_must_be_a_bool():
    with pytest.raises(TypeError, match="secure_mode must be a bool"):
        PrivacyEngine(secure_mode="yes")


def test_per_layer_spelling_and_per_parameter_list():
    """clipping="per_layer" is "per-layer"; a list gives one threshold per trainable parameter
    (module.parameters() order), and each DP layer is clipped to sqrt(Σ C_p²) of its own:
    C_tot = sqrt(Σ C_p²), Opacus' noise scale."""
    per_parameter = [3.0, 4.0, 1.0, 2.0, 0.5, 0.5]  # 0.weight, 0.bias, 1.weight, ...
    engine, _ = make_private(clipping="per_layer", max_grad_norm=per_parameter)
    layer_thresholds = list(engine._clipper.layer_thresholds.values())  # 0, 1 and 3, in order
    assert layer_thresholds == pytest.approx([5.0, math.sqrt(5.0), math.sqrt(0.5)])
    assert engine._total_threshold == pytest.approx(math.sqrt(sum(c * c for c in per_parameter)))
    assert engine.state_dict()["settings"]["clipping"] == "per-layer"
    assert engine.state_dict()["settings"]["max_grad_norm"] == per_parameter


def test_per_parameter_list_clips_each_layer_to_its_combined_threshold():
    """No noise: one example; each layer's released gradient is clipped to its own sqrt(Σ C_p²)."""
    model = nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 2))
    x, y = torch.randn(1, 8) * 10, torch.tensor([1])
    per_parameter = [0.03, 0.04, 0.3, 0.4]  # layer thresholds 0.05 and 0.5
    _, (model, optimizer, _) = make_private(
        model=model, clipping="per_layer", max_grad_norm=per_parameter
    )
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for layer, bound in ((model[0], 0.05), (model[1], 0.5)):
        norm = torch.sqrt(layer.weight.grad.square().sum() + layer.bias.grad.square().sum())
        assert float(norm) * 4 == pytest.approx(bound, rel=1e-4)  # released = clipped sum / q·N


def test_per_parameter_list_of_the_wrong_length_names_the_parameters():
    with pytest.raises(ValueError, match=r"one per trainable parameter, 6.*0\.weight"):
        make_private(clipping="per_layer", max_grad_norm=[1.0, 1.0])


def test_per_parameter_list_must_follow_the_optimizer_order():
    model = tiny()
    params = list(model.parameters())
    engine = PrivacyEngine()
    with pytest.raises(ValueError, match=r"another order.*mapping"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(params[::-1], lr=0.0),
            data_loader=DataLoader(TensorDataset(torch.zeros(16, 8)), batch_size=4),
            noise_multiplier=0.0,
            max_grad_norm=[1.0] * 6,
            clipping="per_layer",
        )
    assert type(model[0]) is nn.Linear  # left as it was


def test_per_parameter_list_is_for_per_layer_clipping():
    with pytest.raises(TypeError, match="max_grad_norm must be a number for clipping='flat'"):
        make_private(max_grad_norm=[1.0] * 6)


@pytest.mark.parametrize(
    ("argument", "match"),
    [
        ({"batch_first": False}, "batch_first=False.*dim 0"),
        ({"poisson_sampling": False}, "poisson_sampling=False.*accountant"),
        ({"grad_sample_mode": "no_op"}, "no_op.*p.grad_sample"),
        ({"grad_sample_mode": "vmap"}, "grad_sample_mode must be one of"),
        ({"noise_generator": torch.Generator()}, "noise_generator.*CSPRNG"),
    ],
)
def test_what_cannot_hold_is_refused_saying_why(argument, match):
    with pytest.raises(ValueError, match=match):
        make_private(**argument)
    with pytest.raises(ValueError, match=match):
        PrivacyEngine().make_private_with_epsilon(
            module=tiny(),
            optimizer=torch.optim.SGD(tiny().parameters(), lr=0.0),
            data_loader=DataLoader(TensorDataset(torch.zeros(16, 8)), batch_size=4),
            target_epsilon=1.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
            **argument,
        )


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_grad_sample_modes_are_accepted(mode):
    _, out = make_private(
        grad_sample_mode=mode,
        batch_first=True,
        poisson_sampling=True,
        criterion=nn.CrossEntropyLoss(),
    )
    assert len(out) == 3


def test_ghost_mode_returns_the_criterion_as_opacus_does():
    criterion = nn.CrossEntropyLoss()
    _, (model, optimizer, returned, _) = make_private(grad_sample_mode="ghost", criterion=criterion)
    assert returned is criterion
    optimizer.zero_grad()
    returned(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
    optimizer.step()


def test_ghost_criterion_must_reduce_as_loss_reduction():
    with pytest.raises(ValueError, match="reduction='mean'"):
        make_private(grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(reduction="sum"))
