"""PrivacyEngine: make a model, its optimizer and its data loader differentially private.

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat")
    ...  # the usual loop: zero_grad, forward, loss.backward(), optimizer.step()
    engine.get_epsilon(1e-5)

What happens in one logical step (docs/design.md §5):
- the loader draws the batch by Poisson sampling at rate q = batch_size / N, exactly (sizes
  vary, an empty batch is a batch with zero rows), and tells the clipper its size: the step's
  backward passes may clip at most that many examples, and the next batch waits for the step;
- modules that mix examples (BatchNorm, running statistics) are refused at make_private, and
  a buffer changed in a training forward raises there;
- in each backward pass the DP layers hand their activations and output gradients to the
  engine's clipper, which forms clipped per-example sums (noise-free) into one fp32
  accumulator per parameter: "flat" once the pass ends (a callback queued on the autograd
  engine), "per-layer" and "block" inside each layer's backward. The accumulators are views
  of one flat buffer covering every private parameter. Several backward passes
  (micro-batches of one Poisson batch) add into the same buffer;
- any failure in a backward pass poisons the step: step() and further backward passes raise
  until zero_grad(), so a partial sum is never released;
- optimizer.step() refuses a poisoned or misused step, checks the budget, records the step
  with the accountant (a release that then fails is counted in stats.unreleased_steps), adds
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
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from . import functional as DF
from . import integrations
from .accounting import PrivacyBudget, calibrate_noise_multiplier, make_accountant
from .kernels.norm_bounds import RELEASE_ROUNDING, as_fp32_factors, clip_factors
from .kernels.utils import FLOAT_DTYPES
from .nn import (
    DPConv1D,
    DPEmbedding,
    DPLayerNorm,
    DPLinear,
    DPMultiheadAttention,
    DPRMSNorm,
    _check_attention,
    _check_embedding,
    group_sq_bounds,
)

__all__ = ["DPOptimizer", "PoissonBatchSampler", "PoissonDataLoader", "PrivacyEngine"]

CLIPPING_STYLES = ("flat", "per-layer", "block")
CLIPPING_ALIASES = {"per_layer": "per-layer"}  # Opacus' spelling
LOSS_REDUCTIONS = ("mean", "sum")
# Opacus' ways of computing per-sample gradients: dp_attn's DP layers always use their own
# kernels, so each is accepted and means the same here ("no_op", where the user computes
# p.grad_sample, is refused in make_private); the "ghost" ones return a criterion too.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "ghost_fsdp", "ghost_tp")
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
    examples whose per-example gradient norm was not finite (they contributed zero), and
    steps that were accounted but not released (their release raised)."""

    steps: int = 0
    examples: int = 0
    nonfinite_examples: int = 0
    # steps the accountant recorded whose release then failed (the noise draw raised, ...):
    # counted in ε, no gradient released
    unreleased_steps: int = 0


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

    It also keeps the step's misuse checks (docs/design.md §1, one logical step, one Poisson
    batch): the size of the batch the engine's loader delivered for the step, the examples
    clipped in it, and whether the step is poisoned (a failure after which the buffer may hold
    part of a pass: nothing is released until zero_grad()).
    """

    def __init__(self, style, loss_reduction, max_grad_norm, thresholds, stats, params,
                 tied_groups):  # fmt: skip
        self.style = style
        # {DP layer: its group's key} for the layers of tied embeddings (embedding and head)
        self.tied_groups = tied_groups
        # (examples, tokens) of this forward's batched embedding, for 1-D position ids
        self.forward_tokens: tuple[int, int] | None = None
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
        self.delivered: int | None = None  # size of the loader's batch for this step
        self.loader_in_use = False  # the engine's loader has delivered a batch
        self.step_examples = 0  # examples that entered a backward pass in this step
        self.poisoned: str | None = None  # why this step's buffer must not be released
        self._warned_unchecked = False
        self.grad_scaler = None  # make_private(grad_scaler=): backward passes see S·loss
        self._pass_loss_scale = 1.0  # the scaler's S when the pass began
        self._end_pass()

    # ---- one backward pass
    # Never traced by torch.compile: a backward graph compiled from it would run its side
    # effects (the pass callback, the accumulator) once, at trace time. A DP layer's autograd
    # Function therefore runs eagerly inside a compiled model, and fullgraph=True fails naming
    # this function (docs/supported.md).
    @torch.compiler.disable
    def record(self, owner: nn.Module, pieces) -> None:
        try:
            batch = pieces[0].batch_size
            self._begin(owner, batch, pieces[0])
            if batch == 0:
                return
            with _oom_points_to_micro_batches(batch):
                self._record(owner, pieces, batch)
        except BaseException as err:
            # some layers' sums may already be in the buffer: a retry would add them twice
            self.poison(f"a backward pass raised while clipping ({type(err).__name__})")
            raise

    def _record(self, owner: nn.Module, pieces, batch: int) -> None:
        scale = self._to_true_gradients(batch)
        if owner in self.tied_groups:
            # A tied embedding and head are one group, clipped once both uses are in.
            self._tied.setdefault(self.tied_groups[owner], []).extend(pieces)
        elif self.style == "flat":
            self._add_flat(pieces, group_sq_bounds(pieces))
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
        if self._pass_open and self._pass_alive() is None:
            # The autograd engine holds a pass's end-of-pass callback until that backward
            # ends, successfully or not: dead with the pass still open means the backward
            # failed after some layers were clipped, and this is a new one (a retry). A live
            # callback with a different backward is a nested one (reentrant checkpointing)
            # inside the pass, which belongs to it; so a graph task id cannot tell them apart.
            raise RuntimeError(
                "loss.backward() was called again after a backward pass failed part-way: the "
                "failed pass's clipped gradients are still held. Call optimizer.zero_grad() "
                "before retrying"
            )
        if not self._pass_open:
            if self.poisoned is not None:
                raise RuntimeError(
                    f"loss.backward() refused: {self.poisoned}, and this step's clipped "
                    "gradients may be incomplete. Call optimizer.zero_grad() before retrying"
                )
            self._check_batch_fits(batch)

            def end_of_pass():
                self._end_pass()

            torch.autograd.Variable._execution_engine.queue_callback(end_of_pass)
            self._pass_alive = weakref.ref(end_of_pass)
            self.step_examples += batch
            self._pass_open, self._pass_batch = True, batch
            # One read (a device sync) per pass: the scale only changes in scaler.update().
            scaler = self.grad_scaler
            self._pass_loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
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
                scale = self._to_true_gradients(self._pass_batch)
                for group, pieces in self._tied.items():
                    if self.style == "flat":
                        self._add_flat(pieces, group_sq_bounds(pieces))
                    else:
                        threshold = self.thresholds[group] if self.style == "per-layer" else (
                            self.max_grad_norm)  # fmt: skip
                        self._clip_group(pieces, threshold, scale)
                if self._kept:
                    with _oom_points_to_micro_batches(self._pass_batch):
                        factors = self._factors(self._sq, self.max_grad_norm, scale)
                        for pieces in self._kept:
                            for piece in pieces:
                                self._add(piece.clipped_sums(factors))
                self.stats.examples += self._pass_batch
                count = self._pass_nonfinite.sum()
                self._nonfinite = count if self._nonfinite is None else self._nonfinite + count
        except BaseException as err:
            # the layers summed before the failure are in the buffer, the others are not
            self.poison(f"the end of a backward pass raised while clipping ({type(err).__name__})")
            raise
        finally:
            self._pass_open, self._pass_batch, self._pass_owners = False, 0, set()
            self._sq, self._kept, self._pass_nonfinite, self._tied = None, [], None, {}

    def _add_flat(self, pieces, sq_bounds) -> None:
        """Flat clipping: keep the pieces and add their bounds to the pass's total."""
        self._sq = sq_bounds if self._sq is None else tuple(map(torch.add, self._sq, sq_bounds))
        self._kept.append(pieces)

    def _to_true_gradients(self, batch: int) -> float:
        """What turns the pass's raw per-example material into true per-example gradients:
        B undoes a mean loss's 1/B, 1/S a GradScaler's scale. Clip factors and released sums
        are computed on raw·this, so the clip bound holds whatever its value (a wrong S costs
        utility, never privacy)."""
        return (float(batch) if self.mean else 1.0) / self._pass_loss_scale

    def _clip_group(self, pieces, threshold: float, scale: float) -> None:
        factors = self._factors(group_sq_bounds(pieces), threshold, scale)
        for piece in pieces:
            self._add(piece.clipped_sums(factors))

    def _factors(self, sq_bounds, threshold: float, scale: float) -> torch.Tensor:
        """fp32 factors for the raw (loss-scaled) gradients: scale·clip_factors(N, E, C) from the
        certified bounds (float64, rounding included: kernels/norm_bounds.py) of the group's
        per-example norm N and release rounding E, so that each released contribution is at
        most C·(1 + RELEASE_ROUNDING); 0 where N is not finite (a or g held inf or NaN)."""
        norm_sq, error_sq, underflow = sq_bounds
        norms, errors = norm_sq.sqrt() * scale, error_sq.sqrt() * scale
        finite = torch.isfinite(norms)
        self._pass_nonfinite |= ~finite
        factors = clip_factors(norms, errors, underflow, threshold)  # float64
        return as_fp32_factors(torch.where(finite, factors, 0.0) * scale)

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
    def poison(self, reason: str) -> None:
        """Refuse to release this step until zero_grad() (the first reason is kept)."""
        if self.poisoned is None:
            self.poisoned = reason

    def batch_delivered(self, size: int) -> None:
        """The engine's loader is handing out the batch of the next step."""
        if self.step_examples:
            raise RuntimeError(
                "the data loader was asked for its next batch while this step already holds "
                f"the clipped gradients of {self.step_examples} examples: call "
                "optimizer.step() (or optimizer.zero_grad() to discard them) before drawing "
                "the next batch. Each Poisson batch is one step; to accumulate gradients, split "
                "one batch into micro-batches (forward and backward on slices of it) and call "
                "optimizer.step() once"
            )
        self.delivered, self.loader_in_use = size, True

    def _check_batch_fits(self, batch: int) -> None:
        """A new backward pass of `batch` examples: within the batch the loader delivered."""
        if self.delivered is None:
            if self.loader_in_use and batch:
                raise RuntimeError(
                    f"a backward pass over {batch} examples in a step for which the data loader "
                    "returned by make_private delivered no batch (the last one was already "
                    "stepped): draw each step's batch from that loader"
                )
        elif self.step_examples + batch > self.delivered:
            raise RuntimeError(
                f"this backward pass clips {batch} examples on top of the {self.step_examples} "
                "already clipped in this step: more than the data loader's batch for this step "
                f"({self.delivered} examples). Each example of a Poisson batch goes through one "
                "backward pass per step: micro-batches must be disjoint slices of the batch. "
                "Call optimizer.step() before the next batch, or optimizer.zero_grad() to "
                "discard this step's gradients"
            )

    def check_releasable(self) -> None:
        """Raise (before anything is accounted) if this step's buffer must not be released."""
        if self.poisoned is not None:
            raise RuntimeError(
                f"optimizer.step() refused: {self.poisoned}, so this step's clipped gradients "
                "may be incomplete or counted twice. Call optimizer.zero_grad() to discard them, "
                "then redo the step's forward and backward passes"
            )
        if self._pass_open:
            raise RuntimeError(
                "optimizer.step() was called before the backward pass finished (if a backward "
                "pass raised, call optimizer.zero_grad() to discard its partial gradients)"
            )
        if self.delivered and not self.step_examples:
            raise RuntimeError(
                f"optimizer.step() was called without a backward pass over the {self.delivered} "
                "examples of the data loader's batch: call loss.backward() first (an empty "
                "batch may be stepped without one)"
            )
        if self.delivered is None and self.step_examples and not self._warned_unchecked:
            self._warned_unchecked = True
            warnings.warn(
                "this step's examples were not drawn from the data loader make_private "
                "returned, so the engine cannot check them against its Poisson sampling (one "
                "batch per step, each example in one backward pass per step); ε holds only if "
                "every step's batch is such a Poisson sample",
                stacklevel=4,
            )

    def end_step(self) -> None:
        """The step was accounted: its batch is used up."""
        self.delivered, self.step_examples = None, 0

    @property
    def pass_open(self) -> bool:
        return self._pass_open

    def take(self) -> torch.Tensor | None:
        """The step's summed clipped gradients (flat, fp32; None if nothing was added)."""
        buffer, self.buffer = self.buffer, None
        return buffer

    def clear(self) -> None:
        """zero_grad(): discard the step's clipped gradients (its batch stays the step's)."""
        self.buffer, self.step_examples, self.poisoned = None, 0, None
        self._pass_open = False
        self._end_pass()

    def read_nonfinite(self) -> int:
        count, self._nonfinite = self._nonfinite, None
        return 0 if count is None else int(count)


# ---------------------------------------------------------------- Poisson sampling


WORD_BITS = 32  # the inclusion test compares uniform words of this many bits


def rate_words(sample_rate: float) -> list[int]:
    """The binary expansion of `sample_rate` (a double, so a dyadic rational) in WORD_BITS-bit
    words: sample_rate = Σ_j words[j] · 2^(-WORD_BITS·(j+1)) exactly. 1 is [2^WORD_BITS]."""
    rate = Fraction(sample_rate)
    digits = 1
    while (rate * 2 ** (WORD_BITS * digits)).denominator != 1:
        digits += 1
    value = int(rate * 2 ** (WORD_BITS * digits))
    mask = (1 << WORD_BITS) - 1
    words = [(value >> (WORD_BITS * (digits - 1 - j))) & mask for j in range(digits)]
    if value >> (WORD_BITS * digits):  # rate = 1: its only digit is above the point
        words[0] = 1 << WORD_BITS
    return words


def _uniform_words(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent uniform WORD_BITS-bit integers (int64): torch draws a range of
    2^32 from 64 random bits modulo 2^32, exactly uniform."""
    return torch.randint(0, 2**WORD_BITS, (count,), generator=generator, dtype=torch.int64)


def poisson_mask(num_samples: int, words: list[int], generator: torch.Generator) -> torch.Tensor:
    """Which of `num_samples` examples join the batch, each independently with probability
    q = Σ_j words[j]·2^(-32(j+1)) (rate_words(q)) exactly.

    Example i includes itself iff a uniform U_i in [0, 1) is < q. U_i's binary digits are drawn
    lazily, 32 at a time, and compared with q's: a word below q's word includes, above
    excludes, equal stays undecided for the next word (probability 2^-32 per word); when q's
    expansion ends, the undecided have U_i >= q and are excluded. So P(include) = q to the last
    bit of the double, whereas float32 `rand() < q` rounds q to a multiple of 2^-24."""
    included = torch.zeros(num_samples, dtype=torch.bool)
    undecided = torch.arange(num_samples)
    for word in words:
        if not len(undecided):
            break
        drawn = _uniform_words(len(undecided), generator)
        included[undecided[drawn < word]] = True
        undecided = undecided[drawn == word]
    return included


class PoissonBatchSampler(Sampler):
    """Batches of dataset indices drawn by Poisson sampling: each of the `num_samples` examples
    joins each batch independently with probability `sample_rate`, exactly (the double's
    value, see poisson_mask). Batch sizes vary and may be 0. `steps` batches per pass over the
    sampler ("epoch").

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
        self._words = rate_words(self.sample_rate)
        # set by the loader for each pass over it: the size of every batch yielded, in order
        self.yielded_sizes: deque[int] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        sizes = self.yielded_sizes
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        for _ in range(self.steps):
            batch = poisson_mask(self.num_samples, self._words, generator).nonzero().flatten()
            if sizes is not None:
                sizes.append(len(batch))
            yield batch.tolist()


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


class _StepCheckedLoader(DataLoader):
    """A DataLoader over a PoissonBatchSampler that tells the engine it serves (once
    make_private returned it) the size of each batch it hands out, so that a step's backward
    passes can be checked against the step's batch."""

    def __init__(self, dataset, batch_sampler: PoissonBatchSampler, collate_fn, **kwargs):
        if kwargs.get("in_order") is False:
            raise ValueError(
                "in_order=False is not supported: the engine matches each batch with its "
                "Poisson draw in order"
            )
        collate = _EmptyBatchCollate(dataset, collate_fn or default_collate)
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate, **kwargs)
        self.sample_rate = batch_sampler.sample_rate
        self._step_tracker: _Clipper | None = None

    def __iter__(self):
        # The sampler runs ahead of the batches yielded when workers prefetch, but both go in
        # order: the sizes it appends are popped here one per batch.
        sizes = deque()
        self.batch_sampler.yielded_sizes = sizes
        for batch in super().__iter__():
            size = sizes.popleft()
            if self._step_tracker is not None:
                self._step_tracker.batch_delivered(size)
            yield batch


class PoissonDataLoader(_StepCheckedLoader):
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
        super().__init__(dataset, sampler, collate_fn, **kwargs)

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
                "Poisson batches); a custom batch_sampler is not supported. To train on part "
                "of a dataset, wrap it in torch.utils.data.Subset"
            )
        dataset = data_loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        custom = [
            s for s, default in ((data_loader.sampler, (SequentialSampler, RandomSampler)),
                                 (data_loader.batch_sampler, (BatchSampler,)))
            if type(s) not in default
        ]  # fmt: skip
        if custom:
            raise ValueError(
                f"data_loader uses a {type(custom[0]).__name__}: the Poisson loader that "
                "replaces it samples every example of the dataset at rate batch_size / "
                "len(dataset), whatever that sampler would have drawn. To train on part of a "
                "dataset, wrap it in torch.utils.data.Subset and build the loader with "
                "batch_size (and shuffle) only"
            )
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
    its own value).

    With a GradScaler (make_private(grad_scaler=)), scaler.step(optimizer) calls step()
    directly: the release is already in true units, and the scaler's inf check is made on
    the released gradient (a non-finite one is accounted, once, and the wrapped optimizer's
    step is skipped)."""

    # Tells GradScaler.step() to call step() as it is: otherwise it would unscale_ and
    # inf-check .grad first, find none (the engine sets them in step) and raise.
    _step_supports_amp_scaling = True

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
        scaler = self._engine._grad_scaler
        # GradScaler.step() sets found_inf on an optimizer with _step_supports_amp_scaling
        # for the duration of the call
        if scaler is None and hasattr(self, "found_inf"):
            raise RuntimeError(
                "scaler.step(optimizer) on an engine that was not given the GradScaler: the "
                "per-example gradients of a scaled loss are S times too large, so they would be "
                "clipped (and released) at the wrong scale. Pass grad_scaler=scaler to "
                "make_private"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine._release(self.noise_multiplier)
        if scaler is not None and scaler.is_enabled() and self._released_nonfinite(scaler):
            return loss  # accounted (it was released); the scaler backs off in update()
        self.original_optimizer.step()
        return loss

    def _released_nonfinite(self, scaler) -> bool:
        """Record the GradScaler's inf check, made on the released gradient (scaler.update()
        needs one; GradScaler's own method for optimizers that handle scaling themselves)."""
        found = scaler._check_inf_per_device(self)
        return bool(sum(v.item() for v in found.values()))

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"


# ---------------------------------------------------------------- the engine


class PrivacyEngine:
    """Converts a model to DP layers, samples batches by Poisson sampling, privatises each
    optimizer step and keeps the privacy ledger. accountant: "prv" (default) or "rdp".
    secure_mode: the default of make_private's secure_mode (on unless turned off here)."""

    def __init__(self, accountant: str = "prv", *, secure_mode: bool = True):
        if accountant == "gdp":
            raise ValueError(
                "accountant='gdp' (Opacus' Gaussian-DP accountant) is not available: its ε is a "
                "central-limit approximation, not an upper bound, and dp_attn reports only upper "
                "bounds. Use accountant='prv' (tight, the default) or accountant='rdp'"
            )
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        self.accountant = make_accountant(accountant)
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self._stats = PrivacyStats()
        self._clipper: _Clipper | None = None
        self._settings: dict | None = None
        self._budget = None
        self._grad_scaler = None

    # ---- set-up
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Mapping[str, float] | list[float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        batch_first: bool = True,
        poisson_sampling: bool = True,
        grad_sample_mode: str = "hooks",
        criterion: nn.Module | None = None,
        noise_generator: None = None,
    ) -> tuple:
        """Make training private; returns (module, optimizer, data_loader) to train with, or
        (module, optimizer, criterion, data_loader) for a "ghost" grad_sample_mode (as Opacus).

        module: converted in place (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and
            nn.MultiheadAttention become their dp_attn.nn versions, keeping the same Parameter
            objects and state_dict keys). Every trainable parameter must belong to one of
            them, once (tied parameters are refused).
        optimizer: the optimizer over the module's parameters; wrapped.
        data_loader: an ordinary loader with batch_size (and shuffle; a custom sampler is
            refused: wrap the dataset in torch.utils.data.Subset instead); replaced by a
            PoissonDataLoader with q = batch_size / len(dataset) and as many batches per
            epoch. Each step's backward passes must cover at most that step's batch (one
            batch per optimizer.step(); micro-batches are disjoint slices of it).
        noise_multiplier: z >= 0 (0 gives no privacy: ε = inf).
        max_grad_norm: C > 0. "flat": the bound on each example's whole gradient. "per-layer":
            split as C/√K over the K DP layers with trainable parameters, or a mapping
            {DP layer name: C_k} covering each of them, or (Opacus) a list with one threshold
            C_p per trainable parameter in module.parameters() order: each DP layer is then
            clipped to C_k = sqrt(Σ C_p²) over its parameters. The noise uses sqrt(Σ C_k²).
            "block": C/√K over all K groups of the model: each 128×128 tile of a linear weight
            (DPMultiheadAttention: of each of its Q, K and V matrices) with its bias slice
            (dp_attn.functional.block_clip_num_groups), and each norm layer, embedding and
            bias-only layer as one group.
        clipping: "flat", "per-layer" (or Opacus' "per_layer") or "block" (docs/design.md §1).
        loss_reduction: "mean" if the loss averages over the examples of the batch (each DP
            layer's output gradients are multiplied by the batch size it saw), "sum" if it sums.
        target_epsilon, target_delta: an optional budget; a step that would exceed it raises
            BudgetExceededError before anything is released.
        generator: fixes the Poisson sampling's draws (tests only; default: CSPRNG-seeded).
        secure_mode: round the noised sum to a power-of-two grid in (σ/4, σ/2], against
            floating-point attacks on the Gaussian samples (docs/threat_model.md); the normals
            are those of secure_mode=False (tails followed to 9.42σ in both modes). Same ε, at
            most 1/48 more noise variance. None (default): the engine's, PrivacyEngine(
            secure_mode=), which is on unless turned off there: without it the low-order bits
            of the float32 samples, which depend on the data, are released as they are.
        grad_scaler: the torch.amp.GradScaler whose scale(loss) the backward passes see (fp16
            training): the engine divides the per-example gradients by its scale before
            clipping, and scaler.step(optimizer) releases (docs/opacus_migration.md).
            Required when the loss is scaled: nothing else tells the engine the scale.
        batch_first, poisson_sampling, grad_sample_mode, criterion, noise_generator: Opacus'
            arguments, accepted where dp_attn does what they ask: batch_first=True and
            poisson_sampling=True only; any grad_sample_mode but "no_op" (the DP layers always
            use dp_attn's kernels); criterion is returned, as it is, for the "ghost" modes;
            noise_generator must be None (the noise is always keyed by the OS CSPRNG).
        """
        _check_opacus_arguments(batch_first, poisson_sampling, grad_sample_mode, noise_generator)
        if self._clipper is not None:
            raise RuntimeError("this PrivacyEngine is already in use: create one per model")
        _check_types(module, optimizer)
        _refuse_batch_statistics(module)
        noise_multiplier = _check_real("noise_multiplier", noise_multiplier, positive=False)
        if isinstance(clipping, str):
            clipping = CLIPPING_ALIASES.get(clipping, clipping)
        if clipping not in CLIPPING_STYLES:
            raise ValueError(
                f"clipping must be one of {CLIPPING_STYLES} ('per_layer' is 'per-layer'), got "
                f"{clipping!r}"
            )
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        if not isinstance(max_grad_norm, (Mapping, list, tuple)):
            max_grad_norm = _check_real("max_grad_norm", max_grad_norm, positive=True)
        elif clipping != "per-layer":
            raise TypeError(
                f"max_grad_norm must be a number for clipping={clipping!r} (a mapping of "
                "per-layer thresholds, or a list of per-parameter ones, is for "
                "clipping='per-layer')"
            )
        if (target_epsilon is None) != (target_delta is None):
            raise ValueError("give both target_epsilon and target_delta for a budget, or neither")
        if secure_mode is None:
            secure_mode = self.secure_mode
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        if "ghost" in grad_sample_mode:
            criterion = _ghost_criterion(criterion, loss_reduction)
        loader = PoissonDataLoader.from_data_loader(data_loader, generator=generator)
        budget = None
        if target_epsilon is not None:
            budget = PrivacyBudget(target_epsilon, target_delta, self.accountant)

        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        converted = _convert(module)
        try:
            layers = _private_layers(module)
            _check_optimizer_params(optimizer, layers)
            per_layer = max_grad_norm
            if isinstance(max_grad_norm, (list, tuple)):
                per_layer = _layer_thresholds(max_grad_norm, trainable, optimizer, layers)
            thresholds, group_threshold, total = _thresholds(clipping, per_layer, layers)
        except Exception:
            for m, cls in converted:  # leave the user's model as it was
                m.__class__ = cls
            raise

        self._noise_multiplier = noise_multiplier
        self._total_threshold = total
        self._secure_mode = secure_mode
        self._grad_scaler = grad_scaler
        self._sample_rate = loader.sample_rate
        self._expected_batch_size = loader.sample_rate * len(loader.dataset)
        self._budget = budget
        self._params = [(name, p) for _, layer in layers for name, p in layer.params]
        tied_groups = {layer.module: layer.tied_to for _, layer in layers if layer.tied_to}
        tied_groups.update({group: group for group in tied_groups.values()})
        self._padding_rows = {  # a tied head trains the padding row: only untied ones stay 0
            layer.module.weight: layer.module.padding_idx
            for _, layer in layers
            if isinstance(layer.module, DPEmbedding) and layer.module.padding_idx is not None
            and layer.module not in tied_groups
        }
        if isinstance(max_grad_norm, Mapping):
            max_grad_norm = dict(max_grad_norm)
        elif isinstance(max_grad_norm, tuple):
            max_grad_norm = list(max_grad_norm)
        self._settings = {
            "clipping": clipping,
            "loss_reduction": loss_reduction,
            "max_grad_norm": max_grad_norm,
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
            self._stats, [p for _, p in self._params], tied_groups,
        )
        self._clipper.grad_scaler = grad_scaler
        for m in module.modules():
            if isinstance(m, _DP_LAYERS):
                m._dp_controller = self._clipper
        for name, p in self._params:
            p.register_hook(_refuse_outside_gradient(name))
        for name, m in module.named_modules():
            if next(m.named_buffers(recurse=False), None) is not None:
                _BufferGuard(name, self._clipper).attach(m)
        loader._step_tracker = self._clipper
        self.module = module
        self.optimizer = DPOptimizer(optimizer, self)
        if "ghost" in grad_sample_mode:
            return module, self.optimizer, criterion, loader
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
        max_grad_norm: float | Mapping[str, float] | list[float],
        clipping: str = "flat",
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        secure_mode: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        batch_first: bool = True,
        poisson_sampling: bool = True,
        grad_sample_mode: str = "hooks",
        criterion: nn.Module | None = None,
        noise_generator: None = None,
    ) -> tuple:
        """make_private with the noise multiplier calibrated (by this engine's accountant) so
        that `epochs` epochs of len(data_loader) steps at q = batch_size / len(dataset) spend
        exactly (target_epsilon, target_delta); that budget is then enforced."""
        _check_opacus_arguments(batch_first, poisson_sampling, grad_sample_mode, noise_generator)
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
            grad_scaler=grad_scaler, grad_sample_mode=grad_sample_mode, criterion=criterion,
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
        # every check that can refuse the step comes before the accountant records it
        self._clipper.check_releasable()
        if self._budget is not None:
            self._budget.check(noise_multiplier, self._sample_rate)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=self._sample_rate)
        try:
            grads = self._clipper.take()
            if grads is None:
                grads = torch.zeros(self._clipper.size, dtype=torch.float32, device=self._device())
            # The certified sensitivity is C_tot·(1 + RELEASE_ROUNDING): scale the noise with it.
            sensitivity = self._total_threshold * (1.0 + RELEASE_ROUNDING)
            self._add_noise(grads, noise_multiplier * sensitivity)
            grads.div_(self._expected_batch_size)
            for _, p in self._params:
                if not p.requires_grad:
                    continue
                grad = grads[self._clipper.slices[p]].view(p.shape)
                if p in self._padding_rows:
                    grad[self._padding_rows[p]] = 0.0  # never trained: its true gradient is 0
                p.grad = self._as_grad(p, grad)
        except BaseException:
            self._stats.unreleased_steps += 1  # in ε, yet nothing (or not all) was released
            raise
        finally:
            self._clipper.end_step()
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
    """A DP layer with trainable parameters: one privacy group under per-layer clipping, or,
    tied_to set, part of the group of that embedding (a head sharing its weight)."""

    module: nn.Module
    params: list  # [(qualified name, Parameter)] it owns and trains
    tied_to: nn.Module | None = None


def _tie(first: nn.Module, second: nn.Module, p: nn.Parameter) -> nn.Module | None:
    """The embedding of a supported tie (one weight for an embedding and an output head), or
    None: every other sharing is refused."""
    pair = {type(first): first, type(second): second}
    embedding, head = pair.get(DPEmbedding), pair.get(DPLinear)
    if embedding is None or head is None or not (embedding.weight is p is head.weight):
        return None
    return embedding


def _private_layers(module: nn.Module) -> list[tuple[str, _Layer]]:
    """The DP layers owning trainable parameters; refuses uncovered parameters and shared ones
    other than tied embeddings (an nn.Embedding and an nn.Linear head with one weight)."""
    layers, owner, by_module, tied_embeddings = [], {}, {}, set()
    for name, m in module.named_modules():
        if not isinstance(m, _DP_LAYERS):
            continue
        prefix = f"{name}." if name else ""
        params, tied_to = [], None
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = prefix + pname
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"parameter {full} of {type(m).__name__} has dtype {p.dtype}; the DP kernels "
                    "take float16, bfloat16 and float32: convert the model with model.float() "
                    "(and train in lower precision with torch.autocast)"
                )
            if p in owner:
                first_name, first = owner[p]
                embedding = _tie(first, m, p)
                if embedding is None:
                    raise ValueError(
                        f"parameter {first_name} is also {full}: the DP layers "
                        f"{first_name.rpartition('.')[0] or 'the model'} and {name or 'the model'}"
                        " share it, and only an embedding's weight shared with an nn.Linear "
                        "output head (tied embeddings) is supported: its per-example gradient "
                        f"is the sum over its uses. Untie it, e.g. model.{full} = "
                        f"nn.Parameter(model.{first_name}.detach().clone()), or freeze it"
                    )
                # The weight stays with its first layer; the group is the embedding's.
                if embedding is m:
                    by_module[first].tied_to = m
                    tied_embeddings.add(m)
                else:
                    tied_to = embedding
                continue
            owner[p] = (full, m)
            params.append((full, p))
        if params or tied_to is not None or m in tied_embeddings:
            layer = _Layer(m, params, tied_to)
            layers.append((name, layer))
            by_module[m] = layer
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
    # A tied head is part of its embedding's group (one group, one block-clipping group).
    grouped = [(name, layer) for name, layer in layers if layer.tied_to is None]
    heads = {name: next(n for n, other in grouped if other.module is layer.tied_to)
             for name, layer in layers if layer.tied_to is not None}  # fmt: skip
    if clipping == "block":
        groups = sum(_block_groups(layer.module) for _, layer in grouped)
        return {}, max_grad_norm / math.sqrt(max(groups, 1)), max_grad_norm
    names = [name for name, _ in grouped]
    if not isinstance(max_grad_norm, Mapping):
        each = max_grad_norm / math.sqrt(max(len(names), 1))
        return dict.fromkeys([*names, *heads], each), None, max_grad_norm
    missing = [n for n in names if n not in max_grad_norm]
    unknown = [n for n in max_grad_norm if n not in names]
    if missing or unknown:
        raise ValueError(
            "max_grad_norm mapping must give a threshold for each DP layer with trainable "
            f"parameters ({names}); missing {missing}, unknown {unknown}"
        )
    thresholds = {n: _check_real(f"max_grad_norm[{n!r}]", c, positive=True)
                  for n, c in max_grad_norm.items()}  # fmt: skip
    total = math.sqrt(sum(c * c for c in thresholds.values()))
    return {**thresholds, **{h: thresholds[e] for h, e in heads.items()}}, None, total


def _layer_thresholds(per_parameter, trainable, optimizer, layers) -> dict[str, float]:
    """Opacus' per-layer max_grad_norm, one threshold C_p per trainable parameter (in
    module.parameters() order), as dp_attn's per-DP-layer thresholds: a layer's parameters are
    clipped together to C_k = sqrt(Σ_p C_p²). Each example's contribution to the layer then
    has norm <= C_k, as when its parameters are clipped apart, so C_tot = sqrt(Σ_p C_p²) is
    the same sensitivity and the noise is that of Opacus."""
    names = [name for name, _ in trainable]
    if len(per_parameter) != len(names):
        raise ValueError(
            f"max_grad_norm is a list of {len(per_parameter)} thresholds; under per-layer "
            f"clipping a list needs one per trainable parameter, {len(names)}, in "
            f"module.parameters() order: {names}"
        )
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if in_optimizer != [id(p) for _, p in trainable]:
        raise ValueError(
            "max_grad_norm is a list, which Opacus pairs with the optimizer's parameters and "
            "dp_attn with module.parameters(); this optimizer holds them in another order (or "
            "not all of them). Pass a mapping {DP layer name: threshold} instead"
        )
    each = {
        id(p): _check_real(f"max_grad_norm[{i}] ({name})", c, positive=True)
        for i, ((name, p), c) in enumerate(zip(trainable, per_parameter, strict=True))
    }
    group_of = {layer.module: name for name, layer in layers if layer.tied_to is None}
    squares: dict[str, float] = {}
    for name, layer in layers:  # a tied head's parameters join its embedding's group
        group = group_of[layer.tied_to] if layer.tied_to is not None else name
        squares[group] = squares.get(group, 0.0) + sum(each[id(p)] ** 2 for _, p in layer.params)
    return {name: math.sqrt(sq) for name, sq in squares.items()}


def _check_opacus_arguments(batch_first, poisson_sampling, grad_sample_mode, noise_generator):
    """Refuse Opacus' options that would have dp_attn do something other than what they ask."""
    if batch_first is not True:
        raise ValueError(
            f"batch_first={batch_first!r}: dp_attn's privacy unit is dim 0 of every DP layer's "
            "input (one example per index). Put the batch first (e.g. build "
            "nn.MultiheadAttention with batch_first=True) and pass batch_first=True"
        )
    if poisson_sampling is not True:
        raise ValueError(
            f"poisson_sampling={poisson_sampling!r}: fixed-size batches do not match the "
            "accountant's analysis (each step a Poisson-subsampled Gaussian), so ε would not "
            "hold. dp_attn always samples by Poisson: drop the argument; to bound memory, split "
            "each Poisson batch into micro-batches before one optimizer.step()"
        )
    if grad_sample_mode == "no_op":
        raise ValueError(
            "grad_sample_mode='no_op' is for computing p.grad_sample yourself, which dp_attn "
            "never reads: its DP layers compute per-example norms and clipped sums in their "
            "own backward. Drop grad_sample_mode (or pass 'hooks')"
        )
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES} (all compute the same here: "
            f"dp_attn's kernels), got {grad_sample_mode!r}"
        )
    if noise_generator is not None:
        raise ValueError(
            "noise_generator: dp_attn keys every step's noise with fresh bits from the "
            "operating system's CSPRNG and takes no generator for it. Drop the argument "
            "(generator= fixes the Poisson sampling's draws, for tests)"
        )


def _ghost_criterion(criterion, loss_reduction: str):
    """The criterion make_private returns in Opacus' "ghost" modes, where Opacus applies
    loss_reduction to the criterion's per-example losses: here it is returned as it is (its
    loss.backward() is all the engine needs), so its own reduction must be loss_reduction."""
    if criterion is None:
        return nn.CrossEntropyLoss(reduction=loss_reduction)
    reduction = getattr(criterion, "reduction", loss_reduction)
    if reduction != loss_reduction:
        raise ValueError(
            f"criterion reduces by {reduction!r} and loss_reduction is {loss_reduction!r}: "
            "dp_attn uses the criterion as it is (Opacus' ghost mode would override its "
            f"reduction). Build it with reduction={loss_reduction!r}"
        )
    return criterion


def _refuse_batch_statistics(module: nn.Module) -> None:
    """Refuse the norms that mix examples: BatchNorm normalises each example with the
    statistics of its batch (one outlier moves every example's gradient), and running
    statistics are batch statistics released without noise."""
    for name, m in module.named_modules():
        where = f"{name or 'the model'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"cannot make {where} private: batch normalisation mixes the examples of a "
                "batch and its running statistics release them without noise. Replace it "
                "with nn.GroupNorm or nn.LayerNorm"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ValueError(
                f"cannot make {where} private: its running statistics are batch statistics, "
                "released without noise. Build it with track_running_stats=False (or use "
                "nn.GroupNorm)"
            )


class _BufferGuard:
    """Forward hooks on a module that owns buffers: a buffer replaced or written in place
    (its version counter moves) during a training forward with autograd on is a statistic of
    the batch, and releasing the model would release it without noise: raise, and poison the
    step so that nothing of it is released."""

    def __init__(self, name: str, clipper: _Clipper):
        self.name, self.clipper = name, clipper
        self.before: list[dict] = []  # one snapshot per forward in progress (nested calls)

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post)

    @staticmethod
    def snapshot(module: nn.Module) -> dict:
        return {n: (id(b), b._version) for n, b in module.named_buffers(recurse=False)}

    @torch.compiler.disable
    def pre(self, module, args) -> None:
        watched = module.training and torch.is_grad_enabled()
        self.before.append(self.snapshot(module) if watched else None)

    @torch.compiler.disable
    def post(self, module, args, output) -> None:
        before = self.before.pop() if self.before else None
        if before is None:
            return
        after = self.snapshot(module)
        changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        if changed:
            where = f"{self.name}." if self.name else ""
            self.clipper.poison(f"{where}{changed[0]} changed during a training forward")
            raise RuntimeError(
                f"{type(module).__name__} {self.name or '(the model)'} changed its buffer "
                f"{where}{changed[0]} during a training forward pass: a buffer computed from "
                "the batch (running statistics) would be released without noise. Use modules "
                "without batch statistics (nn.GroupNorm, nn.LayerNorm), or run this module "
                "in eval mode or under torch.no_grad()"
            )


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
