"""Hugging Face transformers models on dp_attn: GPT-2, BERT and the LLaMA family (and PEFT LoRA
adapters on them) with PrivacyEngine.make_private.

Nothing to call: `make_private` prepares any model that contains transformers modules (a
PeftModel included) through `prepare_model` below, which you may also call yourself to run a
model on dp_attn's attention without the engine. Preparing a model, in place:

- attention runs on `dp_attn.flash_attention`: importing this module registers the attention
  implementation "dp_attn" in transformers' AttentionInterface and its mask builder in
  AttentionMaskInterface, and `prepare_model` selects it (`model.set_attn_implementation`).
  Masks are never materialised: the causal or bidirectional pattern becomes `causal=`, a 2-D
  `attention_mask` with right padding becomes per-example `key_lengths`. What flash attention
  cannot express is refused with a ValueError, never approximated: left padding (use
  `tokenizer.padding_side = "right"`), 4-D or custom masks, sliding windows, packed sequences,
  logit soft-capping and attention sinks. Any head dim from 1 to 256.
- attention dropout and sliding windows are refused here, at preparation (so by make_private,
  not at the first training forward), naming the config field that asks for them: build or
  load the model with it at 0.0 (`attn_pdrop` for GPT-2, whose default is 0.1;
  `attention_probs_dropout_prob` for BERT, RoBERTa and ViT; `attention_dropout` for the LLaMA
  family, GPT-NeoX and DistilBERT), and with `sliding_window=None` (Mistral's default is 4096;
  a window no shorter than the training sequences is full causal attention).
- GPT-2's Conv1D becomes dp_attn.nn.DPConv1D and the LLaMA family's RMSNorm (LlamaRMSNorm and
  its exact copies: MistralRMSNorm, Qwen2RMSNorm, ...) becomes DPRMSNorm, in place, with the
  same Parameters (the engine then converts nn.Linear, nn.LayerNorm and nn.Embedding).
- learned position embeddings (GPT-2's wpe, BERT's position_embeddings) get position ids with
  one row per example: transformers passes a single row [1, T] broadcast over the batch,
  whose gradient arrives already summed over the examples.
- tied input/output embeddings (tie_word_embeddings, the default of GPT-2, LLaMA-3.2, Qwen2.5,
  Gemma and T5) need nothing here: the engine clips the shared weight's per-example gradient,
  the sum over its two uses, with their cross term (dp_attn.nn.group_sq_bounds).

For a correct privacy guarantee the loss must be a sum or mean over per-example losses
(make_private's loss_reduction). The `labels=` loss of transformers' causal-LM heads divides by
the number of target tokens in the whole batch, which makes each example's gradient depend on
the other examples' lengths: compute the loss from the logits per example instead.

transformers models cannot run a batch of 0 rows (their reshapes use -1): when the Poisson
loader yields an empty batch, skip the forward and backward but still call optimizer.step()
(the step releases noise and is accounted for).

Rotary and other position buffers are buffers, not parameters: nothing to privatise. Under
LoRA (peft.get_peft_model), only the adapters' lora_A / lora_B (nn.Linear, so DPLinear) are
trainable; the frozen base layers record nothing. To generate text after training, switch the
attention back: `model.set_attn_implementation("sdpa")` (generation uses left padding).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
    from transformers.models.bert.modeling_bert import BertEmbeddings
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D
except ImportError as err:  # pragma: no cover - depends on the installed packages
    raise ImportError(
        "dp_attn.integrations.transformers needs transformers >= 5 (with AttentionInterface and "
        f"masking_utils.AttentionMaskInterface): pip install -U transformers ({err})"
    ) from err

from ..functional import flash_attention
from ..nn import DPConv1D, DPRMSNorm
from ..nn.attention import key_lengths_from_padding_mask

__all__ = ["ATTN_IMPLEMENTATION", "FlashAttentionMask", "prepare_model"]

ATTN_IMPLEMENTATION = "dp_attn"

# Attention features of transformers' attention-function keyword arguments that flash attention
# does not have; a model passing one of them (not None) is refused.
_UNSUPPORTED_FEATURES = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "cu_seq_lens_q": "packed sequences",
    "cu_seq_lens_k": "packed sequences",
}


# ---------------------------------------------------------------- attention


@dataclass(frozen=True)
class FlashAttentionMask:
    """The mask transformers hands to the "dp_attn" attention function: the pattern (`causal`,
    bottom-right aligned; else bidirectional) and each example's number of real keys
    (`key_lengths` int32 [B], None when nothing is padded)."""

    causal: bool
    key_lengths: torch.Tensor | None


def flash_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> FlashAttentionMask:
    """transformers' mask builder for "dp_attn" (AttentionMaskInterface): the model's 2-D
    padding mask (bool [B, kv_length], True = real token) and mask pattern, as a
    FlashAttentionMask. Raises ValueError for what flash attention cannot express."""
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise ValueError(
            f"dp_attn attention supports causal and bidirectional masks with right padding, but "
            f"the model asked for the mask pattern {name} (sliding window, packed sequences or "
            "a custom mask overlay), which flash attention cannot express. A sliding window at "
            "least as long as the training sequences is full causal attention: build or load "
            "the model with sliding_window=None (e.g. Mistral, whose default is 4096)"
        )
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if kv_offset != 0 or (causal and q_offset + q_length != kv_length):
        raise ValueError(
            f"dp_attn attention needs the queries to be the last {q_length} of the "
            f"{kv_length} keys (got query offset {q_offset}, key offset {kv_offset}); this "
            "cache layout is not supported: switch to another attention implementation for "
            "generation, e.g. model.set_attn_implementation('sdpa')"
        )
    key_lengths = None
    if attention_mask is not None:
        if attention_mask.shape != (batch_size, kv_length):
            raise ValueError(
                f"attention_mask must have shape (batch, keys) = ({batch_size}, {kv_length}), "
                f"got {tuple(attention_mask.shape)}"
            )
        try:
            key_lengths = key_lengths_from_padding_mask(
                ~attention_mask.bool(), batch_size, kv_length
            )
        except ValueError:
            raise ValueError(
                "dp_attn attention needs right padding: each row of attention_mask must be ones "
                "followed by zeros (use tokenizer.padding_side = 'right'); other padding "
                "cannot be expressed as per-example key lengths"
            ) from None
        if bool((key_lengths == kv_length).all()):
            key_lengths = None
    return FlashAttentionMask(causal, key_lengths)


def flash_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: FlashAttentionMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for "dp_attn" (AttentionInterface): query [B, H, Tq, D],
    key and value [B, Hkv, Tk, D] (GQA when Hkv < H); returns ([B, Tq, H, D], None)."""
    for feature, what in _UNSUPPORTED_FEATURES.items():
        if kwargs.get(feature) is not None:
            raise ValueError(f"dp_attn attention does not support {what} ({feature}=...)")
    if dropout:
        raise ValueError(
            f"dp_attn attention has no attention dropout (the model asks for p={dropout}): build "
            "the model with its attention-dropout probability at 0 (GPT-2: attn_pdrop, BERT: "
            "attention_probs_dropout_prob, LLaMA: attention_dropout), e.g. "
            "from_pretrained(name, attn_pdrop=0.0)"
        )
    if attention_mask is None:  # no mask built (e.g. cross-attention without one): the module's
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        key_lengths = None
    elif isinstance(attention_mask, FlashAttentionMask):
        causal, key_lengths = attention_mask.causal, attention_mask.key_lengths
    else:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else None
        raise ValueError(
            f"dp_attn attention got a {type(attention_mask).__name__} attention mask of shape "
            f"{shape}: it takes the masks transformers builds for it from a 2-D attention_mask "
            "(causal or bidirectional, right padding); a 4-D or custom mask cannot be expressed"
        )
    out = flash_attention(
        query, key, value, causal=bool(causal), softmax_scale=scaling, key_lengths=key_lengths
    )
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, flash_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


# ---------------------------------------------------------------- model preparation


def prepare_model(model: nn.Module) -> nn.Module:
    """Prepare the transformers models inside `model` (itself, or e.g. a PeftModel around one)
    for dp_attn, in place, and return `model`: refuse configs asking for attention dropout or
    sliding windows, select the "dp_attn" attention implementation, convert Conv1D and
    LLaMA-family RMSNorm layers to DP layers with the same Parameters, and give learned
    position embeddings per-example position ids. Idempotent; make_private calls it."""
    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for m in pretrained:
        _check_no_attention_dropout(m)
        _check_no_sliding_window(m)
    _set_attention(pretrained)
    for m in model.modules():
        if type(m) is Conv1D:
            m.__class__ = DPConv1D
        elif _is_llama_rms_norm(m):
            m.__class__ = DPRMSNorm
            m.normalized_shape = tuple(m.weight.shape)
            m.eps = m.variance_epsilon
            m.elementwise_affine = True
        elif isinstance(m, (GPT2Model, BertEmbeddings)) and not getattr(
            m, "_dp_position_ids", False
        ):
            m.register_forward_pre_hook(_per_example_position_ids, with_kwargs=True)
            m._dp_position_ids = True
    return model


# Config fields that set the dropout on attention probabilities, across families.
_ATTENTION_DROPOUT_FIELDS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def _check_no_attention_dropout(m: PreTrainedModel) -> None:
    """Refuse a config that asks for attention dropout, whatever the module's mode: models come
    out of from_pretrained in eval mode and are switched to train() inside the training loop,
    where the attention function would otherwise refuse it at the first forward."""
    config = m.config
    for field in _ATTENTION_DROPOUT_FIELDS:
        p = getattr(config, field, None)
        if isinstance(p, (int, float)) and p > 0:
            raise ValueError(
                f"{type(m).__name__}: its config asks for attention dropout ({field}={p}), "
                "which dp_attn's flash attention does not implement. Build or load the model "
                f"with {field}=0.0: {type(config).__name__}(..., {field}=0.0) or "
                f"from_pretrained(name, {field}=0.0) (setting it on model.config afterwards is "
                "too late: the attention layers read it when they are built). Dropout elsewhere "
                "(residual, embeddings, MLP) is supported"
            )


def _check_no_sliding_window(m: PreTrainedModel) -> None:
    """Refuse a config whose attention uses a sliding window (Mistral's default is 4096 keys),
    here rather than at the first forward, where the mask builder would."""
    config = m.config
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return
    raise ValueError(
        f"{type(m).__name__}: its config asks for sliding-window attention "
        f"(sliding_window={window}), which dp_attn's flash attention does not implement. A "
        "window at least as long as the training sequences is full causal attention: build or "
        f"load the model with sliding_window=None ({type(config).__name__}(..., "
        "sliding_window=None) or from_pretrained(name, sliding_window=None))"
    )


def _set_attention(pretrained: list[PreTrainedModel]) -> None:
    nested = {id(sub) for m in pretrained for sub in m.modules() if sub is not m}
    for m in pretrained:
        if id(m) not in nested:
            m.set_attn_implementation(ATTN_IMPLEMENTATION)
    for m in pretrained:
        if m.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{type(m).__name__} does not run its attention through transformers' "
                "AttentionInterface, so dp_attn cannot run it on flash attention"
            )


def _is_llama_rms_norm(m: nn.Module) -> bool:
    """LlamaRMSNorm or an exact copy (same forward code: Mistral, Qwen2, ...). Variants that
    compute something else (GemmaRMSNorm's 1 + weight) are left alone, hence uncovered."""
    code, ref = getattr(type(m).forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return (
        code is not None
        and (code.co_code, code.co_consts, code.co_names)
        == (ref.co_code, ref.co_consts, ref.co_names)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and hasattr(m, "variance_epsilon")
    )


def _per_example_position_ids(module: nn.Module, args, kwargs):
    """Forward pre-hook: position_ids [B, T] (0..T-1 in each row) when none are given and no
    past tokens are cached, in place of transformers' broadcast [1, T]."""
    signature = inspect.signature(module.forward)
    given = signature.bind(*args, **kwargs).arguments
    if given.get("position_ids") is not None or given.get("past_key_values") is not None:
        return None
    if given.get("past_key_values_length", 0):
        return None
    ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
    shape = ids.shape if ids is not None else None if embeds is None else embeds.shape[:-1]
    if shape is None or len(shape) != 2:
        return None
    device = (ids if ids is not None else embeds).device
    positions = torch.arange(shape[1], device=device).expand(shape)
    index = list(signature.parameters).index("position_ids")
    if index < len(args):  # passed positionally (as None)
        return (*args[:index], positions, *args[index + 1 :]), kwargs
    return args, {**kwargs, "position_ids": positions}
