"""PrivacyEngine: make a model, its optimizer and its data loader differentially private.

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat")
    ...  # the usual loop: zero_grad, forward, loss.backward(), optimizer.step()
    engine.get_epsilon(1e-5)

What happens in one logical step (docs/design.md §5; the parts live in sampling.py,
conversion.py, clipping.py and optimizer.py, the release here):
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

import copy
import warnings
from collections.abc import Mapping, Sized
from dataclasses import asdict
from typing import cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import functional as DF
from .accounting import (
    BudgetExceededError,
    PrivacyBudget,
    calibrate_noise_multiplier,
    make_accountant,
)
from .checks import check_bool, check_int, check_real
from .clipping import Clipper, PrivacyStats, clip_thresholds, thresholds_of_parameters
from .conversion import (
    BufferGuard,
    check_optimizer_params,
    convert,
    convert_module,
    private_layers,
    refuse_batch_statistics,
    refuse_outside_gradient,
)
from .kernels.norm_bounds import RELEASE_ROUNDING
from .nn import DPEmbedding, DPLayer
from .optimizer import DPOptimizer
from .sampling import PoissonBatchSampler, PoissonDataLoader

# DPOptimizer, PoissonDataLoader, PoissonBatchSampler and convert_module are defined in
# optimizer.py, sampling.py and conversion.py; dp_attn.engine is their documented import path.
__all__ = [
    "DPOptimizer",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "PrivacyEngine",
    "convert_module",
]

CLIPPING_STYLES = ("flat", "per-layer", "block")
CLIPPING_ALIASES = {"per_layer": "per-layer"}  # Opacus' spelling
LOSS_REDUCTIONS = ("mean", "sum")
# Opacus' ways of computing per-sample gradients: dp_attn's DP layers always use their own
# kernels, so each is accepted and means the same here ("no_op", where the user computes
# p.grad_sample, is refused in make_private); the "ghost" ones return a criterion too.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "ghost_fsdp", "ghost_tp")


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
        check_bool("secure_mode", secure_mode)
        self.accountant = make_accountant(accountant)
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self._stats = PrivacyStats()
        self._clipper: Clipper | None = None
        self._settings: dict | None = None
        self._budget: PrivacyBudget | None = None
        # make_private(grad_scaler=); read by DPOptimizer.step
        self.grad_scaler: torch.amp.GradScaler | None = None

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
        refuse_batch_statistics(module)
        noise_multiplier = check_real("noise_multiplier", noise_multiplier, positive=False)
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
            max_grad_norm = check_real("max_grad_norm", max_grad_norm, positive=True)
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
        check_bool("secure_mode", secure_mode)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        if "ghost" in grad_sample_mode:
            criterion = _ghost_criterion(criterion, loss_reduction)
        loader = PoissonDataLoader.from_data_loader(data_loader, generator=generator)
        budget = None
        if target_epsilon is not None and target_delta is not None:
            budget = PrivacyBudget(target_epsilon, target_delta, self.accountant)

        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        converted = convert(module)
        try:
            layers = private_layers(module)
            check_optimizer_params(optimizer, layers)
            per_layer = max_grad_norm
            if isinstance(max_grad_norm, (list, tuple)):
                per_layer = thresholds_of_parameters(max_grad_norm, trainable, optimizer, layers)
            thresholds, group_threshold, total = clip_thresholds(clipping, per_layer, layers)
        except Exception:
            for m, cls in converted:  # leave the user's model as it was
                m.__class__ = cls
            raise

        self._total_threshold = total
        self._secure_mode = secure_mode
        self.grad_scaler = grad_scaler
        self._sample_rate = loader.sample_rate
        self._expected_batch_size = loader.sample_rate * len(cast(Sized, loader.dataset))
        self._budget = budget
        self._params = [(name, p) for _, layer in layers for name, p in layer.params]
        tied_groups = {layer.module: layer.tied_to for _, layer in layers if layer.tied_to}
        tied_groups.update({group: group for group in tied_groups.values()})
        self._padding_rows = {  # a tied head trains the padding row: only untied ones stay 0
            layer.module.weight: layer.module.padding_idx
            for _, layer in layers
            if isinstance(layer.module, DPEmbedding)
            and layer.module.padding_idx is not None
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
        self._clipper = Clipper(
            clipping,
            loss_reduction,
            group_threshold,
            {layer.module: thresholds[name] for name, layer in layers if name in thresholds},
            self._stats,
            [p for _, p in self._params],
            tied_groups,
            grad_scaler,
        )
        for m in module.modules():
            if isinstance(m, DPLayer):
                m.dp_clipper = self._clipper
        for name, p in self._params:
            p.register_hook(refuse_outside_gradient(name))
        for name, m in module.named_modules():
            if next(m.named_buffers(recurse=False), None) is not None:
                BufferGuard(name, self._clipper.poison).attach(m)
        loader.step_tracker = self._clipper
        self.module = module
        self.optimizer = DPOptimizer(optimizer, self, noise_multiplier=noise_multiplier)
        if "ghost" in grad_sample_mode:
            return module, self.optimizer, criterion, loader
        return module, self.optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        **settings,
    ) -> tuple:
        """make_private with the noise multiplier calibrated (by this engine's accountant) so
        that `epochs` epochs of len(data_loader) steps at q = batch_size / len(dataset) spend
        exactly (target_epsilon, target_delta); that budget is then enforced. `settings`:
        make_private's other keyword arguments (module, optimizer, max_grad_norm, ...), all
        but noise_multiplier."""
        check_int("epochs", epochs, minimum=1)
        loader = PoissonDataLoader.from_data_loader(data_loader)
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon,
            target_delta,
            loader.sample_rate,
            epochs * len(loader),
            accountant=self.accountant_name,
        )
        return self.make_private(
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            **settings,
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

    # ---- one logical step (called by DPOptimizer: the optimizer.StepReleaser contract)
    def _add_noise(self, grads: torch.Tensor, std: float) -> None:
        """grads += N(0, std²) in place: the step's noise (DistributedPrivacyEngine overrides
        this to add a per-rank share and sum the ranks' clipped sums)."""
        if std > 0.0:
            DF.add_gaussian_noise_(grads, std, secure_mode=self._secure_mode)

    def _as_grad(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """The released gradient (fp32, param's shape) as param.grad (DistributedPrivacyEngine
        overrides this to keep only this rank's shard of an FSDP-sharded parameter)."""
        return grad if grad.dtype == param.dtype else grad.to(param.dtype)

    @property
    def _step_clipper(self) -> Clipper:
        """The private model's Clipper, for the step methods (DPOptimizer exists only once
        make_private has set it)."""
        if self._clipper is None:
            raise RuntimeError("make_private has not been called on this PrivacyEngine")
        return self._clipper

    def discard_step(self) -> None:
        """Discard the step's clipped gradients (DPOptimizer.zero_grad)."""
        self._step_clipper.clear()

    def release_step(self, noise_multiplier: float) -> None:
        """Release the step (DPOptimizer.step): refuse a misused step, check the budget, account,
        add the noise to the clipped sums, divide by q·N and set each p.grad."""
        clipper = self._step_clipper
        # every check that can refuse the step comes before the accountant records it
        clipper.check_releasable()
        if self._budget is not None:
            try:
                self._budget.check(noise_multiplier, self._sample_rate)
            except BudgetExceededError:
                # Refused for a reason that does not depend on the data: the batch is dropped
                # with its sums, so the loader stays usable and none of it reaches a later step.
                clipper.clear()
                clipper.end_step()
                raise
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=self._sample_rate)
        try:
            grads = clipper.take()
            if grads is None:
                grads = torch.zeros(clipper.size, dtype=torch.float32, device=self._device())
            # The certified sensitivity is C_tot·(1 + RELEASE_ROUNDING): scale the noise with it.
            sensitivity = self._total_threshold * (1.0 + RELEASE_ROUNDING)
            self._add_noise(grads, noise_multiplier * sensitivity)
            grads.div_(self._expected_batch_size)
            for _, p in self._params:
                if not p.requires_grad:
                    continue
                grad = grads[clipper.slices[p]].view(p.shape)
                if p in self._padding_rows:
                    grad[self._padding_rows[p]] = 0.0  # never trained: its true gradient is 0
                p.grad = self._as_grad(p, grad)
        except BaseException:
            self._stats.unreleased_steps += 1  # in ε, yet nothing (or not all) was released
            raise
        finally:
            clipper.end_step()
        self._stats.steps += 1


# ---------------------------------------------------------------- make_private's argument checks


def _check_types(module, optimizer) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, DPOptimizer):
        raise TypeError("optimizer is already a DPOptimizer: pass the original optimizer")
    if any(getattr(m, "dp_clipper", None) is not None for m in module.modules()):
        raise RuntimeError("module is already private (attached to a PrivacyEngine)")


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
