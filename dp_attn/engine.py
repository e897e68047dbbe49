"""PrivacyEngine: make a model, its optimizer and its data loader differentially private.

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat")
    ...  # the usual loop: zero_grad, forward, loss.backward(), optimizer.step()
    engine.get_epsilon(1e-5)

What happens in one logical step (DESIGN.md §1):
- the loader draws the batch by Poisson sampling at rate q = batch_size / N (sizes vary, an
  empty batch is a batch with zero rows);
- in each backward pass the DP layers hand their activations and output gradients to the
  engine's clipper, which forms clipped per-example sums (noise-free) into one fp32
  accumulator per parameter: "flat" once the pass ends (a callback queued on the autograd
  engine), "per-layer" and "block" inside each layer's backward. The accumulators are views
  of one flat buffer covering every private parameter. Several backward passes
  (micro-batches of one Poisson batch) add into the same buffer;
- optimizer.step() checks the budget, records the step with the accountant, adds
  N(0, (z·C_tot)²) to every coordinate of the buffer in one call with a fresh CSPRNG key
  (noise is added once per logical step, never in the backward passes: simple and correct
  under accumulation, at the cost of one pass over the buffer), divides by the expected batch
  size q·N, sets each p.grad to its slice (cast to p's dtype) and steps the wrapped optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from . import functional as DF
from . import integrations
from .accounting import PrivacyBudget, calibrate_noise_multiplier, make_accountant
from .nn import (
    DPConv1D,
    DPEmbedding,
    DPLayerNorm,
    DPLinear,
    DPMultiheadAttention,
    DPRMSNorm,
    _check_attention,
    _check_embedding,
)

__all__ = ["DPOptimizer", "PoissonBatchSampler", "PoissonDataLoader", "PrivacyEngine"]

CLIPPING_STYLES = ("flat", "per-layer", "block")
LOSS_REDUCTIONS = ("mean", "sum")
_DP_LAYERS = (DPLinear, DPConv1D, DPLayerNorm, DPRMSNorm, DPEmbedding, DPMultiheadAttention)
_CONVERSIONS = {
    nn.Linear: DPLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: DPLinear,
    nn.LayerNorm: DPLayerNorm,
    nn.RMSNorm: DPRMSNorm,
    nn.Embedding: DPEmbedding,
    nn.MultiheadAttention: DPMultiheadAttention,
}


# ---------------------------------------------------------------- statistics


@dataclass
class PrivacyStats:
    """What the engine has done: optimizer steps, examples that went through a backward pass,
    and examples whose per-example gradient norm was not finite (they contributed zero)."""

    steps: int = 0
    examples: int = 0
    nonfinite_examples: int = 0


# ---------------------------------------------------------------- clipping (backward side)


@contextlib.contextmanager
def _oom_points_to_micro_batches(batch: int):
    """Re-raise an out-of-memory error of the clipping work with the remedy: a Poisson batch's
    size is random, so the cure is micro-batching, not a smaller expected batch size."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"out of memory in the backward pass of a Poisson batch of {batch} examples: split "
            "each batch into micro-batches (forward and backward on slices of it, then one "
            "optimizer.step(): the engine sums their clipped gradients and adds the noise once "
            "per step, so privacy and ε are unchanged). Call optimizer.zero_grad() before "
            f"retrying. The original error: {err}"
        ) from err


class _Clipper:
    """The per-step bookkeeping of one private model: every DP layer's `_dp_controller`.

    `record(owner, pieces)` is called from a DP layer's backward with the per-example material
    of one privacy group (see dp_attn.nn). Clipped sums go into one flat fp32 buffer (a slice
    per private parameter) until optimizer.step() takes it.
    """

    def __init__(self, style, loss_reduction, max_grad_norm, thresholds, stats, params):
        self.style = style
        self.mean = loss_reduction == "mean"
        self.max_grad_norm = max_grad_norm  # flat: C; block: C/√K for every group
        self.thresholds = thresholds  # per-layer: {owner module: C_k}
        self.stats = stats
        self.slices: dict[nn.Parameter, slice] = {}
        offset = 0
        for p in params:
            self.slices[p] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.size = offset
        self.buffer: torch.Tensor | None = None
        self._nonfinite = None  # device tensor: examples counted but not yet read
        self._end_pass()

    # ---- one backward pass
    # Never traced by torch.compile: a backward graph compiled from it would run its side
    # effects (the pass callback, the accumulator) once, at trace time. A DP layer's autograd
    # Function therefore runs eagerly inside a compiled model, and fullgraph=True fails naming
    # this function (docs/supported.md).
    @torch.compiler.disable
    def record(self, owner: nn.Module, pieces) -> None:
        batch = pieces[0].batch_size
        self._begin(owner, batch, pieces[0])
        if batch == 0:
            return
        with _oom_points_to_micro_batches(batch):
            self._record(owner, pieces, batch)

    def _record(self, owner: nn.Module, pieces, batch: int) -> None:
        scale = float(batch) if self.mean else 1.0  # undo the loss's 1/B: true per-example grads
        if self.style == "flat":
            sq = sum(p.sq_norms() for p in pieces)
            self._sq = sq if self._sq is None else self._sq + sq
            self._kept.append(pieces)
        elif self.style == "per-layer":
            if owner not in self.thresholds:
                raise RuntimeError(
                    f"the DP layer {type(owner).__name__} had no trainable parameters when "
                    "make_private checked the model; call make_private after unfreezing them"
                )
            self._clip_group(pieces, self.thresholds[owner], scale)
        else:
            small = [p for p in pieces if not p.blockwise]
            for piece in pieces:
                if piece.blockwise:
                    # clip(B·raw, C) = B·clip(raw, C/B): the kernel clips raw tiles to C/B.
                    self._add(piece.block_sums(self.max_grad_norm / scale, scale))
                    for t in (piece.a, piece.g):
                        self._pass_nonfinite |= ~torch.isfinite(t).flatten(1).all(1)
            if small:
                self._clip_group(small, self.max_grad_norm, scale)

    def _begin(self, owner, batch, piece) -> None:
        if not self._pass_open:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
            self._pass_open, self._pass_batch = True, batch
            device = (piece.g if hasattr(piece, "g") else piece.ids).device
            self._pass_nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        elif batch != self._pass_batch:
            raise ValueError(
                f"DP layers saw different batch sizes ({self._pass_batch} and {batch}) in one "
                "backward pass: dim 0 of every DP layer's input must index the examples"
            )
        if owner in self._pass_owners:
            raise RuntimeError(
                f"the DP layer {type(owner).__name__} was used more than once in one forward "
                "pass; its per-example gradient would be the sum over its uses, which the "
                "engine does not form: use a separate layer for each use"
            )
        self._pass_owners.add(owner)

    def _end_pass(self) -> None:
        """End of a backward pass (autograd callback): flat clipping, counters, reset."""
        try:
            if getattr(self, "_pass_open", False) and self._pass_batch:
                scale = float(self._pass_batch) if self.mean else 1.0
                if self._kept:
                    with _oom_points_to_micro_batches(self._pass_batch):
                        factors = self._factors(self._sq, self.max_grad_norm, scale)
                        for pieces in self._kept:
                            for piece in pieces:
                                self._add(piece.clipped_sums(factors))
                self.stats.examples += self._pass_batch
                count = self._pass_nonfinite.sum()
                self._nonfinite = count if self._nonfinite is None else self._nonfinite + count
        finally:
            self._pass_open, self._pass_batch, self._pass_owners = False, 0, set()
            self._sq, self._kept, self._pass_nonfinite = None, [], None

    def _clip_group(self, pieces, threshold: float, scale: float) -> None:
        factors = self._factors(sum(p.sq_norms() for p in pieces), threshold, scale)
        for piece in pieces:
            self._add(piece.clipped_sums(factors))

    def _factors(self, sq_norms, threshold: float, scale: float) -> torch.Tensor:
        """Factors for the raw (loss-scaled) gradients: scale·min(1, C / (n + 1e-6)) with n the
        true per-example norm, and 0 where n is not finite."""
        norms = sq_norms.sqrt() * scale
        finite = torch.isfinite(norms)
        self._pass_nonfinite |= ~finite
        factors = torch.clamp(threshold / (norms + 1e-6), max=1.0)
        return torch.where(finite, factors, 0.0) * scale

    def _add(self, sums) -> None:
        for param, rows, value in sums:
            where = self.slices.get(param)
            if where is None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} was not trainable when "
                    "make_private checked the model; call make_private after unfreezing it"
                )
            if self.buffer is None:
                self.buffer = torch.zeros(self.size, dtype=torch.float32, device=value.device)
            acc = self.buffer[where].view(param.shape)
            if rows is None:
                acc += value
            else:
                acc[rows] += value

    # ---- one logical step
    @property
    def pass_open(self) -> bool:
        return self._pass_open

    def take(self) -> torch.Tensor | None:
        """The step's summed clipped gradients (flat, fp32; None if nothing was added)."""
        buffer, self.buffer = self.buffer, None
        return buffer

    def clear(self) -> None:
        self.buffer = None
        self._pass_open = False
        self._end_pass()

    def read_nonfinite(self) -> int:
        count, self._nonfinite = self._nonfinite, None
        return 0 if count is None else int(count)


# ---------------------------------------------------------------- Poisson sampling


class PoissonBatchSampler(Sampler):
    """Batches of dataset indices drawn by Poisson sampling: each of the `num_samples` examples
    joins each batch independently with probability `sample_rate`. Batch sizes vary and may
    be 0. `steps` batches per pass over the sampler ("epoch").

    The inclusion draws come from a torch.Generator seeded from the operating system's CSPRNG
    at each epoch; `generator=` fixes them (tests only)."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, *, generator=None):
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.num_samples, self.sample_rate, self.steps = num_samples, float(sample_rate), steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        for _ in range(self.steps):
            chosen = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            yield chosen.nonzero().flatten().tolist()


class _EmptyBatchCollate:
    """Collate that turns an empty batch into empty tensors with the right trailing shapes and
    dtypes (those of the collated first example, cut to 0 rows)."""

    def __init__(self, dataset, collate_fn):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, batch):
        if len(batch):
            return self.collate_fn(batch)
        return _zero_rows(self.collate_fn([self.dataset[0]]))


def _zero_rows(batch):
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: _zero_rows(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if all(isinstance(x, (str, bytes, int, float)) for x in batch):
            return type(batch)()  # a batch of non-tensor values, one per example
        rows = [_zero_rows(x) for x in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    raise TypeError(
        f"cannot form an empty batch from a collated {type(batch).__name__}: samples must be "
        "tensors, numbers or (nested) tuples, lists and dicts of them"
    )


class PoissonDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson samples at rate `sample_rate` (see
    PoissonBatchSampler); `steps` batches per epoch (default round(1 / sample_rate)).
    Empty batches are yielded as tensors with zero rows. Other keyword arguments go to
    DataLoader (num_workers, pin_memory, ...)."""

    def __init__(self, dataset, sample_rate: float, *, steps: int | None = None,
                 collate_fn=None, generator=None, **kwargs):  # fmt: skip
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        if steps is None:
            steps = max(1, round(1.0 / sample_rate)) if sample_rate > 0 else 1
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator=generator)
        collate = _EmptyBatchCollate(dataset, collate_fn or default_collate)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)
        self.sample_rate = sampler.sample_rate

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None) -> PoissonDataLoader:
        """The Poisson version of an ordinary loader: q = batch_size / len(dataset), as many
        steps per epoch as the loader has batches, the same collate_fn and worker settings."""
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a DataLoader, got {type(data_loader).__name__}")
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError(
                "data_loader must be built with batch_size=... (the expected batch size of the "
                "Poisson batches); a custom batch_sampler is not supported"
            )
        dataset = data_loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        if len(dataset) == 0:
            raise ValueError("data_loader's dataset is empty")
        if batch_size > len(dataset):
            raise ValueError(
                f"batch_size ({batch_size}) exceeds the dataset size ({len(dataset)})"
            )
        kwargs = {
            "num_workers": data_loader.num_workers,
            "pin_memory": data_loader.pin_memory,
            "timeout": data_loader.timeout,
            "worker_init_fn": data_loader.worker_init_fn,
            "multiprocessing_context": data_loader.multiprocessing_context,
            "persistent_workers": data_loader.persistent_workers,
        }
        if data_loader.num_workers > 0:
            kwargs["prefetch_factor"] = data_loader.prefetch_factor
        return cls(
            dataset, batch_size / len(dataset), steps=len(data_loader),
            collate_fn=data_loader.collate_fn, generator=generator, **kwargs,
        )


# ---------------------------------------------------------------- optimizer (step side)


class DPOptimizer(torch.optim.Optimizer):
    """Wraps the user's optimizer; `step()` releases the private gradient and then steps it.

    param_groups, state, defaults, state_dict and load_state_dict are the wrapped
    optimizer's. `noise_multiplier` may be changed between steps (each step is recorded with
    its own value)."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: PrivacyEngine):
        self.original_optimizer = optimizer
        self._engine = engine
        self.noise_multiplier = engine._noise_multiplier

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        raise RuntimeError(
            "parameters cannot be added to a DPOptimizer: make_private checked which "
            "parameters are private when it was created"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the wrapped optimizer's grads and the engine's clipped-sum accumulators."""
        self._engine._clipper.clear()
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine._release(self.noise_multiplier)
        self.original_optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"


# ---------------------------------------------------------------- the engine


class PrivacyEngine:
    """Converts a model to DP layers, samples batches by Poisson sampling, privatises each
    optimizer step and keeps the privacy ledger. accountant: "prv" (default) or "rdp"."""

    def __init__(self, accountant: str = "prv"):
        self.accountant = make_accountant(accountant)
        self.accountant_name = accountant
        self._stats = PrivacyStats()
        self._clipper: _Clipper | None = None
        self._settings: dict | None = None
        self._budget = None

    # ---- set-up
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Mapping[str, float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = True,
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """Make training private; returns (module, optimizer, data_loader) to train with.

        module: converted in place (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and
            nn.MultiheadAttention become their dp_attn.nn versions, keeping the same Parameter
            objects and state_dict keys). Every trainable parameter must belong to one of
            them, once (tied parameters are refused).
        optimizer: the optimizer over the module's parameters; wrapped.
        data_loader: an ordinary loader with batch_size; replaced by a PoissonDataLoader with
            q = batch_size / len(dataset) and as many batches per epoch.
        noise_multiplier: z >= 0 (0 gives no privacy: ε = inf).
        max_grad_norm: C > 0. "flat": the bound on each example's whole gradient. "per-layer":
            split as C/√K over the K DP layers with trainable parameters, or a mapping
            {DP layer name: C_k} covering each of them (the noise uses sqrt(Σ C_k²)).
            "block": C/√K over all K groups of the model: each 128×128 tile of a linear weight
            (DPMultiheadAttention: of each of its Q, K and V matrices) with its bias slice
            (dp_attn.functional.block_clip_num_groups), and each norm layer, embedding and
            bias-only layer as one group.
        clipping: "flat", "per-layer" or "block" (DESIGN.md §1).
        loss_reduction: "mean" if the loss averages over the examples of the batch (each DP
            layer's output gradients are multiplied by the batch size it saw), "sum" if it sums.
        target_epsilon, target_delta: an optional budget; a step that would exceed it raises
            BudgetExceededError before anything is released.
        generator: fixes the Poisson sampling's draws (tests only; default: CSPRNG-seeded).
        secure_mode: draw each noise coordinate as the sum of two normals and round the noised
            sum to a power-of-two grid, against floating-point attacks on the Gaussian samples
            (docs/threat_model.md); same ε, at most 1/48 more noise variance. On by default:
            without it the float32 sampler's truncated tails can make δ false for large models.
        """
        if self._clipper is not None:
            raise RuntimeError("this PrivacyEngine is already in use: create one per model")
        _check_types(module, optimizer)
        noise_multiplier = _check_real("noise_multiplier", noise_multiplier, positive=False)
        if clipping not in CLIPPING_STYLES:
            raise ValueError(f"clipping must be one of {CLIPPING_STYLES}, got {clipping!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        if not isinstance(max_grad_norm, Mapping):
            max_grad_norm = _check_real("max_grad_norm", max_grad_norm, positive=True)
        elif clipping != "per-layer":
            raise TypeError(
                f"max_grad_norm must be a number for clipping={clipping!r} (a mapping of "
                "per-layer thresholds is for clipping='per-layer')"
            )
        if (target_epsilon is None) != (target_delta is None):
            raise ValueError("give both target_epsilon and target_delta for a budget, or neither")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        loader = PoissonDataLoader.from_data_loader(data_loader, generator=generator)
        budget = None
        if target_epsilon is not None:
            budget = PrivacyBudget(target_epsilon, target_delta, self.accountant)

        converted = _convert(module)
        try:
            layers = _private_layers(module)
            _check_optimizer_params(optimizer, layers)
            thresholds, group_threshold, total = _thresholds(clipping, max_grad_norm, layers)
        except Exception:
            for m, cls in converted:  # leave the user's model as it was
                m.__class__ = cls
            raise

        self._noise_multiplier = noise_multiplier
        self._total_threshold = total
        self._secure_mode = secure_mode
        self._sample_rate = loader.sample_rate
        self._expected_batch_size = loader.sample_rate * len(loader.dataset)
        self._budget = budget
        self._params = [(name, p) for _, layer in layers for name, p in layer.params]
        self._padding_rows = {
            layer.module.weight: layer.module.padding_idx
            for _, layer in layers
            if isinstance(layer.module, DPEmbedding) and layer.module.padding_idx is not None
        }
        self._settings = {
            "clipping": clipping,
            "loss_reduction": loss_reduction,
            "max_grad_norm": (
                dict(max_grad_norm) if isinstance(max_grad_norm, Mapping) else max_grad_norm
            ),
            "noise_multiplier": noise_multiplier,
            "sample_rate": self._sample_rate,
            "expected_batch_size": self._expected_batch_size,
            "target_epsilon": target_epsilon,
            "target_delta": target_delta,
            "secure_mode": secure_mode,
        }
        self._clipper = _Clipper(
            clipping, loss_reduction, group_threshold,
            {layer.module: thresholds[name] for name, layer in layers if name in thresholds},
            self._stats, [p for _, p in self._params],
        )
        for m in module.modules():
            if isinstance(m, _DP_LAYERS):
                m._dp_controller = self._clipper
        for name, p in self._params:
            p.register_hook(_refuse_outside_gradient(name))
        self.module = module
        self.optimizer = DPOptimizer(optimizer, self)
        return module, self.optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Mapping[str, float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        secure_mode: bool = True,
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """make_private with the noise multiplier calibrated (by this engine's accountant) so
        that `epochs` epochs of len(data_loader) steps at q = batch_size / len(dataset) spend
        exactly (target_epsilon, target_delta); that budget is then enforced."""
        if not _is_int(epochs) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        loader = PoissonDataLoader.from_data_loader(data_loader)
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, target_delta, loader.sample_rate, epochs * len(loader),
            accountant=self.accountant_name,
        )
        return self.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, clipping=clipping,
            loss_reduction=loss_reduction, target_epsilon=target_epsilon,
            target_delta=target_delta, generator=generator, secure_mode=secure_mode,
        )

    # ---- the ledger
    def get_epsilon(self, delta: float) -> float:
        """ε spent so far for this δ (an upper bound; inf if a step had no noise)."""
        return self.accountant.epsilon(delta)

    @property
    def stats(self) -> PrivacyStats:
        if self._clipper is not None:
            self._stats.nonfinite_examples += self._clipper.read_nonfinite()
        return copy.copy(self._stats)

    def state_dict(self) -> dict:
        """The ledger (accountant history), the counters and the settings, JSON-serialisable."""
        return {
            "accountant_name": self.accountant_name,
            "accountant": self.accountant.state_dict(),
            "stats": asdict(self.stats),
            "settings": copy.deepcopy(self._settings),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the ledger of a saved run (call before or after make_private). Settings
        that differ from this engine's are reported with a warning."""
        if not isinstance(state, dict) or not {"accountant", "stats"} <= set(state):
            raise ValueError("state must be a dict from PrivacyEngine.state_dict()")
        if state.get("accountant_name", self.accountant_name) != self.accountant_name:
            raise ValueError(
                f"state comes from a {state['accountant_name']!r} accountant, this engine uses "
                f"{self.accountant_name!r}"
            )
        saved = state.get("settings")
        if saved and self._settings:
            changed = sorted(k for k in saved if saved[k] != self._settings.get(k))
            if changed:
                warnings.warn(
                    f"resuming with settings that differ from the saved run: {changed}",
                    stacklevel=2,
                )
        self.accountant.load_state_dict(state["accountant"])
        self._stats = PrivacyStats(**state["stats"])
        if self._clipper is not None:
            self._clipper.stats = self._stats
            self._clipper.read_nonfinite()
        if self._settings is None:
            self._settings = copy.deepcopy(saved)

    def _device(self) -> torch.device:
        devices = {p.device for _, p in self._params}
        if len(devices) != 1:
            raise RuntimeError(f"the private parameters must share one device, got {devices}")
        return devices.pop()

    # ---- one logical step (called by DPOptimizer.step)
    def _add_noise(self, grads: torch.Tensor, std: float) -> None:
        """grads += N(0, std²) in place: the step's noise (DistributedPrivacyEngine overrides
        this to add a per-rank share and sum the ranks' clipped sums)."""
        if std > 0.0:
            DF.add_gaussian_noise_(grads, std, secure_mode=self._secure_mode)

    def _as_grad(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """The released gradient (fp32, param's shape) as param.grad (DistributedPrivacyEngine
        overrides this to keep only this rank's shard of an FSDP-sharded parameter)."""
        return grad if grad.dtype == param.dtype else grad.to(param.dtype)

    def _release(self, noise_multiplier: float) -> None:
        if self._clipper.pass_open:
            raise RuntimeError(
                "optimizer.step() was called before the backward pass finished (if a backward "
                "pass raised, call optimizer.zero_grad() to discard its partial gradients)"
            )
        if self._budget is not None:
            self._budget.check(noise_multiplier, self._sample_rate)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=self._sample_rate)
        grads = self._clipper.take()
        if grads is None:
            grads = torch.zeros(self._clipper.size, dtype=torch.float32, device=self._device())
        self._add_noise(grads, noise_multiplier * self._total_threshold)
        grads.div_(self._expected_batch_size)
        for _, p in self._params:
            if not p.requires_grad:
                continue
            grad = grads[self._clipper.slices[p]].view(p.shape)
            if p in self._padding_rows:
                grad[self._padding_rows[p]] = 0.0  # never trained: its true gradient is 0
            p.grad = self._as_grad(p, grad)
        self._stats.steps += 1


# ---------------------------------------------------------------- conversion and checks


def convert_module(module: nn.Module) -> nn.Module:
    """Turn every nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and nn.MultiheadAttention
    in `module` (itself included) into its dp_attn.nn version, in place: the same module and
    Parameter objects, now of the DP class. Norms without affine parameters stay as they are,
    and so do subclasses of these modules (their forward may differ). Without an engine the
    DP layers compute what their nn counterparts do (attention by flash attention)."""
    _convert(module)
    return module


def _convert(module: nn.Module) -> list[tuple[nn.Module, type]]:
    """convert_module; returns [(module, its former class)] of what it changed."""
    integrations.prepare_model(module)  # third-party modules (transformers) first
    found = []
    for name, m in module.named_modules():
        cls = _CONVERSIONS.get(type(m))
        if cls is None or (cls in (DPLayerNorm, DPRMSNorm) and m.weight is None):
            continue
        try:
            if cls is DPMultiheadAttention:
                _check_attention(m)
            elif cls is DPEmbedding:
                _check_embedding(m)
        except ValueError as err:
            raise ValueError(f"cannot make {name or 'the model'} private: {err}") from None
        found.append((m, cls))
        if cls is DPMultiheadAttention:
            found.append((m.out_proj, DPLinear))
    changed = []
    for m, cls in found:
        if type(m) is not cls:
            changed.append((m, type(m)))
            m.__class__ = cls
    return changed


@dataclass
class _Layer:
    """A DP layer with trainable parameters: one privacy group under per-layer clipping."""

    module: nn.Module
    params: list  # [(qualified name, Parameter)] it owns and trains


def _private_layers(module: nn.Module) -> list[tuple[str, _Layer]]:
    """The DP layers owning trainable parameters; refuses uncovered and tied parameters."""
    layers, owner = [], {}
    for name, m in module.named_modules():
        if not isinstance(m, _DP_LAYERS):
            continue
        prefix = f"{name}." if name else ""
        params = []
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = prefix + pname
            if p in owner:
                raise ValueError(
                    f"parameter {owner[p]} is also {full}: tied parameters are not supported (a "
                    "tied parameter's per-example gradient is the sum over its uses, which the "
                    f"engine does not form). Untie it before make_private, e.g. model.{full} = "
                    f"nn.Parameter(model.{owner[p]}.detach().clone()), or freeze it"
                )
            owner[p] = full
            params.append((full, p))
        if params:
            layers.append((name, _Layer(m, params)))
    uncovered = [
        name
        for name, p in module.named_parameters(remove_duplicate=False)
        if p.requires_grad and p not in owner
    ]
    if uncovered:
        raise ValueError(
            "every trainable parameter must belong to a DP layer (nn.Linear, nn.LayerNorm, "
            "nn.RMSNorm, nn.Embedding or nn.MultiheadAttention, converted by make_private); "
            f"these do not: {', '.join(uncovered)}. Freeze them (requires_grad_(False)) or "
            "build their modules from those layers"
        )
    return layers


def _check_types(module, optimizer) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, DPOptimizer):
        raise TypeError("optimizer is already a DPOptimizer: pass the original optimizer")
    if any(getattr(m, "_dp_controller", None) is not None for m in module.modules()):
        raise RuntimeError("module is already private (attached to a PrivacyEngine)")


def _check_optimizer_params(optimizer, layers) -> None:
    private = {p for _, layer in layers for _, p in layer.params}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad and p not in private:
                raise ValueError(
                    f"optimizer param_groups[{i}] holds a trainable parameter of shape "
                    f"{tuple(p.shape)} that is not a private parameter of the module"
                )


def _check_real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {want}, got {value}")
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_groups(m: nn.Module) -> int:
    """Number of block-clipping groups of one DP layer (mirrors the pieces its backward makes:
    tiles of each trainable weight, plus one group for trainable biases without weights)."""
    if isinstance(m, DPLinear):
        parts = [(m.weight, m.bias, m.out_features, m.in_features)]
    elif isinstance(m, DPConv1D):
        parts = [(m.weight, m.bias, m.nf, m.nx)]
    elif isinstance(m, DPMultiheadAttention):
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            parts = [(m.in_proj_weight, m.in_proj_bias, e, e)] * 3
        else:
            weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            parts = [(w, m.in_proj_bias, e, w.shape[1]) for w in weights]
    else:
        return 1
    tiles = sum(DF.block_clip_num_groups(dout, din) for w, _, dout, din in parts if w.requires_grad)
    bias_only = any(
        not w.requires_grad and b is not None and b.requires_grad for w, b, _, _ in parts
    )
    return tiles + int(bias_only)


def _thresholds(clipping, max_grad_norm, layers):
    """(per-layer thresholds {layer name: C_k}, the one group threshold of flat/block, C_tot)."""
    if clipping == "flat":
        return {}, max_grad_norm, max_grad_norm
    if clipping == "block":
        groups = sum(_block_groups(layer.module) for _, layer in layers)
        return {}, max_grad_norm / math.sqrt(max(groups, 1)), max_grad_norm
    names = [name for name, _ in layers]
    if not isinstance(max_grad_norm, Mapping):
        each = max_grad_norm / math.sqrt(max(len(names), 1))
        return dict.fromkeys(names, each), None, max_grad_norm
    missing = [n for n in names if n not in max_grad_norm]
    unknown = [n for n in max_grad_norm if n not in names]
    if missing or unknown:
        raise ValueError(
            "max_grad_norm mapping must give a threshold for each DP layer with trainable "
            f"parameters ({names}); missing {missing}, unknown {unknown}"
        )
    thresholds = {n: _check_real(f"max_grad_norm[{n!r}]", c, positive=True)
                  for n, c in max_grad_norm.items()}  # fmt: skip
    return thresholds, None, math.sqrt(sum(c * c for c in thresholds.values()))


def _refuse_outside_gradient(name: str):
    """Tensor hook on a private parameter: DP layers give it no gradient (the engine writes
    .grad in step), so any gradient autograd delivers comes from a use outside its DP layer."""

    def hook(grad):
        if grad is not None:
            raise RuntimeError(
                f"parameter {name} received a gradient from outside its DP layer (it is used "
                "directly, e.g. a weight tied through F.linear, or a penalty term in the loss); "
                "such a gradient is not clipped per example. Untie the parameter; use the "
                "optimizer's weight_decay instead of a penalty in the loss"
            )

    return hook
