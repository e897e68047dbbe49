"""DPOptimizer: the user's optimizer, wrapped so that step() first releases the private
gradient (docs/design.md §5, step 5)."""

from __future__ import annotations

from typing import Protocol

import torch


class StepReleaser(Protocol):
    """What a DPOptimizer asks of its engine (PrivacyEngine implements it)."""

    # make_private(grad_scaler=): the GradScaler whose scaled loss the backward passes see
    grad_scaler: torch.amp.GradScaler | None

    def release_step(self, noise_multiplier: float) -> None:
        """Check, account and noise the step's clipped sums, and set each p.grad."""
        ...

    def discard_step(self) -> None:
        """Discard the step's clipped sums (zero_grad)."""
        ...


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

    def __init__(
        self, optimizer: torch.optim.Optimizer, engine: StepReleaser, *, noise_multiplier: float
    ):
        self.original_optimizer = optimizer
        self._engine = engine
        self.noise_multiplier = noise_multiplier

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
        self._engine.discard_step()
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        scaler = self._engine.grad_scaler
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
        self._engine.release_step(self.noise_multiplier)
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
