"""dp_attn: Triton kernels for differentially private training of attention models."""

__version__ = "0.1.0"

import importlib

# The names in __all__ load on first use from these modules (PEP 562), so that
# `import dp_attn.accounting` needs neither torch nor triton. Add new public names to
# __all__ (and their module here); do not import torch-using modules eagerly.
_SUBMODULES = ("functional", "engine")

# From dp_attn.functional (attention and the DP-SGD kernels for layers) and dp_attn.engine
# (the privacy engine); the DP layers are in dp_attn.nn.
__all__ = [
    "BLOCK_CLIP_TILE",
    "DPOptimizer",
    "PoissonDataLoader",
    "PrivacyEngine",
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
]


def __getattr__(name: str):
    if name in __all__:
        for submodule in _SUBMODULES:
            module = importlib.import_module(f".{submodule}", __name__)
            if hasattr(module, name):
                globals()[name] = value = getattr(module, name)
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
