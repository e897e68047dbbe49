"""dp_attn: Triton kernels for differentially private training of attention models."""

__version__ = "0.1.0"

from .functional import (  # DP-SGD kernels for layers
    BLOCK_CLIP_TILE,
    add_gaussian_noise_,
    block_clip_num_groups,
    block_clipped_grad_sum,
    clipped_grad_sum,
    embedding_clipped_grad_sum,
    embedding_grad_sq_norms,
    norm_affine_clipped_grad_sum,
    norm_affine_grad_sq_norms,
    per_example_grad_sq_norms,
)

__all__ = [
    # DP-SGD kernels for layers
    "BLOCK_CLIP_TILE",
    "add_gaussian_noise_",
    "block_clip_num_groups",
    "block_clipped_grad_sum",
    "clipped_grad_sum",
    "embedding_clipped_grad_sum",
    "embedding_grad_sq_norms",
    "norm_affine_clipped_grad_sum",
    "norm_affine_grad_sq_norms",
    "per_example_grad_sq_norms",
]
