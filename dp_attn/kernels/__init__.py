"""Triton kernel families (one file each) and their PyTorch reference twins."""
