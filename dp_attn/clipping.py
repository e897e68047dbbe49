"""Clipping: the Clipper that every DP layer's backward hands its per-example material to
(docs/design.md §5, step 3), the clip thresholds of each clipping style, and the engine's
counters (PrivacyStats).

The Clipper forms clipped per-example sums (noise-free) into one flat fp32 buffer covering
every private parameter: "flat" once a backward pass ends (a callback queued on the autograd
engine), "per-layer" and "block" inside each layer's backward. Several backward passes
(micro-batches of one Poisson batch) add into the same buffer. It also keeps the step's
misuse checks, and any failure in a backward pass poisons the step: nothing is released
until zero_grad().
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import functional as DF
from .checks import check_real
from .kernels.norm_bounds import as_fp32_factors, clip_factors
from .nn import DPConv1D, DPLinear, DPMultiheadAttention
from .nn.clipper import Piece
from .nn.pieces import group_sq_bounds


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


class Clipper:
    """The per-step bookkeeping of one private model: every DP layer's `dp_clipper` (the
    GradientClipper contract of dp_attn.nn.clipper).

    `record(owner, pieces)` is called from a DP layer's backward with the per-example material
    of one privacy group (dp_attn.nn.pieces). Clipped sums go into one flat fp32 buffer (a
    slice per private parameter) until optimizer.step() takes it.

    It also keeps the step's misuse checks (docs/design.md §1, one logical step, one Poisson
    batch): the size of the batch the engine's loader delivered for the step, the examples
    clipped in it, and whether the step is poisoned (a failure after which the buffer may hold
    part of a pass: nothing is released until zero_grad()).
    """

    # The state of one backward pass, set by _begin and reset by _end_pass.
    _pass_open: bool
    _pass_batch: int
    _pass_owners: set[nn.Module]
    _pass_alive: weakref.ref[Callable[[], None]]
    _pass_nonfinite: torch.Tensor  # [B] bool: examples with a non-finite norm (in a pass)
    _sq: tuple[torch.Tensor, ...] | None  # flat clipping: the bounds summed over the groups
    _kept: list[Sequence[Piece]]  # flat clipping: the groups' pieces, summed at the pass's end
    _tied: dict[nn.Module, list[Piece]]  # tied groups' pieces, clipped at the pass's end

    def __init__(
        self,
        style: str,
        loss_reduction: str,
        group_threshold: float,
        layer_thresholds: Mapping[nn.Module, float],
        stats: PrivacyStats,
        params: Sequence[nn.Parameter],
        tied_groups: Mapping[nn.Module, nn.Module],
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.style = style
        # {DP layer: its group's key} for the layers of tied embeddings (embedding and head)
        self.tied_groups = tied_groups
        # (examples, tokens) of this forward's batched embedding, for 1-D position ids
        self.forward_token_shape: tuple[int, int] | None = None
        self.mean = loss_reduction == "mean"
        self.group_threshold = group_threshold  # flat: C; block: C/√K for every group
        self.layer_thresholds = layer_thresholds  # per-layer: {owner module: C_k}
        self.stats = stats
        self.slices: dict[nn.Parameter, slice] = {}
        offset = 0
        for p in params:
            self.slices[p] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.size = offset
        self.buffer: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None  # examples counted, not yet read
        self.delivered: int | None = None  # size of the loader's batch for this step
        self.loader_in_use = False  # the engine's loader has delivered a batch
        self.step_examples = 0  # examples that entered a backward pass in this step
        # a backward pass touched the loader's batch for this step (zero_grad keeps it: the
        # batch must still be stepped)
        self.batch_used = False
        self.poisoned: str | None = None  # why this step's buffer must not be released
        self._warned_unchecked = False
        self.grad_scaler = grad_scaler  # make_private(grad_scaler=): backward passes see S·loss
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
            if owner not in self.layer_thresholds:
                raise RuntimeError(
                    f"the DP layer {type(owner).__name__} had no trainable parameters when "
                    "make_private checked the model; call make_private after unfreezing them"
                )
            self._clip_group(pieces, self.layer_thresholds[owner], scale)
        else:
            small = [p for p in pieces if not p.blockwise]
            for piece in pieces:
                if piece.blockwise:
                    # clip(B·raw, C) = B·clip(raw, C/B): the kernel clips raw tiles to C/B.
                    self._add(piece.block_sums(self.group_threshold / scale, scale))
                    self._pass_nonfinite |= ~piece.finite_examples()
            if small:
                self._clip_group(small, self.group_threshold, scale)

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
            self.batch_used = self.batch_used or (batch > 0 and self.delivered is not None)
            self._pass_open, self._pass_batch = True, batch
            # One read (a device sync) per pass: the scale only changes in scaler.update().
            scaler = self.grad_scaler
            self._pass_loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
            self._pass_nonfinite = torch.zeros(batch, dtype=torch.bool, device=piece.g.device)
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
                        threshold = (
                            self.layer_thresholds[group]
                            if self.style == "per-layer"
                            else (self.group_threshold)
                        )
                        self._clip_group(pieces, threshold, scale)
                if self._kept:
                    with _oom_points_to_micro_batches(self._pass_batch):
                        factors = self._factors(self._sq, self.group_threshold, scale)
                        for group_pieces in self._kept:
                            for piece in group_pieces:
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
            self._sq, self._kept, self._tied = None, [], {}
            self._pass_nonfinite = torch.zeros(0, dtype=torch.bool)

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

    def alias(self, param: nn.Parameter, registered: nn.Parameter) -> None:
        """Route material keyed by `param` to the slice of the registered private parameter
        it stands for (FSDP2 runs a layer with an unsharded copy of a sharded parameter)."""
        self.slices[param] = self.slices[registered]

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
                "optimizer.step() before drawing the next batch. Each Poisson batch is one "
                "step; to accumulate gradients, split one batch into micro-batches (forward and "
                "backward on slices of it) and call optimizer.step() once"
            )
        if self.batch_used:
            raise RuntimeError(
                "the data loader was asked for its next batch after this step's batch went "
                "through a backward pass and was discarded by optimizer.zero_grad() without "
                "optimizer.step(): skipping a batch because of what happened in it (an error, "
                "its size, its loss) depends on the data, which ε does not cover. Redo its "
                "forward and backward passes (in micro-batches if it ran out of memory) and "
                "call optimizer.step()"
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
        if self.delivered is not None and self.step_examples != self.delivered:
            # Fewer rows than examples: part of the batch never clipped, or rows that are not
            # examples (a batch fed time-first) or one example's rows clipped twice.
            raise RuntimeError(
                f"optimizer.step() refused: the backward passes of this step went over "
                f"{self.step_examples} of the {self.delivered} examples of the data loader's "
                "batch. Every example must go through one backward pass per step: micro-batches "
                "must partition the batch, and dim 0 of every DP layer's input must index the "
                "examples. Call optimizer.zero_grad() to discard them, then redo the step"
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
        self.delivered, self.step_examples, self.batch_used = None, 0, False

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


# ---------------------------------------------------------------- thresholds


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


def clip_thresholds(clipping, max_grad_norm, layers):
    """(per-layer thresholds {layer name: C_k}, the one group threshold of flat/block, C_tot),
    for the private layers of conversion.private_layers."""
    if clipping == "flat":
        return {}, max_grad_norm, max_grad_norm
    # A tied head is part of its embedding's group (one group, one block-clipping group).
    grouped = [(name, layer) for name, layer in layers if layer.tied_to is None]
    heads = {
        name: next(n for n, other in grouped if other.module is layer.tied_to)
        for name, layer in layers
        if layer.tied_to is not None
    }
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
    thresholds = {
        n: check_real(f"max_grad_norm[{n!r}]", c, positive=True) for n, c in max_grad_norm.items()
    }
    total = math.sqrt(sum(c * c for c in thresholds.values()))
    return {**thresholds, **{h: thresholds[e] for h, e in heads.items()}}, None, total


def thresholds_of_parameters(per_parameter, trainable, optimizer, layers) -> dict[str, float]:
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
        id(p): check_real(f"max_grad_norm[{i}] ({name})", c, positive=True)
        for i, ((name, p), c) in enumerate(zip(trainable, per_parameter, strict=True))
    }
    group_of = {layer.module: name for name, layer in layers if layer.tied_to is None}
    squares: dict[str, float] = {}
    for name, layer in layers:  # a tied head's parameters join its embedding's group
        group = group_of[layer.tied_to] if layer.tied_to is not None else name
        squares[group] = squares.get(group, 0.0) + sum(each[id(p)] ** 2 for _, p in layer.params)
    return {name: math.sqrt(sq) for name, sq in squares.items()}
