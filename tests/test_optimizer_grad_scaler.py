"""make_private(grad_scaler=) with torch.amp.GradScaler (issue 12): the engine clips the true
per-example gradients (the scaled material divided by the scaler's scale), releases in true
units, counts one step per scaler.step, and a step that is skipped (by the scaler or by the
user) is accounted at most once and leaves nothing behind for the next step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_attn.engine import PrivacyEngine

# direct batches (not from the engine's loader) warn once; fp16 autocast on CPU warns too
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, BATCH = 16, 8  # q = 1/2, expected batch size 8
SCALE = 2.0**16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def example_norms(model, x, y):
    """Each example's true gradient norm (plain fp32 autograd, one example at a time)."""
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(norms)


def private(model, max_grad_norm, *, grad_scaler=None, clipping="flat", lr=0.0, noise=0.0):
    engine = PrivacyEngine(accountant="rdp")
    dataset = TensorDataset(torch.randn(N, 6), torch.randint(0, 3, (N,)))
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(dataset, batch_size=BATCH),
        noise_multiplier=noise,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        grad_scaler=grad_scaler,
        generator=torch.Generator().manual_seed(1),
    )
    return engine, model, optimizer, loader


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def plain_release(model, max_grad_norm, x, y, clipping="flat"):
    """The release of one batch by an engine without a scaler, in fp32, no noise."""
    _, model, optimizer, _ = private(copy.deepcopy(model), max_grad_norm, clipping=clipping)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return grads(model)


@pytest.mark.parametrize("clipping", ["flat", "per-layer", "block"])
def test_scaled_fp16_release_equals_the_unscaled_one(clipping):
    """fp16 autocast, loss scaled by 2^16: the release equals the fp32 release without a
    scaler. The threshold is the median example norm, so half the examples are clipped and
    half are not: a release computed on the scaled gradients (all clipped) would differ."""
    model, (x, y) = make_model(), batch(0)
    clip = float(example_norms(model, x, y).median())
    want = plain_release(model, clip, x, y, clipping)

    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _, scaled, optimizer, _ = private(
        copy.deepcopy(model), clip, grad_scaler=scaler, clipping=clipping
    )
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(scaled(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == SCALE  # finite release: no back-off
    for got, g in zip(grads(scaled), want, strict=True):
        assert got.dtype == torch.float32
        assert (got - g).abs().max() <= 5e-3 * g.abs().max() + 1e-6


def test_scaler_clips_true_gradients_exactly_in_fp32():
    """Without autocast the scale is a power of two: the release equals the unscaled one to
    fp32 rounding, for a threshold that clips some examples and not others."""
    model, (x, y) = make_model(), batch(0)
    norms = example_norms(model, x, y)
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()
    want = plain_release(model, clip, x, y)

    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _, scaled, optimizer, _ = private(copy.deepcopy(model), clip, grad_scaler=scaler)
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaler.step(optimizer)
    for got, g in zip(grads(scaled), want, strict=True):
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7)


def test_one_accounted_step_per_scaler_step():
    """A loop over the engine's loader in the GradScaler idiom: one step accounted per
    scaler.step, the same ε as the same number of steps without a scaler."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    engine, model, optimizer, loader = private(model, 1.0, grad_scaler=scaler, lr=0.1, noise=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert engine.stats.steps == len(loader) == 2
    plain = PrivacyEngine(accountant="rdp")
    for _ in range(2):
        plain.accountant.step(noise_multiplier=1.0, sample_rate=BATCH / N)
    assert engine.get_epsilon(1e-5) == pytest.approx(plain.get_epsilon(1e-5))


def test_step_the_scaler_skips_is_accounted_once_and_does_not_leak():
    """The released gradient non-finite (forced here: the engine's clipped release is
    finite): the step was released, so it is accounted, once; the parameters do not move and
    the scaler backs off. The next step, at the new scale, releases its own batch only."""
    model = make_model()
    (x1, y1), (x2, y2) = batch(1), batch(2)
    clip = float(example_norms(model, x2, y2).median())  # a wrong scale would show
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    engine, private_model, optimizer, _ = private(
        copy.deepcopy(model), clip, grad_scaler=scaler, lr=0.1
    )
    before = [p.detach().clone() for p in private_model.parameters()]

    real_check = scaler._check_inf_per_device

    def overflowed(opt):
        found = real_check(opt)
        for flag in found.values():
            flag.fill_(1.0)
        return found

    scaler._check_inf_per_device = overflowed
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(private_model(x1), y1)).backward()
    scaler.step(optimizer)
    scaler.update()
    del scaler._check_inf_per_device
    assert engine.stats.steps == 1
    assert scaler.get_scale() == SCALE / 2
    for p, b in zip(private_model.parameters(), before, strict=True):
        assert torch.equal(p, b)

    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(private_model(x2), y2)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert engine.stats.steps == 2
    for got, g in zip(grads(private_model), plain_release(model, clip, x2, y2), strict=True):
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7)


def test_a_batch_backward_then_zero_grad_must_be_redone_not_skipped():
    """A loop that skips optimizer.step for a batch after its backward pass (say, on an inf
    loss) and calls zero_grad: the skip depends on the batch, which ε does not cover, so the
    next batch is refused; the batch redone and stepped is the one step accounted, and it
    releases only its own examples."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    engine, private_model, optimizer, loader = private(
        copy.deepcopy(model), 0.5, grad_scaler=scaler
    )
    batches = iter(loader)
    x1, y1 = next(batches)
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(private_model(x1), y1)).backward()
    optimizer.zero_grad()  # the step skipped
    with pytest.raises(RuntimeError, match=r"discarded by optimizer\.zero_grad\(\)"):
        next(batches)
    scaler.scale(F.cross_entropy(private_model(x1), y1)).backward()  # redone
    scaler.step(optimizer)
    scaler.update()
    assert engine.stats.steps == 1
    assert sum(s["count"] for s in engine.accountant.state_dict()["history"]) == 1
    for got, g in zip(grads(private_model), plain_release(model, 0.5, x1, y1), strict=True):
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7)


def test_scaler_step_without_grad_scaler_is_refused_before_accounting():
    model = make_model()
    engine, model, optimizer, _ = private(model, 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batch(0)
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(optimizer)
    assert engine.stats.steps == 0


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        private(make_model(), 1.0, grad_scaler=2.0**16)
