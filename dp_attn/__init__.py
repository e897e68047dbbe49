"""dp_attn: Triton kernels for differentially private training of attention models."""

__version__ = "0.1.0"

import importlib

# The root's public names, by the module they load from on first use (PEP 562), so that
# `import dp_attn.accounting` needs neither torch nor triton: do not import torch-using
# modules eagerly. The functional names are all of dp_attn.functional.__all__
# (tests/test_docs.py checks that the two lists agree).
_EXPORTS = {
    "functional": (
        "BLOCK_CLIP_TILE",
        "add_gaussian_noise_",
        "block_clip_num_groups",
        "block_clipped_grad_sum",
        "clip_factors",
        "clipped_grad_sum",
        "embedding_clipped_grad_sum",
        "embedding_grad_norm_bounds",
        "embedding_grad_sq_norms",
        "flash_attention",
        "norm_affine_clipped_grad_sum",
        "norm_affine_grad_norm_bounds",
        "norm_affine_grad_sq_norms",
        "per_example_grad_norm_bounds",
        "per_example_grad_sq_norms",
    ),
    "engine": ("DPOptimizer", "PoissonDataLoader", "PrivacyEngine"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    if name in _SOURCE:
        module = importlib.import_module(f".{_SOURCE[name]}", __name__)
        globals()[name] = value = getattr(module, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
