"""dp_attn: Triton kernels for differentially private training of attention models."""

__version__ = "0.1.0"

import importlib

# The root re-exports these engine names and every name of dp_attn.functional.__all__ (the one
# list of the functional API). Both load on first use (PEP 562), so that
# `import dp_attn.accounting` needs neither torch nor triton: do not import torch-using
# modules eagerly.
_ENGINE_EXPORTS = ("DPOptimizer", "PoissonDataLoader", "PrivacyEngine")


def _public_names() -> list[str]:
    functional = importlib.import_module(".functional", __name__)
    return sorted({*_ENGINE_EXPORTS, *functional.__all__})


def __getattr__(name: str):
    if name == "__all__":  # `from dp_attn import *`
        names = globals()["__all__"] = _public_names()
        return names
    if name.startswith("_"):  # dunder probes (copy, pickle, inspect) must not import torch
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _ENGINE_EXPORTS:
        value = getattr(importlib.import_module(".engine", __name__), name)
    elif name in _public_names():
        value = getattr(importlib.import_module(".functional", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_public_names()})
