"""Integrations with third-party model libraries (optional dependencies).

- `dp_attn.integrations.transformers`: Hugging Face transformers models (GPT-2, BERT, the LLaMA
  family), and PEFT LoRA adapters on them.

`make_private` (through `convert_module`) calls `prepare_model` below, which applies the
integration of each library whose modules the model contains; a library is imported only
when the model holds its modules, so importing dp_attn never needs it.
"""

from __future__ import annotations

from torch import nn


def prepare_model(module: nn.Module) -> None:
    """Prepare `module` in place for the DP engine if it holds Hugging Face transformers
    modules (see dp_attn.integrations.transformers.prepare_model); otherwise do nothing."""
    # A transformers module can only exist once transformers is imported: no import needed
    # to find out, and none happens for other models.
    if any(type(m).__module__.startswith("transformers.") for m in module.modules()):
        from . import transformers

        transformers.prepare_model(module)
