"""Misuse never passes silently (issue 11, items 5, 6 and the ledger half of 7): each attack
below released more than one clipping bound per example, or accounted fewer steps than were
taken, before the engine refused it. Every refused step is refused before the accountant
records it; nothing partial is ever released.

The data are large (every example's gradient norm is far above C, so each is clipped to
exactly C) and noise_multiplier is 0 unless stated: ‖released·q·N‖ / C counts how many
clipped examples a step released."""

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import dp_attn.functional as DF
from dp_attn.accounting import BudgetExceededError
from dp_attn.engine import PoissonDataLoader, PrivacyEngine
from dp_attn.nn.pieces import LinearPiece
from tests.test_engine import flat_grads, linear_model

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

C = 0.5


def dataset(n):
    return TensorDataset(100.0 * torch.randn(n, 2, 48, generator=torch.Generator().manual_seed(n)))


def private(n=8, batch_size=4, clipping="flat", model=None, seed=0, noise_multiplier=0.0):
    engine = PrivacyEngine()
    model = linear_model() if model is None else model
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(dataset(n), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=C,
        clipping=clipping,
        generator=torch.Generator().manual_seed(seed),
    )
    return engine, model, optimizer, loader


def backward(model, x):
    model(x).square().sum((1, 2)).mean().backward()


def stream(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def next_batch(batches, size=None):
    """The next batch (of `size` examples, skipping others: none of them is clipped)."""
    for (x,) in batches:
        if size is None or len(x) == size:
            return x
    raise AssertionError("unreachable: the stream is endless")


def released_bounds(engine, model) -> float:
    """‖released gradient · q·N‖ / C: 1 for one clipped example (z = 0)."""
    return (flat_grads(model).double() * engine._expected_batch_size).norm().item() / C


def accounted(engine) -> int:
    return sum(s.count for s in engine.accountant.history)


# ---------------------------------------------------------------- one step, one Poisson batch


def test_two_backward_passes_over_one_batch_are_refused():
    """Before: two backward passes over the loader's batch of one example released 2·C."""
    engine, model, opt, loader = private()
    batches = stream(loader)
    x = next_batch(batches, size=1)
    opt.zero_grad()
    backward(model, x)
    with pytest.raises(RuntimeError, match=r"more than the data loader's batch .*1 examples"):
        backward(model, x)
    with pytest.raises(RuntimeError, match=r"step\(\) refused.*zero_grad"):
        opt.step()
    assert accounted(engine) == 0 and engine.stats.unreleased_steps == 0
    opt.zero_grad()  # discards the step's sums; the batch stays this step's
    backward(model, x)
    opt.step()
    assert released_bounds(engine, model) == pytest.approx(1.0, rel=1e-4)
    assert accounted(engine) == 1


def test_a_batch_discarded_after_its_backward_cannot_be_skipped():
    """Before: backward, zero_grad() (which the "next batch" refusal itself suggested), then
    the next batch: the discarded batch was never released nor accounted. Skipping a batch
    because of what happened in it (its size ran out of memory, its loss was NaN) depends on
    the data, and ε does not cover it: the batch must be redone and stepped."""
    engine, model, opt, loader = private(n=16, batch_size=8, seed=2)
    batches = stream(loader)
    x = next_batch(batches, size=4)
    opt.zero_grad()
    backward(model, x)
    with pytest.raises(RuntimeError, match=r"next batch .*optimizer\.step\(\)"):
        next(iter(loader))
    opt.zero_grad()  # discards the sums: the batch is still this step's
    with pytest.raises(RuntimeError, match=r"discarded .*zero_grad.*depends on the data"):
        next(iter(loader))
    assert accounted(engine) == 0
    for part in x.chunk(2):  # redone, in two micro-batches
        backward(model, part)
    opt.step()
    assert accounted(engine) == 1 and released_bounds(engine, model) <= 4 * (1 + 1e-5)
    next(iter(loader))  # the next step's batch, drawn after the step


def test_a_batch_drawn_and_never_used_may_be_left():
    """A batch that no backward pass touched released nothing that depends on it: leaving it
    (a loop that stops early) is allowed, and the next batch is drawn as usual."""
    engine, model, opt, loader = private(n=16, batch_size=8, seed=2)
    batches = stream(loader)
    next_batch(batches, size=4)
    x = next(batches)[0]
    opt.zero_grad()
    backward(model, x)
    opt.step()
    assert accounted(engine) == 1


def test_a_batch_refused_by_the_budget_is_dropped_with_its_sums():
    """The budget refuses a step for a reason that does not depend on the data: its batch may
    be left (the loader stays usable), and its clipped sums never reach a later step, even one
    whose larger noise multiplier the budget allows."""
    engine = PrivacyEngine(accountant="rdp")
    model = linear_model()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(dataset(8), batch_size=4),
        noise_multiplier=0.0,  # an infinite ε: the budget refuses the step
        max_grad_norm=C,
        target_epsilon=3.0,
        target_delta=1e-5,
        generator=torch.Generator().manual_seed(2),
    )
    engine._add_noise = lambda grads, std: None  # the release is the clipped sum itself
    batches = stream(loader)
    opt.zero_grad()
    backward(model, next_batch(batches, size=4))
    with pytest.raises(BudgetExceededError):
        opt.step()
    assert accounted(engine) == 0
    backward(model, next_batch(batches, size=1))  # the next batch is drawn
    opt.noise_multiplier = 10.0
    opt.step()
    assert accounted(engine) == 1
    assert released_bounds(engine, model) == pytest.approx(1.0, rel=1e-4)  # one example's C


def test_a_step_over_part_of_the_batch_is_refused():
    """Before: a batch of 4 fed time-first ([T=2, B=4, d]: the DP layers took the 2 positions
    for 2 examples, each mixing all 4) released 2·C for each position, and one example's
    micro-batch backward twice (2 of the 4 examples' worth) released 2·C for it; both were
    accounted as an ordinary step. Every example of the batch must go through one backward
    pass before step()."""
    for misuse in ("time-first", "repeated micro-batch"):
        engine, model, opt, loader = private(n=16, batch_size=8, seed=2)
        batches = stream(loader)
        x = next_batch(batches, size=4)
        opt.zero_grad()
        if misuse == "time-first":
            backward(model, x.transpose(0, 1))  # 2 "examples" of 4 rows each
        else:
            backward(model, x[:1])
            backward(model, x[:1])
        with pytest.raises(RuntimeError, match=r"over 2 of the 4 examples.*partition"):
            opt.step()
        assert accounted(engine) == 0 and engine.stats.unreleased_steps == 0
        opt.zero_grad()
        backward(model, x)  # the same batch, used properly
        opt.step()
        assert accounted(engine) == 1
        assert released_bounds(engine, model) <= 4 * (1 + 1e-5)


def test_accumulating_loader_batches_into_one_step_is_refused():
    """Before: four Poisson batches accumulated into one step were accounted as one step."""
    engine, model, opt, loader = private(seed=1)
    batches = stream(loader)
    opt.zero_grad()
    backward(model, next_batch(batches, size=2))
    with pytest.raises(RuntimeError, match=r"next batch .*optimizer\.step\(\).*micro-batches"):
        next(batches)
    assert accounted(engine) == 0


def test_micro_batches_partitioning_a_loader_batch_equal_one_batch():
    got = []
    for micro_batches in (1, 3):
        engine, model, opt, loader = private(n=16, batch_size=8, seed=2)
        x = next_batch(stream(loader), size=None)
        assert len(x) >= 3
        opt.zero_grad()
        for part in x.chunk(micro_batches):
            backward(model, part)
        opt.step()
        got.append(flat_grads(model))
        assert released_bounds(engine, model) <= len(x) * (1 + 1e-5)
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-7)


def test_step_without_backward_after_a_non_empty_batch_is_refused():
    """Before: the forgotten backward released pure noise, accounted. An empty batch may be
    stepped without a backward pass (a noise-only step)."""
    engine, model, opt, loader = private(n=8, batch_size=1, seed=3, noise_multiplier=1.0)
    batches = stream(loader)
    next_batch(batches, size=1)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"without a backward pass over the 1 examples"):
        opt.step()
    assert accounted(engine) == 0
    next_batch(batches, size=0)
    opt.zero_grad()
    opt.step()
    assert accounted(engine) == 1 and torch.count_nonzero(flat_grads(model)) > 0


def test_backward_outside_the_loaders_batches_is_refused_once_it_is_used():
    """Once the loader is in use, a step's examples must come from its batch: a second step
    on the same batch is refused."""
    engine, model, opt, loader = private(seed=4)
    x = next_batch(stream(loader), size=2)
    opt.zero_grad()
    backward(model, x)
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="delivered no batch"):
        backward(model, x)
    with pytest.raises(RuntimeError, match="refused"):
        opt.step()
    assert accounted(engine) == 1


def test_hand_fed_batches_warn_once():
    engine, model, opt, _ = private()
    for expect_warning in (True, False):
        opt.zero_grad()
        backward(model, torch.randn(2, 2, 48))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages = [str(w.message) for w in caught if "not drawn from the data" in str(w.message)]
        assert len(messages) == int(expect_warning)
    assert accounted(engine) == 2


def test_loader_with_a_custom_sampler_is_refused():
    """Before: SubsetRandomSampler over 50 of 100 examples became Poisson sampling of all 100."""
    data = dataset(100)
    half = DataLoader(data, batch_size=5, sampler=SubsetRandomSampler(range(50)))
    with pytest.raises(ValueError, match=r"SubsetRandomSampler.*torch\.utils\.data\.Subset"):
        private_with(half)
    with pytest.raises(ValueError, match=r"SubsetRandomSampler.*Subset"):
        PoissonDataLoader.from_data_loader(half)
    subset = torch.utils.data.Subset(data, range(50))
    loader = PoissonDataLoader.from_data_loader(DataLoader(subset, batch_size=5, shuffle=True))
    assert loader.sample_rate == 0.1 and len(loader.dataset) == 50
    with pytest.raises(ValueError, match="in_order=False"):
        PoissonDataLoader(data, 0.1, in_order=False)


def private_with(data_loader):
    model = linear_model()
    return PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=data_loader,
        noise_multiplier=1.0,
        max_grad_norm=C,
    )


# ---------------------------------------------------------------- failures poison the step


def test_failure_after_some_layers_were_summed_poisons_the_step(monkeypatch):
    """Flat clipping sums the layers at the end of the pass; an error after the first layer's
    sums were added (an out-of-memory error, here injected) left them in the buffer, and a
    retry without zero_grad released them twice. Before: 1.5·C for one example."""
    engine, model, opt, loader = private(seed=5)
    x = next_batch(stream(loader), size=1)
    original, calls = LinearPiece.clipped_sums, []

    def fails_second(self, factors):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, factors)

    monkeypatch.setattr(LinearPiece, "clipped_sums", fails_second)
    opt.zero_grad()
    with pytest.raises(torch.OutOfMemoryError, match="micro-batches"):
        backward(model, x)
    monkeypatch.setattr(LinearPiece, "clipped_sums", original)
    with pytest.raises(RuntimeError, match=r"backward\(\) refused: the end of a backward pass"):
        backward(model, x)  # the retry, without zero_grad
    with pytest.raises(RuntimeError, match=r"step\(\) refused: the end of a backward pass raised"):
        opt.step()
    with pytest.raises(RuntimeError, match="refused"):
        opt.step()  # still refused: only zero_grad() discards the partial sums
    assert accounted(engine) == 0
    opt.zero_grad()
    backward(model, x)
    opt.step()
    assert released_bounds(engine, model) == pytest.approx(1.0, rel=1e-4)
    assert accounted(engine) == 1


class _FailsOnce(torch.autograd.Function):
    failures = 1

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _FailsOnce.failures:
            _FailsOnce.failures -= 1
            raise RuntimeError("injected failure outside the DP layers")
        return grad


class _FailingBackward(nn.Module):
    def forward(self, x):
        return _FailsOnce.apply(x)


@pytest.mark.parametrize("clipping", ["per-layer", "block"])
def test_retried_backward_after_a_failed_pass_is_refused(clipping):
    """A backward pass that fails between two layers (outside the engine) leaves the layers
    already clipped (per-layer and block clip inside each layer's backward) in the buffer;
    retrying it without zero_grad would add them again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), _FailingBackward(), nn.Tanh(), nn.Linear(96, 4))
    engine, model, opt, loader = private(model=model, clipping=clipping, seed=6)
    x = next_batch(stream(loader), size=1)
    _FailsOnce.failures = 1
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="injected failure"):
        backward(model, x)
    with pytest.raises(RuntimeError, match=r"called again after a backward pass failed"):
        backward(model, x)
    with pytest.raises(RuntimeError, match="refused"):
        opt.step()
    assert accounted(engine) == 0
    opt.zero_grad()
    backward(model, x)
    opt.step()
    assert released_bounds(engine, model) <= 1.0 + 1e-5
    assert accounted(engine) == 1


def test_reentrant_checkpointing_still_forms_one_pass():
    """A nested backward inside the pass (torch.utils.checkpoint, reentrant) is not a retry:
    flat clipping still sees every layer's norm, as without checkpointing."""
    got = []
    for checkpointed in (False, True):
        _, model, opt, loader = private(seed=7)
        x = next_batch(stream(loader), size=2)
        opt.zero_grad()
        first, rest = model[0], model[1:]
        if checkpointed:
            hidden = checkpoint(first, x.requires_grad_(), use_reentrant=True)
        else:
            hidden = first(x)
        rest(hidden).square().sum((1, 2)).mean().backward()
        opt.step()
        got.append(flat_grads(model))
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- modules that mix examples


@pytest.mark.parametrize(
    ("layer", "fix"),
    [
        (nn.BatchNorm1d(2, affine=False), "nn.GroupNorm or nn.LayerNorm"),
        (nn.BatchNorm1d(2, affine=False, track_running_stats=False), "nn.GroupNorm"),
        (nn.BatchNorm1d(2), "nn.GroupNorm"),
        (nn.SyncBatchNorm(2, affine=False), "nn.GroupNorm"),
        (nn.LazyBatchNorm1d(affine=False), "nn.GroupNorm"),
        (nn.InstanceNorm1d(48, track_running_stats=True), "track_running_stats=False"),
    ],
)
def test_batch_statistics_are_refused(layer, fix):
    """Before: BatchNorm1d(affine=False) was accepted, and one outlier in the batch changed
    the noise-free update of the others by 8.6·C."""
    model = nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 48))
    model.insert(1, layer)
    with pytest.raises(ValueError, match=rf"cannot make 1 \({type(layer).__name__}\).*{fix}"):
        private(model=model)
    assert type(model[0]) is nn.Linear  # refused before anything was converted


def test_instance_norm_without_running_statistics_is_accepted():
    model = nn.Sequential(nn.Linear(48, 96), nn.InstanceNorm1d(2), nn.Linear(96, 4))
    engine, model, opt, loader = private(model=model, seed=8)
    opt.zero_grad()
    backward(model, next_batch(stream(loader), size=2))
    opt.step()
    assert accounted(engine) == 1


class RunningMean(nn.Module):
    """Keeps a running mean of its inputs in a buffer, like a home-made BatchNorm."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean((0, 1)))
        return x - self.mean


class PositionIds(nn.Module):
    """A constant buffer (position ids) read in every forward: fine."""

    def __init__(self, length):
        super().__init__()
        self.register_buffer("ids", torch.arange(length), persistent=False)

    def forward(self, x):
        return x + self.ids[: x.shape[1], None].to(x.dtype)


def test_buffer_updated_in_a_training_forward_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), RunningMean(96), nn.Tanh(), nn.Linear(96, 4))
    engine, model, opt, loader = private(model=model, seed=9)
    x = next_batch(stream(loader), size=2)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"RunningMean 1 changed its buffer 1\.mean .*GroupNorm"):
        model(x)
    with pytest.raises(RuntimeError, match=r"refused: 1\.mean changed during a training forward"):
        opt.step()
    assert accounted(engine) == 0
    model.eval()  # eval mode, or no autograd: the buffer may change, nothing is being trained
    model(x)
    model.train()
    with torch.no_grad():
        model(x)


def test_constant_buffers_and_frozen_modules_are_fine():
    torch.manual_seed(0)
    frozen = RunningMean(96).eval()  # frozen statistics: a constant in every training forward
    model = nn.Sequential(PositionIds(2), nn.Linear(48, 96), frozen, nn.Tanh(), nn.Linear(96, 4))
    engine, model, opt, loader = private(model=model, seed=10)
    batches = stream(loader)
    for _ in range(2):
        opt.zero_grad()
        backward(model, next_batch(batches, size=2))
        opt.step()
    assert accounted(engine) == 2


# ---------------------------------------------------------------- the ledger


def test_step_accounted_but_not_released_is_in_the_ledger(monkeypatch):
    """The noise draw fails after the accountant recorded the step: the ledger says a step was
    accounted but not released (and keeps saying so through a checkpoint)."""
    engine, model, opt, loader = private(seed=11, noise_multiplier=1.0)
    batches = stream(loader)

    def crash(*args, **kwargs):
        raise RuntimeError("device lost while drawing noise")

    monkeypatch.setattr(DF, "add_gaussian_noise_", crash)
    opt.zero_grad()
    backward(model, next_batch(batches, size=2))
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step()
    monkeypatch.undo()
    stats = engine.stats
    assert accounted(engine) == 1 and stats.steps == 0 and stats.unreleased_steps == 1
    # the failed step's batch is used up; training continues with the next one
    opt.zero_grad()
    backward(model, next_batch(batches, size=2))
    opt.step()
    assert accounted(engine) == 2 and engine.stats.steps == 1
    resumed, *_ = private(seed=12, noise_multiplier=1.0)
    resumed.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    assert resumed.stats.unreleased_steps == 1 and resumed.stats.steps == 1
    assert math.isfinite(resumed.get_epsilon(1e-5))
