"""PrivacyEngine end to end: the released gradient equals an independent oracle for every
clipping style; the noise has the stated std and is fresh; accumulation adds it once; the
Poisson loader, the ledger, coverage and argument checks.

Statistical tests use 5-sigma two-sided bounds (false alarm ~6e-7 each, < 1e-5 for the
whole file)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import dp_attn.functional as DF
from dp_attn.accounting import BudgetExceededError
from dp_attn.engine import PoissonDataLoader, PrivacyEngine
from dp_attn.functional import BLOCK_CLIP_TILE
from dp_attn.nn import DPEmbedding, DPLayerNorm, DPLinear, DPMultiheadAttention
from tests.tiny_models import (
    clipped_sums,
    example_losses,
    make_batch,
    make_model,
    per_example_grads,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

N, BATCH = 8, 4  # dataset size and batch_size: q = B/N, expected batch size q·N = BATCH
SIGMAS = 5.0


def loader_of(n=N, batch_size=BATCH, dim=1):
    return DataLoader(TensorDataset(torch.zeros(n, dim)), batch_size=batch_size)


def private(model, clipping="flat", noise_multiplier=0.0, max_grad_norm=1.0, n=N, lr=0.0, **kwargs):
    engine = PrivacyEngine(accountant=kwargs.pop("accountant", "prv"))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader_of(n),
        clipping=clipping,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        **kwargs,
    )
    return engine, model, optimizer, loader


def released(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def close(actual, expected, tol=1e-5, msg=None):
    """fp32 result vs float64 oracle: tol relative to each element and to the largest one."""
    scale = max(1e-3, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=msg)


# ---------------------------------------------------------------- the oracle test


@pytest.fixture(scope="module")
def oracle():
    """The unconverted model's per-example gradients (torch.func, float64) on a padded batch."""
    model = make_model()
    ids, targets, mask = make_batch(batch=BATCH, padded=True)
    per_example = per_example_grads(copy.deepcopy(model), ids, targets, mask)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {
        "model": model,
        "batch": (ids, targets, mask),
        "per_example": per_example,
        "max_grad_norm": float(norms.median()),
        "linear": linear,
    }


def expected_grads(oracle, style):
    sums = clipped_sums(
        oracle["per_example"], style, oracle["max_grad_norm"], oracle["linear"], BLOCK_CLIP_TILE
    )
    return {n: s / BATCH for n, s in sums.items()}  # divided by q·N (= BATCH), not by B


def train_step(model, optimizer, ids, targets, mask, micro_batches=1):
    optimizer.zero_grad()
    for part in torch.arange(ids.shape[0]).chunk(micro_batches) if ids.shape[0] else [[]]:
        part = torch.as_tensor(part, dtype=torch.long)
        logits = model(ids[part], None if mask is None else mask[part])
        example_losses(logits, targets[part]).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_gradient_equals_oracle(oracle, style):
    """noise_multiplier=0: the gradient handed to the optimizer is Σ_i clip(g_i) / (q·N), with
    g_i the unconverted model's per-example gradient; then an empty batch releases zeros."""
    model = copy.deepcopy(oracle["model"])
    engine, model, optimizer, _ = private(model, style, max_grad_norm=oracle["max_grad_norm"])
    train_step(model, optimizer, *oracle["batch"])
    want = expected_grads(oracle, style)
    got = released(model)
    for name, g in got.items():
        close(g, want[name], msg=f"{style}: {name}")
    # The oracle clips: this C must bind for some examples and not for others (flat).
    unclipped = {n: g.sum(0) / BATCH for n, g in oracle["per_example"].items()}
    assert any((got[n].double() - unclipped[n]).abs().max() > 1e-3 for n in got)

    ids, targets, mask = oracle["batch"]
    train_step(model, optimizer, ids[:0], targets[:0], mask[:0])
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert engine.stats.steps == 2 and engine.stats.examples == BATCH
    assert engine.get_epsilon(1e-5) == math.inf  # z = 0


def test_accumulated_micro_batches_equal_one_batch(oracle):
    """Two backward passes over halves of the Poisson batch (loss averaged per micro-batch),
    one step: the same released gradient as the oracle for the whole batch."""
    model = copy.deepcopy(oracle["model"])
    _, model, optimizer, _ = private(model, "per-layer", max_grad_norm=oracle["max_grad_norm"])
    train_step(model, optimizer, *oracle["batch"], micro_batches=2)
    want = expected_grads(oracle, "per-layer")
    for name, g in released(model).items():
        close(g, want[name], msg=name)


def test_reference_path_equals_oracle(oracle, monkeypatch):
    """The PyTorch twins (the CPU path without the interpreter) give the same release."""
    monkeypatch.setattr(DF, "use_triton", lambda *tensors: False)
    model = copy.deepcopy(oracle["model"])
    _, model, optimizer, _ = private(model, "flat", max_grad_norm=oracle["max_grad_norm"])
    train_step(model, optimizer, *oracle["batch"])
    want = expected_grads(oracle, "flat")
    for name, g in released(model).items():
        close(g, want[name], msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_gradient_equals_oracle_cuda(oracle, style):
    """The compiled kernels on a GPU (fp32; matmuls may use TF32, hence the tolerance)."""
    model = copy.deepcopy(oracle["model"]).cuda()
    _, model, optimizer, _ = private(model, style, max_grad_norm=oracle["max_grad_norm"])
    train_step(model, optimizer, *(t.cuda() for t in oracle["batch"]))
    want = expected_grads(oracle, style)
    for name, g in released(model).items():
        close(g.cpu(), want[name], tol=2e-3, msg=f"{style}: {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_bf16_training_step_cuda(style):
    """bf16 model on a GPU: the step runs, releases finite bf16 gradients and moves the
    weights; the noise-only release of an empty batch has the stated std."""
    model = make_model(d=64, heads=4, mlp=256, max_len=64).cuda().to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    engine, model, optimizer, _ = private(model, style, 1.0, 1.0, lr=1e-2)
    ids, targets, mask = (t.cuda() for t in make_batch(batch=BATCH, length=64))
    train_step(model, optimizer, ids, targets, mask)
    assert all(
        p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters()
    )
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    train_step(model, optimizer, ids[:0], targets[:0], mask[:0])
    assert_std(flat_grads(model).float(), 1.0 / BATCH)
    assert engine.stats.steps == 2


# ---------------------------------------------------------------- noise


def assert_std(samples: torch.Tensor, std: float):
    """samples ~ N(0, std²) iid: sample variance within 5 sigma of std² (chi-square), and the
    mean within 5 sigma of 0."""
    n = samples.numel()
    samples = samples.double().flatten()
    ratio = samples.square().mean().item() / std**2
    assert abs(ratio - 1.0) < SIGMAS * math.sqrt(2.0 / n), (ratio, n)
    assert abs(samples.mean().item()) < SIGMAS * std / math.sqrt(n)


def assert_independent(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double().flatten(), b.double().flatten()
    rho = (a * b).mean() / torch.sqrt(a.square().mean() * b.square().mean())
    assert abs(rho.item()) < SIGMAS / math.sqrt(a.numel()), rho


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_empty_batches_release_fresh_noise_of_the_stated_std(style):
    """An empty batch releases pure noise: per coordinate N(0, (z·C_tot / (q·N))²), with
    C_tot = C (flat, block) or sqrt(Σ C_k²) (per-layer with its own thresholds); fresh each
    step (uncorrelated with the last)."""
    model = make_model()
    z, max_grad_norm, total = 1.3, 2.0, 2.0
    if style == "per-layer":
        layers = [
            n
            for n, m in model.named_modules()
            if type(m)
            in (
                nn.Linear,
                nn.LayerNorm,
                nn.Embedding,
                nn.MultiheadAttention,
                nn.modules.linear.NonDynamicallyQuantizableLinear,
            )
        ]
        max_grad_norm = {n: 0.5 + 0.1 * i for i, n in enumerate(layers)}
        total = math.sqrt(sum(c * c for c in max_grad_norm.values()))
    engine, model, optimizer, _ = private(model, style, z, max_grad_norm)
    ids, targets, mask = make_batch(batch=BATCH)
    steps = []
    for _ in range(2):
        train_step(model, optimizer, ids[:0], targets[:0], mask[:0])
        steps.append(flat_grads(model))
    std = z * total / BATCH
    assert_std(steps[0], std)
    assert_std(steps[1], std)
    assert_independent(steps[0], steps[1])
    assert engine.stats.steps == 2 and engine.stats.examples == 0


def linear_model(seed=0, din=48, dout=96):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, dout), nn.Tanh(), nn.Linear(dout, 4))


def linear_step(model, optimizer, x, micro_batches=1, reduction="mean"):
    optimizer.zero_grad()
    for part in x.chunk(micro_batches):
        out = model(part).square().sum((1, 2))
        (out.mean() if reduction == "mean" else out.sum()).backward()
    optimizer.step()


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_noise_is_added_once_per_step(micro_batches):
    """Released minus noise-free release (same data, z = 0) is N(0, (z·C / (q·N))²): one
    draw per logical step, not one per backward pass (which would give √k times the std)."""
    x = torch.randn(8, 3, 48)
    z, max_grad_norm = 0.8, 0.5
    noisy_model, clean_model = linear_model(), linear_model()
    _, noisy_model, noisy_opt, _ = private(noisy_model, "flat", z, max_grad_norm, n=16)
    _, clean_model, clean_opt, _ = private(clean_model, "flat", 0.0, max_grad_norm, n=16)
    linear_step(noisy_model, noisy_opt, x, micro_batches)
    linear_step(clean_model, clean_opt, x, micro_batches)
    noise = flat_grads(noisy_model) - flat_grads(clean_model)
    assert_std(noise, z * max_grad_norm / BATCH)


def test_loss_reduction_sum_equals_mean():
    """loss_reduction='sum' with a summed loss releases what 'mean' does with a mean loss."""
    x = torch.randn(6, 3, 48)
    out = {}
    for reduction in ("mean", "sum"):
        _, model, opt, _ = private(
            linear_model(), "per-layer", max_grad_norm=0.3, loss_reduction=reduction
        )
        linear_step(model, opt, x, reduction=reduction)
        out[reduction] = flat_grads(model)
    torch.testing.assert_close(out["sum"], out["mean"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("style", ["flat", "per-layer", "block"])
def test_nonfinite_example_contributes_zero(style):
    """An example whose gradient is not finite adds nothing and is counted; no NaN escapes."""
    x = torch.randn(4, 3, 48)
    bad = x.clone()
    bad[1, 2, 5] = math.nan
    keep = torch.tensor([0, 2, 3])
    results = []
    for inputs in (bad, x[keep]):
        engine, model, opt, _ = private(
            linear_model(), style, max_grad_norm=0.5, loss_reduction="sum"
        )
        linear_step(model, opt, inputs, reduction="sum")
        results.append(flat_grads(model))
        nonfinite = engine.stats.nonfinite_examples
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)
    engine, model, opt, _ = private(linear_model(), style, max_grad_norm=0.5)
    linear_step(model, opt, bad)
    assert engine.stats.nonfinite_examples == 1 and nonfinite == 0


def test_step_without_backward_releases_noise():
    """A step with no backward pass at all (nothing sampled) still releases noise and is
    recorded by the accountant."""
    engine, model, opt, _ = private(linear_model(), noise_multiplier=2.0)
    opt.zero_grad()
    opt.step()
    assert_std(flat_grads(model), 2.0 * 1.0 / BATCH)
    assert engine.stats.steps == 1 and engine.accountant.history[-1].count == 1


def test_embedding_padding_row_stays_zero():
    model = nn.Sequential(nn.Embedding(6, 16, padding_idx=0), nn.Linear(16, 2))
    _, model, opt, _ = private(model, noise_multiplier=1.0)
    opt.zero_grad()
    model(torch.tensor([[0, 1, 2], [3, 0, 0]])).sum().backward()
    opt.step()
    grad = model[0].weight.grad
    # the other rows are noised (secure_mode's rounding sends a few noised values to 0)
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[1:]) > grad[1:].numel() // 2


# ---------------------------------------------------------------- Poisson loader


def test_poisson_loader_batch_sizes():
    """Sizes are Binomial(N, q): mean q·N; at small q many batches are empty, with the
    right trailing shapes and dtypes."""
    n, batch_size = 400, 8
    dataset = TensorDataset(torch.randn(n, 3, 2), torch.arange(n))
    base = DataLoader(dataset, batch_size=batch_size)
    loader = PoissonDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(0))
    q = batch_size / n
    assert loader.sample_rate == q and len(loader) == len(base)
    sizes = [len(y) for _ in range(8) for _, y in loader]
    mean, var = n * q, n * q * (1 - q)
    assert abs(sum(sizes) / len(sizes) - mean) < SIGMAS * math.sqrt(var / len(sizes))
    assert len(set(sizes)) > 3

    small = PoissonDataLoader(dataset, 1 / n, steps=300, generator=torch.Generator().manual_seed(1))
    batches = list(small)
    empty = [b for b in batches if len(b[1]) == 0]
    p_empty = (1 - 1 / n) ** n  # ≈ e^-1
    assert abs(len(empty) / 300 - p_empty) < SIGMAS * math.sqrt(p_empty * (1 - p_empty) / 300)
    x, y = empty[0]
    assert x.shape == (0, 3, 2) and x.dtype == torch.float32 and y.shape == (0,)
    assert y.dtype == torch.int64


def test_loader_refusals():
    with pytest.raises(ValueError, match="batch_size"):
        PoissonDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(4)), None))
    with pytest.raises(TypeError, match="DataLoader"):
        PoissonDataLoader.from_data_loader([1, 2, 3])

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(TypeError, match="map-style"):
        PoissonDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2))


# ---------------------------------------------------------------- conversion and coverage


def test_conversion_keeps_parameters_state_dict_and_optimizer():
    model = make_model()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler_optimizer = optimizer
    engine = PrivacyEngine()
    converted, dp_opt, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader_of(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert converted is model and list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert dp_opt.param_groups is scheduler_optimizer.param_groups
    assert isinstance(model.tok, DPEmbedding) and isinstance(model.head, DPLinear)
    assert isinstance(model.blocks[0].attn, DPMultiheadAttention)
    assert isinstance(model.blocks[0].attn.out_proj, DPLinear)
    assert isinstance(model.blocks[1].ln2, DPLayerNorm)
    torch.optim.lr_scheduler.StepLR(dp_opt, step_size=1)  # accepts the wrapper


def test_uncovered_parameters_are_named():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))
            self.conv = nn.Conv1d(4, 4, 1)
            self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)

    model = Custom()
    with pytest.raises(ValueError, match=r"these do not: scale, conv\.weight, conv\.bias\."):
        private(model)
    assert type(model.lin) is nn.Linear  # a refused model is left as it was


def test_shared_parameters_other_than_tied_embeddings_are_refused():
    """Tied input/output embeddings are one privacy group
    (tests/test_conversion_tied_parameters.py); any other sharing is refused, naming both layers
    and how to untie."""
    model = make_model()
    model.blocks[0].ln2.weight = model.blocks[0].ln1.weight  # both [d]
    with pytest.raises(ValueError, match=r"blocks\.0\.ln1 and blocks\.0\.ln2 share it.*Untie"):
        private(model)


def test_gradient_from_outside_a_dp_layer_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(5, 4)

        def forward(self, ids):
            return F.linear(self.tok(ids), self.tok.weight)  # the head reuses the table

    _, model, _, _ = private(Tied())
    with pytest.raises(RuntimeError, match=r"tok\.weight received a gradient from outside"):
        model(torch.tensor([[1, 2]])).sum().backward()


def test_layer_used_twice_is_refused():
    lin = nn.Linear(4, 4)
    _, model, _, _ = private(nn.Sequential(lin, nn.Tanh(), lin))
    with pytest.raises(RuntimeError, match="used more than once"):
        model(torch.randn(2, 4)).sum().backward()


# ---------------------------------------------------------------- ledger


def test_resume_continues_the_ledger():
    def run(engine_state=None, steps=3):
        engine, model, opt, _ = private(linear_model(), noise_multiplier=1.1, n=16)
        if engine_state is not None:
            engine.load_state_dict(json.loads(json.dumps(engine_state)))
        for _ in range(steps):
            linear_step(model, opt, torch.randn(0, 3, 48))
        return engine

    full = run(steps=5)
    first = run(steps=3)
    resumed = run(first.state_dict(), steps=2)
    assert resumed.get_epsilon(1e-5) == pytest.approx(full.get_epsilon(1e-5), rel=1e-9)
    assert resumed.stats.steps == 5 and resumed.get_epsilon(1e-5) > first.get_epsilon(1e-5)


def test_budget_stops_before_release():
    """The step that would overspend raises before anything is released or recorded."""
    engine, model, opt, _ = private(
        linear_model(),
        noise_multiplier=1.5,
        n=16,
        accountant="rdp",
        lr=0.1,
        target_epsilon=3.0,
        target_delta=1e-5,
    )
    with pytest.raises(BudgetExceededError):
        for _ in range(1000):
            linear_step(model, opt, torch.randn(2, 3, 48))
    steps = engine.stats.steps
    assert steps > 0 and sum(s.count for s in engine.accountant.history) == steps
    assert engine.get_epsilon(1e-5) <= 3.0
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BudgetExceededError):
        linear_step(model, opt, torch.randn(2, 3, 48))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert engine.stats.steps == steps and engine.accountant.history[-1].count == steps


def test_make_private_with_epsilon():
    engine = PrivacyEngine(accountant="rdp")
    model = linear_model()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader_of(16, 4),
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=3,
        max_grad_norm=1.0,
    )
    assert opt.noise_multiplier > 0
    for _ in range(3 * len(loader)):
        linear_step(model, opt, torch.randn(2, 3, 48))
    assert 1.8 < engine.get_epsilon(1e-5) <= 2.0


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clipping": "global"}, ValueError, "clipping must be one of"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": math.nan}, ValueError, "max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": "1"}, TypeError, "max_grad_norm must be a number"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be a finite number >= 0"),
        ({"loss_reduction": "avg"}, ValueError, "loss_reduction must be one of"),
        ({"target_epsilon": 1.0}, ValueError, "both target_epsilon and target_delta"),
        ({"max_grad_norm": {"0": 1.0}}, TypeError, "mapping of per-layer thresholds"),
        ({"clipping": "per-layer", "max_grad_norm": {"0": 1.0}}, ValueError, r"missing \['2'\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        private(linear_model(), **kwargs)


def test_bad_models_and_optimizers():
    with pytest.raises(ValueError, match=r"cannot make attn private: .*batch_first=True"):
        private(nn.ModuleDict({"attn": nn.MultiheadAttention(32, 2)}))
    model = linear_model()
    foreign = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a private parameter of the module"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD([*model.parameters(), foreign], lr=0.1),
            data_loader=loader_of(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    _, model, opt, _ = private(linear_model())
    with pytest.raises(RuntimeError, match="already private"):
        private(model)
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        PrivacyEngine().make_private(
            module=lambda x: x,
            optimizer=opt,
            data_loader=loader_of(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
