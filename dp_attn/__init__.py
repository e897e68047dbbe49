"""dp_attn: Triton kernels for differentially private training of attention models."""

__version__ = "0.1.0"
