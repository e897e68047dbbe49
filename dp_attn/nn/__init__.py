"""DP layers: drop-in subclasses of nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding and
nn.MultiheadAttention.

Each layer is its nn counterpart with a different forward. Without an engine attached it
computes exactly what the counterpart computes and autograd fills `.grad` as usual
(DPMultiheadAttention runs flash attention instead of materialising the attention matrix).
With a PrivacyEngine attached (`make_private`), the forward goes through a thin
torch.autograd.Function that saves the layer's input; its backward returns the exact input
gradient but, instead of the summed parameter gradient, hands the per-example material
(activations and output gradients) to the layer's `dp_clipper`, the engine's clipper, which
clips and sums it (the GradientClipper contract of dp_attn.nn.clipper; docs/design.md §2).
The parameter slots get no gradient: the engine writes `.grad` in `optimizer.step()`.

Modules: clipper (the contract), pieces (per-example material, certified bounds, clipped
sums), functions (the autograd Functions), layers (linear, norms, embedding), attention.

Per-example means along dim 0 of every DP layer's input: models must be batch-first.
"""

from .attention import DPMultiheadAttention
from .clipper import DPLayer, GradientClipper
from .layers import DPConv1D, DPEmbedding, DPLayerNorm, DPLinear, DPRMSNorm

__all__ = [
    "DPConv1D",
    "DPEmbedding",
    "DPLayer",
    "DPLayerNorm",
    "DPLinear",
    "DPMultiheadAttention",
    "DPRMSNorm",
    "GradientClipper",
]
