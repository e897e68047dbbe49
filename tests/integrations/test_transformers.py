"""Hugging Face transformers models (tiny GPT-2, BERT, LLaMA configs; nothing downloaded) and
PEFT LoRA adapters on dp_attn.

The oracle is independent of the integration's mask handling: each example's gradient is taken
by torch.func (grad of functional_call) on an unconverted float64 copy with transformers' eager
attention, on the example alone, cut to its real length (no padding, no mask). The engine's
noise-free release on the padded batch must equal Σ_i clip(g_i) / (q·N)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, TensorDataset

import dp_attn.functional as DF
from dp_attn.engine import PrivacyEngine, convert_module
from dp_attn.nn import DPConv1D, DPRMSNorm
from tests.tiny_models import clipped_sums, example_losses

transformers = pytest.importorskip("transformers")
from dp_attn.integrations import transformers as dp_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

VOCAB, LENGTH, BATCH, LAYERS = 64, 10, 3, 2
LENGTHS = torch.tensor([10, 7, 4])  # real tokens per example: right padding
N = 6  # dataset size: q = BATCH / N, expected batch size q·N = BATCH


def gpt2(tie=False):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=LAYERS,
        n_head=2,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return generic(transformers.GPT2LMHeadModel(config))


def llama(tie=False):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return generic(transformers.LlamaForCausalLM(config))


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return generic(transformers.BertForSequenceClassification(config))


def generic(model):
    """Non-trivial norm weights and biases, so that their gradients are generic."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.train()


def batch(padded=True, seed=1):
    """ids [B, T], the 2-D attention_mask (right padding), per-token next-token targets (-100 on
    padding) and per-example class labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=g)
    lengths = LENGTHS if padded else torch.full((BATCH,), LENGTH)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    targets = torch.roll(ids, -1, dims=1).masked_fill(torch.roll(mask, -1, dims=1) == 0, -100)
    targets[:, -1] = -100
    labels = torch.randint(0, 3, (BATCH,), generator=g)
    return ids, mask, targets, labels


def losses(model, ids, mask, targets, labels):
    """Per-example losses: mean next-token cross entropy over real targets (causal LMs), or the
    classification cross entropy (BERT)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction="none")
    return example_losses(logits, targets)


def per_example_grads(model, ids, mask, targets, labels):
    """{trainable parameter name: [B, *shape] float64}: each example alone, cut to its length,
    through the unconverted model with eager attention."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("eager")
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(params, i):
        n = int(mask[i].sum())
        one = (ids[i : i + 1, :n], None, targets[i : i + 1, :n], labels[i : i + 1])
        return losses(lambda **kw: functional_call(model, params, (), kw), *one)[0]

    grads = [grad(loss)(trainable, i) for i in range(ids.shape[0])]
    return {n: torch.stack([g[n] for g in grads]) for n in trainable}


def make_private(model, max_grad_norm):
    engine = PrivacyEngine()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=BATCH)
    model, optimizer, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        clipping="flat",
    )
    return engine, model, optimizer


def step(model, optimizer, ids, mask, targets, labels):
    """One step of the training loop. transformers models cannot run a batch of 0 rows (their
    reshapes use -1), so an empty Poisson batch skips the forward; the step still happens."""
    optimizer.zero_grad()
    if ids.shape[0]:
        losses(model, ids, mask, targets, labels).mean().backward()
    optimizer.step()


def check_release(model, per_example, data):
    """make_private with noise_multiplier=0 and one step: the released gradients equal
    Σ_i clip(g_i) / (q·N), with a threshold that binds for some examples. Returns the engine,
    model and optimizer."""
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    max_grad_norm = float(norms.median())
    engine, model, optimizer = make_private(model, max_grad_norm)
    step(model, optimizer, *data)
    want = clipped_sums(per_example, "flat", max_grad_norm)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for name, g in got.items():
        expected = want[name] / BATCH
        scale = max(1e-3, expected.abs().max().item())
        torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-5 * scale, msg=name)
    unclipped = {n: g.sum(0) / BATCH for n, g in per_example.items()}
    assert any((got[n].double() - unclipped[n]).abs().max() > 1e-3 for n in got)
    return engine, model, optimizer


# ---------------------------------------------------------------- conversion and forward


@pytest.mark.parametrize("build", [gpt2, bert, llama])
def test_forward_matches_unconverted_model(build, monkeypatch):
    """The converted model (eval) gives the unconverted eager model's outputs at every real
    position of a right-padded batch, with its attention on dp_attn.flash_attention and its
    layers converted with the same Parameters."""
    model = build().eval()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    params = dict(model.named_parameters())
    calls = []
    monkeypatch.setattr(
        dp_hf, "flash_attention", lambda *a, **kw: calls.append(kw) or DF.flash_attention(*a, **kw)
    )
    convert_module(model)
    assert dict(model.named_parameters()) == params
    kinds = {type(m) for m in model.modules()}
    assert transformers.pytorch_utils.Conv1D not in kinds
    assert transformers.models.llama.modeling_llama.LlamaRMSNorm not in kinds
    assert (DPConv1D in kinds) == (build is gpt2) and (DPRMSNorm in kinds) == (build is llama)
    ids, mask, *_ = batch()
    with torch.no_grad():
        got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (model, reference))
    if got.dim() == 3:  # per token: compare real positions
        got, want = got[mask.bool()], want[mask.bool()]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == LAYERS
    assert all(c["causal"] == (build is not bert) for c in calls)
    assert all(torch.equal(c["key_lengths"], LENGTHS.int()) for c in calls)


# ---------------------------------------------------------------- the engine against the oracle


@pytest.mark.parametrize("build", [gpt2, llama, bert])
def test_gradient_equals_oracle(build):
    """make_private on the model: the noise-free release equals the oracle's clipped sum on a
    right-padded batch; then an empty Poisson batch (forward skipped) releases zeros."""
    model = build()
    data = batch(padded=True)
    engine, model, optimizer = check_release(model, per_example_grads(model, *data), data)
    step(model, optimizer, *(t[:0] for t in data))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert engine.stats.steps == 2 and engine.stats.examples == BATCH


def test_dp_lora_trains_and_privatises_only_the_adapters(monkeypatch):
    """PEFT LoRA on LLaMA's q_proj and v_proj: only the adapters are trainable and released,
    their gradient equals the oracle, the frozen base weights get no .grad, and the per-example
    norms and clipped sums are only ever formed for the rank-4 factors (a base layer's
    full-size 32×32 or 32×16 weight gradient is never instantiated)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = peft.get_peft_model(llama(), config)
    with torch.no_grad():  # lora_B starts at 0, which would make lora_A's gradient 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * LAYERS and all("lora_" in n for n in trainable)
    shapes = []
    for name in ("per_example_grad_sq_norms", "clipped_grad_sum"):
        kernel = getattr(DF, name)

        def spy(a, g, *args, _kernel=kernel, **kwargs):
            shapes.append((a.shape[-1], g.shape[-1]))
            return _kernel(a, g, *args, **kwargs)

        monkeypatch.setattr(DF, name, spy)
    data = batch(padded=True)
    _, model, _ = check_release(model, per_example_grads(model, *data), data)
    # lora_A: 32 -> 4 features; lora_B: 4 -> 32 (q_proj) and 4 -> 16 (v_proj, one kv head)
    assert set(shapes) == {(32, 4), (4, 32), (4, 16)}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "build", [lambda: gpt2(tie=True), lambda: llama(tie=True)], ids=["gpt2", "llama"]
)
def test_tied_embeddings_release_equals_oracle(build):
    """Tied input and output embeddings (GPT-2's default, LLaMA with tie_word_embeddings):
    the shared weight's release, the clipped sum over both uses, equals the oracle's."""
    model = build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    data = batch(padded=True)
    check_release(model, per_example_grads(model, *data), data)


REFUSED = {  # case: (extra forward arguments, what the error says)
    "left padding": (
        {"attention_mask": (torch.arange(LENGTH) >= 3).long().expand(BATCH, LENGTH)},
        "right padding",
    ),
    "4-D mask": ({"attention_mask": torch.zeros(BATCH, 1, LENGTH, LENGTH)}, "4-D"),
    # Two sequences packed in each row; transformers looks for packing only without a cache.
    "packed sequences": (
        {"position_ids": (torch.arange(LENGTH) % 5).expand(BATCH, LENGTH), "use_cache": False},
        "mask pattern",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_inexpressible_masks_are_refused(case):
    """Masks flash attention cannot express raise a ValueError saying why (before any kernel
    runs), instead of attending to the wrong keys."""
    inputs, match = REFUSED[case]
    model = dp_hf.prepare_model(llama().eval())
    ids, *_ = batch()
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(input_ids=ids, **inputs)


@pytest.mark.parametrize(
    "build, field",
    [(gpt2, "attn_pdrop"), (bert, "attention_probs_dropout_prob"), (llama, "attention_dropout")],
)
def test_attention_dropout_is_refused_by_make_private(build, field):
    """A config asking for attention dropout (GPT2Config's default attn_pdrop is 0.1) is
    refused by make_private, naming the field and the fix, even in eval mode (how
    from_pretrained returns a model; the training loop switches it to train() later)."""
    model_class, config = type(build()), copy.deepcopy(build().config)
    setattr(config, field, 0.1)
    with pytest.raises(ValueError, match=rf"{field}=0\.1\).*{field}=0\.0"):
        make_private(model_class(config).eval(), 1.0)
    setattr(config, field, 0.0)
    make_private(model_class(config), 1.0)


def test_attention_dropout_set_after_preparation_is_refused_at_the_forward():
    """Dropout switched on in a layer after make_private is still refused, at the forward."""
    model = dp_hf.prepare_model(gpt2())
    model.transformer.h[0].attn.attn_dropout.p = 0.1
    ids, *_ = batch()
    with pytest.raises(ValueError, match="attn_pdrop"):
        model(input_ids=ids)
    model.eval()(input_ids=ids)  # no dropout in eval mode: runs
