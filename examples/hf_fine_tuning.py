"""Fine-tune a Hugging Face GPT-2 with differential privacy: fully, then with DP-LoRA.

Nothing is downloaded. A GPT-2 with the default GPT2Config (only its sizes reduced, so that it
trains on a CPU in seconds) is saved to a temporary directory and loaded back with
from_pretrained, exactly as `GPT2LMHeadModel.from_pretrained("gpt2")` would load the real one.
Two things of GPT-2's defaults need changing for DP training, and this script shows both:

- attention dropout (attn_pdrop=0.1 by default): dp_attn's flash attention has none, and
  make_private refuses it; load with `from_pretrained(path, attn_pdrop=0.0)` (dropout on the
  residual stream and the embeddings, resid_pdrop and embd_pdrop, stays).
Its output head stays tied to the token embedding (tie_word_embeddings, GPT-2's default): the
engine clips that weight's per-example gradient, the sum over its two uses, as one.

The data are the Zen of Python (shipped with Python), cut into windows of varying length and
right-padded, one byte per token; one window is one example (the privacy unit). The loss is
computed per example from the logits (transformers' `labels=` loss divides by the batch's
token count, which mixes examples). After training, generate() continues a prompt.

    python examples/hf_fine_tuning.py [--epochs 3] [--epsilon 8] [--mode full|lora|both]
                                      [--examples N]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from dp_attn import PrivacyEngine

DELTA = 1e-5
LENGTH = 48  # tokens per window, before padding
PAD = 0  # byte 0 never occurs in the text: the padding token and GPT-2's bos/eos token here


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")  # kept rot13-encoded in the module


def dataset(text: str, seed: int = 0) -> TensorDataset:
    """Byte windows starting at every 2nd character, of random lengths 16..LENGTH, right-padded:
    (ids [N, LENGTH], attention_mask [N, LENGTH])."""
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    starts = torch.arange(0, len(data) - LENGTH, 2)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, LENGTH + 1, (len(starts),), generator=g)
    ids = torch.stack([data[s : s + LENGTH] for s in starts.tolist()])
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return TensorDataset(ids.masked_fill(mask == 0, PAD), mask)


def example_losses(logits, ids, mask):
    """Per-example loss: mean next-token cross entropy over the example's real tokens."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return ce.sum(1) / (targets != -100).sum(1).clamp(min=1)


def save_a_pretrained_gpt2(path: str) -> None:
    """Stands in for the hub's "gpt2": GPT2Config's defaults (attn_pdrop=0.1, tied embeddings,
    ...) with the sizes reduced; a byte vocabulary, so bos/eos move to byte 0."""
    config = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=PAD, eos_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)


def fine_tune(model, data, *, epsilon: float, epochs: int, lr: float, label: str) -> None:
    engine = PrivacyEngine()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=64),
        target_epsilon=epsilon, target_delta=DELTA, epochs=epochs, max_grad_norm=1.0,
    )  # fmt: skip
    model.train()  # from_pretrained returns a model in eval mode
    for epoch in range(epochs):
        total, count = 0.0, 0
        for ids, mask in loader:  # Poisson batches: sizes vary, may even be empty
            optimizer.zero_grad()
            if len(ids):  # transformers cannot run 0 rows; the step still releases noise
                losses = example_losses(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
                losses.mean().backward()
                total, count = total + losses.sum().item(), count + len(ids)
            optimizer.step()
        print(f"{label} epoch {epoch + 1}: loss {total / max(count, 1):.3f}, "
              f"ε = {engine.get_epsilon(DELTA):.2f}")  # fmt: skip
    print(f"{label}: this run is ({engine.get_epsilon(DELTA):.2f}, {DELTA:g})-DP")


def continue_prompt(model, prompt: str) -> str:
    """Greedy generation. Generation uses a key-value cache that dp_attn's attention does not
    take: switch the attention back to transformers' SDPA first."""
    model.set_attn_implementation("sdpa")
    model.eval()
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=40, do_sample=False, pad_token_id=PAD)  # fmt: skip
    return bytes(out[0].tolist()).decode(errors="replace")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    parser.add_argument("--examples", type=int, default=None,
                        help="train on the first N windows only (a quick run)")  # fmt: skip
    args = parser.parse_args(argv)
    data = dataset(zen_of_python())
    if args.examples is not None:
        data = TensorDataset(*(t[: args.examples] for t in data.tensors))
    with tempfile.TemporaryDirectory() as path:
        save_a_pretrained_gpt2(path)

        if args.mode in ("full", "both"):
            model = GPT2LMHeadModel.from_pretrained(path, attn_pdrop=0.0)
            assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
            fine_tune(model, data, epsilon=args.epsilon, epochs=args.epochs, lr=2e-3,
                      label="full fine-tuning")  # fmt: skip
            print("full fine-tuning generates:", repr(continue_prompt(model, "Beautiful is")))

        if args.mode in ("lora", "both"):
            import peft

            model = GPT2LMHeadModel.from_pretrained(path, attn_pdrop=0.0)
            lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                                   target_modules=["c_attn", "c_proj"])  # fmt: skip
            # Only the adapters train: the embeddings stay frozen.
            model = peft.get_peft_model(model, lora)
            fine_tune(model, data, epsilon=args.epsilon, epochs=args.epochs, lr=5e-3,
                      label="DP-LoRA")  # fmt: skip
            print("DP-LoRA generates:", repr(continue_prompt(model, "Beautiful is")))


if __name__ == "__main__":
    main()
