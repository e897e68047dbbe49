"""Helpers shared by every kernel family: backend choice, input checks, launch-grid limits,
and the shapes and masks the plain-PyTorch twins share."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA's limits on a launch grid: at most 2**31 - 1 programs on axis x, 65,535 on y and z.
MAX_GRID = (2**31 - 1, 65_535, 65_535)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels (rather than the PyTorch reference) should run.

    CUDA tensors always take the kernels; CPU tensors take them only through the
    interpreter, and the reference twin otherwise.
    """
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreting()


def backend_name(device: torch.device | str) -> str:
    """Human-readable name of the path a tensor on `device` takes (for self-checks and logs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton (compiled)"
    if device.type == "cpu" and interpreting():
        return "triton (interpreter)"
    return "pytorch reference"


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
) -> None:
    """Raise TypeError/ValueError naming `name` unless `t` has the expected rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same(attr: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError (device) or TypeError (dtype) when tensors disagree on `attr`."""
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{n}={v}" for n, v in values.items())
        error = TypeError if attr == "dtype" else ValueError
        raise error(f"{' and '.join(values)} must share a {attr}, got {listed}")


def checked_grid(*grid: int) -> tuple[int, ...]:
    """`grid` as a tuple; ValueError when an axis has more programs than CUDA launches."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if size > limit:
            raise ValueError(
                f"a launch grid of {grid} programs has {size} on axis {'xyz'[axis]}, over "
                f"CUDA's limit of {limit:,}"
            )
    return tuple(grid)


def check_nonnegative(name: str, value: float) -> None:
    if not (value >= 0.0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """[B, d] inputs are sequences of length one: view them as [B, 1, d]."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def zero_dropped(x: torch.Tensor, clip_factors: torch.Tensor) -> torch.Tensor:
    """x [B, T, d] in fp32 with the examples whose clip factor is 0 set to exactly 0, so that a
    non-finite example (clip factor 0) contributes 0 rather than 0 * inf = NaN."""
    return torch.where((clip_factors != 0)[:, None, None], x.float(), 0.0)
