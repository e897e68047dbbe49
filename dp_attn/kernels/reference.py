"""Plain-PyTorch twins of every kernel in dp_attn.kernels.

They are the test oracle's first rung (tests compare kernel vs twin, and twin vs an
independent oracle such as torch.func per-example gradients), and the CPU path when
Triton is not interpreting. Same signatures and semantics as the kernels' launchers.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------- flash attention


# ---------------------------------------------------------------- per-example norms, clipped sums


# ---------------------------------------------------------------- small layers (norms, embeddings)
