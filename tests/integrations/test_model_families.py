"""More Hugging Face families from tiny configs (nothing downloaded): Qwen2, Mistral, Phi-3
(head dim 96), GPT-NeoX, RoBERTa and ViT. For each: the converted model's forward equals the
unconverted eager model's, with every layer's attention on dp_attn.flash_attention, and the
engine's noise-free release equals Σ_i clip(g_i) / (q·N) from the torch.func oracle (float64,
eager attention, each example alone and cut to its real length). Output heads are untied
(tie_word_embeddings=False). ViT's embeddings (a Conv2d patch projection, the class token and
the position embeddings: no DP layer covers them) are frozen.

Run with `-s` to print each family's measured oracle error."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import dp_attn.functional as DF
from dp_attn.engine import convert_module
from tests.integrations.test_transformers import BATCH, LAYERS, LENGTHS, VOCAB, batch, generic
from tests.integrations.test_transformers import make_private as private
from tests.tiny_models import clipped_sums, example_losses

transformers = pytest.importorskip("transformers")
from dp_attn.integrations import transformers as dp_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

DECODER = dict(
    vocab_size=VOCAB,
    num_hidden_layers=LAYERS,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def qwen2():
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        **DECODER,
    )
    return transformers.Qwen2ForCausalLM(config)  # biases on q, k, v


def mistral(sliding_window=None):
    # Mistral's default 4096-key sliding window is refused (flash attention has none); a
    # window at least as long as the sequences is full causal attention: sliding_window=None.
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=sliding_window,
        **DECODER,
    )
    return transformers.MistralForCausalLM(config)


def phi3():
    config = transformers.Phi3Config(  # fused qkv_proj and gate_up_proj; head dim 192 / 2 = 96
        hidden_size=192,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        **DECODER,
    )
    return transformers.Phi3ForCausalLM(config)


def gpt_neox():
    config = transformers.GPTNeoXConfig(  # fused query_key_value, partial rotary, LayerNorm
        hidden_size=32, intermediate_size=48, num_attention_heads=2, **DECODER
    )
    return transformers.GPTNeoXForCausalLM(config)


def roberta():
    config = transformers.RobertaConfig(  # positions from input_ids, offset by padding_idx
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(config)


def vit():
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(config)
    model.vit.embeddings.requires_grad_(False)
    return model


# family: (build, head dim, causal)
FAMILIES = {
    "qwen2": (qwen2, 16, True),
    "mistral": (mistral, 16, True),
    "phi3": (phi3, 96, True),
    "gpt_neox": (gpt_neox, 16, True),
    "roberta": (roberta, 16, False),
    "vit": (vit, 16, False),
}


def build(family):
    torch.manual_seed(0)
    return generic(FAMILIES[family][0]())


def data_of(family):
    """The batch as model inputs plus targets: token ids with a right-padded attention_mask,
    next-token targets and class labels; for ViT 8×8 images and labels."""
    ids, mask, targets, labels = batch(padded=True)
    if family == "vit":
        g = torch.Generator().manual_seed(2)
        return dict(pixel_values=torch.randn(BATCH, 3, 8, 8, generator=g), labels=labels)
    return dict(input_ids=ids, attention_mask=mask, targets=targets, labels=labels)


def inputs(data):
    return {k: v for k, v in data.items() if k not in ("targets", "labels")}


def losses(model, data):
    """Per-example losses: mean next-token cross entropy over real targets (causal LMs), or
    the classification cross entropy."""
    logits = model(**inputs(data)).logits
    if logits.dim() == 2:
        return F.cross_entropy(logits, data["labels"], reduction="none")
    return example_losses(logits, data["targets"])


def example(data, i):
    """Example i alone, cut to its real length: no padding and no mask."""
    one = {k: v[i : i + 1] for k, v in data.items()}
    if "attention_mask" in one:
        n = int(one.pop("attention_mask").sum())
        one["input_ids"], one["targets"] = one["input_ids"][:, :n], one["targets"][:, :n]
    return one


def per_example_grads(model, data):
    """{trainable parameter name: [B, *shape] float64} through the unconverted model."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("eager")
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    data = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}

    def loss(params, i):
        return losses(lambda **kw: functional_call(model, params, (), kw), example(data, i))[0]

    grads = [grad(loss)(trainable, i) for i in range(BATCH)]
    return {n: torch.stack([g[n] for g in grads]) for n in trainable}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_unconverted_model(family, monkeypatch):
    """Eval mode: the converted model's outputs equal the eager model's at every real position,
    every layer's attention runs on flash_attention with the family's head dim and pattern,
    and the Parameters are the same objects."""
    model = build(family).eval()
    _, head_dim, causal = FAMILIES[family]
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    params = dict(model.named_parameters())
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[-1], kwargs))
        return DF.flash_attention(q, k, v, **kwargs)

    monkeypatch.setattr(dp_hf, "flash_attention", spy)
    convert_module(model)
    assert dict(model.named_parameters()) == params
    data = data_of(family)
    with torch.no_grad():
        got, want = (m(**inputs(data)).logits for m in (model, reference))
    if got.dim() == 3:  # per token: compare real positions
        real = data["attention_mask"].bool()
        got, want = got[real], want[real]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == LAYERS
    for dim, kwargs in calls:
        assert dim == head_dim and kwargs["causal"] == causal
        lengths = kwargs["key_lengths"]
        assert (lengths is None) if family == "vit" else torch.equal(lengths, LENGTHS.int())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_equals_oracle(family):
    """make_private, noise_multiplier=0, flat clipping at a threshold that binds for some
    examples: one step releases the oracle's clipped sum divided by q·N."""
    model = build(family).train()
    data = data_of(family)
    per_example = per_example_grads(model, data)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    max_grad_norm = float(norms.median())
    _, model, optimizer = private(model, max_grad_norm)
    optimizer.zero_grad()
    losses(model, data).mean().backward()
    optimizer.step()

    want = {n: s / BATCH for n, s in clipped_sums(per_example, "flat", max_grad_norm).items()}
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    scale = max(w.abs().max().item() for w in want.values())
    error = max((g.double() - want[n]).abs().max().item() for n, g in got.items()) / scale
    print(f"\n{family}: max |release - oracle| / max |oracle| = {error:.1e}")
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    unclipped = {n: g.sum(0) / BATCH for n, g in per_example.items()}
    assert any((got[n].double() - unclipped[n]).abs().max() > 1e-3 for n in got)


def test_sliding_window_is_refused_by_make_private():
    """Mistral's default sliding window is refused before training, naming the fix."""
    with pytest.raises(ValueError, match=r"sliding_window=4096.*sliding_window=None"):
        private(mistral(sliding_window=4096), 1.0)
