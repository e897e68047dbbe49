"""The one-run audit of PrivacyEngine (see dp_attn.audit): the canaries' coin flips, one
training run through the engine's release path, each canary's score against every released
gradient, and the test of those scores."""

from __future__ import annotations

import operator
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from dp_attn.audit.bound import _check_probability, _is_int
from dp_attn.audit.scores import ScoreAudit, _guess_counts, audit_scores
from dp_attn.checks import is_real


class _MapDataset(Protocol):
    """What the audit needs of `canaries` and `data`: a map-style dataset with a length."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class _AuditSet(Dataset[tuple[Any, torch.Tensor]]):
    """The training set of the audit: the data (weight 1), then every canary with weight 1 if
    included and 0 if not. A weight-0 row is inert: its per-example gradient is exactly 0."""

    def __init__(
        self, data: _MapDataset | None, canaries: _MapDataset, included: np.ndarray
    ) -> None:
        self.data: _MapDataset = () if data is None else data
        self.canaries = canaries
        self.weights = torch.as_tensor(included, dtype=torch.float32)
        self.offset = len(self.data)

    def __len__(self) -> int:
        return self.offset + len(self.canaries)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if i < self.offset:
            return self.data[i], torch.tensor(1.0)
        return self.canaries[i - self.offset], self.weights[i - self.offset]


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """`fn` applied to every tensor of a (nested) tuple, list or dict."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        # Rebuilt from a dict, as default_collate rebuilds a batch's mappings.
        remake = cast(Callable[[dict[Any, Any]], Any], type(batch))
        return remake({k: _map_tensors(fn, v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        items = [_map_tensors(fn, v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


class _LossOf(nn.Module):
    """loss_fn(model, batch) as a module, so that torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


# Per-canary gradients are formed for chunks of canaries of at most this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _canary_signals(
    probe: _LossOf,
    names: Sequence[str],
    canary_batch: Any,
    count: int,
    release: torch.Tensor,
    max_grad_norm: float,
) -> np.ndarray:
    """⟨release, clip(g_i)⟩ for every canary i, with g_i its gradient at the probe's parameters
    (the parameters the step's gradients were computed at), clipped to max_grad_norm."""
    named = dict(probe.model.named_parameters())
    params = {n: named[n].detach() for n in names}

    def canary_loss(params: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
        batch = _map_tensors(lambda t: t.unsqueeze(0), example)
        losses = functional_call(probe, {f"model.{n}": p for n, p in params.items()}, (batch,))
        return losses.sum()

    per_canary = vmap(grad(canary_loss), in_dims=(None, 0))
    chunk = max(1, _CHUNK_ELEMENTS // release.numel())
    signals: list[torch.Tensor] = []
    for start in range(0, count, chunk):
        rows = slice(start, start + chunk)
        part = _map_tensors(operator.itemgetter(rows), canary_batch)
        grads = per_canary(params, part)
        flat = torch.cat([grads[n].flatten(1).float() for n in names], dim=1)
        factors = torch.clamp(max_grad_norm / flat.norm(dim=1), max=1.0)
        signals.append((flat @ release) * factors)
    return torch.cat(signals).double().cpu().numpy()


def _released_gradient(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The gradient the step released, flattened over the trainable parameters `names`."""
    flat = []
    for n in names:
        released = params[n].grad
        if released is None:
            raise RuntimeError(f"the engine released no gradient for parameter {n!r}")
        flat.append(released.flatten().float())
    return torch.cat(flat)


@dataclass(frozen=True, eq=False)
class AuditResult(ScoreAudit):
    """A one-run audit (see ScoreAudit for the test fields).

    claimed_epsilon: what the engine's accountant reports for the run at `delta`.
    violates_claim: epsilon_lower_bound > claimed_epsilon: with probability >= confidence the
        run is not as private as claimed (a bug, or an accountant that is not an upper bound).
    included: which canaries were in the training set; scores: {statistic: [m] scores};
    sample_rate: the Poisson rate the engine used (batch size / dataset size).
    """

    claimed_epsilon: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    included: np.ndarray
    scores: dict[str, np.ndarray]

    @property
    def violates_claim(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon


def audit_one_run(
    make_model: Callable[[], nn.Module],
    canaries: _MapDataset,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    sample_rate: float = 1.0,
    clipping: str = "flat",
    data: _MapDataset | None = None,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    accountant: str = "prv",
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    secure_mode: bool = True,
) -> AuditResult:
    """Audit PrivacyEngine on your model with one training run; see the module docstring.

    make_model: builds the model (plain torch.nn layers that make_private converts, on the
        device to train on); called twice: the trained model, and a probe that computes the
        canaries' gradients with torch.func.
    canaries: a map-style dataset of m canary examples; each is included with probability 1/2.
    loss_fn(model, batch): the per-example losses [B] of a collated batch of examples.
    data: other training examples (same structure as the canaries), always included.
    steps, noise_multiplier, max_grad_norm, clipping, accountant, secure_mode: the run, as
        make_private takes them; max_grad_norm must be a number. sample_rate: the Poisson rate; the
        engine uses batch_size / N with batch_size = round(sample_rate·N), N = len(data) + m.
    make_optimizer: params -> optimizer (default SGD, lr 0.1).
    delta, confidence, guess_counts: the test (see audit_scores).
    """
    from dp_attn.engine import PrivacyEngine  # the engine imports the kernels: only when auditing

    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not is_real(sample_rate):
        raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not is_real(max_grad_norm):
        raise TypeError(f"max_grad_norm must be a number, got {type(max_grad_norm).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    m = len(canaries)
    if m < 1:
        raise ValueError("canaries must hold at least one example")
    delta = _check_probability("delta", delta, low_open=False)
    _check_probability("confidence", confidence)
    guess_counts = _guess_counts(guess_counts, m)

    # S: the secret coin flips, from the OS CSPRNG.
    included = np.unpackbits(np.frombuffer(secrets.token_bytes((m + 7) // 8), np.uint8))
    included = included[:m].astype(bool)
    train_set = _AuditSet(data, canaries, included)
    batch_size = max(1, round(sample_rate * len(train_set)))

    model, probe = make_model(), make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_model must return an nn.Module, got {type(model).__name__}")
    if {id(p) for p in model.parameters()} & {id(p) for p in probe.parameters()}:
        raise ValueError(
            "make_model must build a new model at each call: the audit needs a second copy "
            "(the probe) that the engine does not convert"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model from make_model has no trainable parameters")
    device = params[0].device
    optimizer = (make_optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1)))(model.parameters())
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train_set, batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        secure_mode=secure_mode,
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    private = dict(model.named_parameters())
    probe = _LossOf(probe.eval(), loss_fn)
    canary_batch = _map_tensors(
        lambda t: t.to(device), default_collate([canaries[i] for i in range(m)])
    )

    signals = np.zeros((steps, m))
    step = 0
    while step < steps:
        for batch, weights in loader:
            if step == steps:
                break
            batch = _map_tensors(lambda t: t.to(device), batch)
            probe.model.load_state_dict(model.state_dict())  # θ_t, before the update
            optimizer.zero_grad()
            losses = loss_fn(model, batch)
            if not isinstance(losses, torch.Tensor) or losses.shape != weights.shape:
                raise ValueError(
                    "loss_fn must return one loss per example, a tensor of shape "
                    f"{tuple(weights.shape)}, got "
                    f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else losses!r}"
                )
            (losses * weights.to(losses)).mean().backward()
            optimizer.step()
            release = _released_gradient(private, names)
            signals[step] = _canary_signals(
                probe, names, canary_batch, m, release, float(max_grad_norm)
            )
            step += 1

    scores = {"sum": signals.sum(0)}
    if steps >= 2:
        scores["variation"] = np.square(np.diff(signals, axis=0)).sum(0)
    best = audit_scores(
        scores, included, delta=delta, confidence=confidence, guess_counts=guess_counts
    )
    return AuditResult(
        **vars(best),
        claimed_epsilon=engine.get_epsilon(delta),
        steps=steps,
        sample_rate=loader.sample_rate,
        noise_multiplier=float(noise_multiplier),
        included=included,
        scores=scores,
    )
