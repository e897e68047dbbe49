"""Import-and-call API. Each function checks its inputs and dispatches to the Triton
kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or its reference twin."""

from __future__ import annotations

# ---------------------------------------------------------------- attention

# ---------------------------------------------------------------- DP-SGD kernels for layers
