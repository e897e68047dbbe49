"""`dp-attn demo`: a small vision transformer trained with differential privacy on scikit-learn's
handwritten digits (1,797 8×8 images shipped inside the sklearn package: nothing is downloaded).

Each image is cut into 4 patches of 4×4 pixels; a patch is one token. The model is ordinary
PyTorch (nn.Linear patch embedding, nn.Embedding position embedding, two pre-norm blocks of
nn.MultiheadAttention and an MLP with nn.LayerNorm, mean pooling, a linear head); the
PrivacyEngine converts it to DP layers, calibrates the noise for (ε, δ) = (3, 1e-5) and
enforces that budget. Training is SGD with momentum and a cosine learning-rate decay (under DP,
SGD with large Poisson batches beat Adam here). The same model, optimizer, schedule and number of
epochs are then trained without privacy for comparison, with a learning rate of its own (DP-SGD's
gradients are averages of per-example gradients clipped to norm 1: a different scale).

One example (one image) is the privacy unit. The seed fixes the train/test split, the
initialisation and the non-private run's shuffling; the DP run's Poisson sampling and noise come
from the operating system's CSPRNG (privacy needs them secret), so its accuracy varies a little
between runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .engine import PrivacyEngine
from .kernels.utils import backend_name

DELTA = 1e-5
PATCH = 4  # pixels per patch side
TOKENS = (8 // PATCH) ** 2  # patches of an 8×8 image
TEST_FRACTION = 0.2
# dp-attn is installed from a clone (it is not on the package index).
INSTALL_HINT = (
    'pip install scikit-learn matplotlib tqdm  (or, in the dp_attn clone: pip install -e ".[demo]")'
)


@dataclass(frozen=True)
class Settings:
    """Hyperparameters of the demo (tuned for ε = 3; the whole demo takes ~10 s on 2 CPU cores)."""

    epochs: int = 40
    batch_size: int = 512  # expected Poisson batch size: q = 512 / 1438
    lr: float = 0.3  # SGD with momentum, cosine decay to 0
    baseline_lr: float = 0.1  # the non-private run's (its gradients are not clipped to norm C)
    momentum: float = 0.9
    max_grad_norm: float = 1.0  # flat clipping
    dim: int = 32  # 2 heads of head dim 16
    heads: int = 2
    depth: int = 2
    limit: int | None = None  # use only this many training and test images (--quick)


QUICK = Settings(epochs=1, batch_size=8, dim=16, heads=1, limit=16)


# ---------------------------------------------------------------- data


def digit_patches(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[N, H, W] images as [N, (H/patch)·(W/patch), patch²] patch tokens, in row-major order."""
    n, h, w = images.shape
    tiles = images.unfold(1, patch, patch).unfold(2, patch, patch)  # [N, H/p, W/p, p, p]
    return tiles.reshape(n, (h // patch) * (w // patch), patch * patch)


def load_digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of (patches [4, 16] float32, label) from sklearn's digits.

    Pixels (0 to 16) are mapped to [-1, 1] with fixed constants: no statistic of the data is
    used, so the preprocessing costs no privacy. The split (80/20) is drawn from `seed`.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(f"the demo needs scikit-learn: {INSTALL_HINT}") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(TEST_FRACTION * len(labels))
    test, train = order[:n_test], order[n_test:]
    patches = digit_patches(images)
    return TensorDataset(patches[train], labels[train]), TensorDataset(patches[test], labels[test])


# ---------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class DigitsViT(nn.Module):
    """A vision transformer for [B, tokens, patch²] patch tokens, built only from layers the
    PrivacyEngine converts (the position embedding is an nn.Embedding over patch indices, and
    the classifier reads the mean of the tokens, so there is no bare nn.Parameter)."""

    def __init__(
        self,
        tokens: int = TOKENS,
        patch_values: int = PATCH * PATCH,
        dim: int = 32,
        heads: int = 2,
        depth: int = 2,
        classes: int = 10,
    ):
        super().__init__()
        self.embed = nn.Linear(patch_values, dim)
        self.pos = nn.Embedding(tokens, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = patches.shape
        positions = torch.arange(tokens, device=patches.device).expand(batch, tokens)
        x = self.blocks(self.embed(patches) + self.pos(positions))
        return self.head(self.norm(x).mean(1))


def make_model(settings: Settings, seed: int) -> DigitsViT:
    torch.manual_seed(seed)
    return DigitsViT(dim=settings.dim, heads=settings.heads, depth=settings.depth)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, device: torch.device) -> float:
    """Fraction of `dataset` that `model` classifies correctly."""
    model.eval()
    patches, labels = (t.to(device) for t in dataset.tensors)
    correct = (model(patches).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(labels)


# ---------------------------------------------------------------- training


def train(model, optimizer, loader, epochs, test, device, progress, after_epoch=None):
    """The ordinary training loop (both runs): cross-entropy, cosine learning-rate decay to 0
    over all steps. After each epoch it measures test accuracy and calls
    `after_epoch(epoch, steps, accuracy)`. Returns [(steps, test accuracy)], from step 0."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    history, steps = [(0, accuracy(model, test, device))], 0
    for epoch in range(1, epochs + 1):
        for patches, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(patches.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()  # DP: clip, add noise, account; an empty batch is a noise-only step
            schedule.step()
            steps += 1
            progress.update()
        history.append((steps, accuracy(model, test, device)))
        if after_epoch is not None:
            after_epoch(epoch, *history[-1])
    return history


def resolve_device(name: str | None) -> torch.device:
    """The device called `name` (None: CUDA if available, else the CPU), checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"expected a device such as cpu or cuda, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the demo runs on cpu or cuda, got {name!r}")
    return device


def make_optimizer(model: nn.Module, lr: float, settings: Settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum)


def run_demo(
    *,
    epsilon: float = 3.0,
    epochs: int | None = None,
    device: str | None = None,
    seed: int = 0,
    plot: str | Path | None = "dp_attn_demo.png",
    quick: bool = False,
    baseline: bool = True,
) -> dict:
    """Train with DP at (epsilon, 1e-5) and, with `baseline`, the same model without privacy;
    print each epoch's test accuracy and ε; save the plot to `plot` (None: no plot).
    `quick`: a tiny run (16 training and 16 test images, one epoch, a narrower model).
    Returns the results (accuracies, ε, histories, timings)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(f"the demo needs tqdm: {INSTALL_HINT}") from None
    settings = QUICK if quick else Settings()
    if epochs is not None:
        settings = replace(settings, epochs=epochs)
    device = resolve_device(device)
    train_set, test_set = load_digits_datasets(seed)
    if settings.limit is not None:
        train_set, test_set = (
            TensorDataset(*(t[: settings.limit] for t in d.tensors)) for d in (train_set, test_set)
        )
    print(
        f"digits: {len(train_set)} training and {len(test_set)} test images, each {TOKENS} "
        f"patches of {PATCH}×{PATCH} pixels; device {device}, kernels: {backend_name(device)}"
    )
    start = time.perf_counter()

    # -- the DP run: the ordinary model, optimizer and loader, made private by the engine
    model = make_model(settings, seed).to(device)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=make_optimizer(model, settings.lr, settings),
        data_loader=DataLoader(train_set, batch_size=settings.batch_size),
        target_epsilon=epsilon,
        target_delta=DELTA,
        epochs=settings.epochs,
        max_grad_norm=settings.max_grad_norm,
    )
    print(
        f"DP-SGD for (ε, δ) = ({epsilon:g}, {DELTA:g}): Poisson sampling at q = "
        f"{loader.sample_rate:.3f} (expected batch {settings.batch_size}), {len(loader)} steps "
        f"per epoch, noise multiplier {optimizer.noise_multiplier:.3f}, flat clipping at "
        f"C = {settings.max_grad_norm:g}; SGD lr {settings.lr:g}, momentum {settings.momentum:g}"
    )
    epsilons = [(0, 0.0)]

    def after_epoch(epoch, steps, acc):
        eps = engine.get_epsilon(DELTA)
        epsilons.append((steps, eps))
        bar.write(f"epoch {epoch:3d}/{settings.epochs}  test accuracy {acc:6.1%}  ε = {eps:.3f}")
        bar.set_postfix_str(f"accuracy {acc:.1%}, ε {eps:.2f}")

    with tqdm(total=settings.epochs * len(loader), desc="DP training", unit="step") as bar:
        dp_history = train(
            model, optimizer, loader, settings.epochs, test_set, device, bar, after_epoch
        )
    results = {
        "epsilon": engine.get_epsilon(DELTA),
        "delta": DELTA,
        "dp_accuracy": dp_history[-1][1],
        "dp_history": dp_history,
        "epsilon_history": epsilons,
        "noise_multiplier": optimizer.noise_multiplier,
        "sample_rate": loader.sample_rate,
        "steps": engine.stats.steps,
        "backend": backend_name(device),
        "dp_seconds": time.perf_counter() - start,
    }

    # -- the same model, optimizer, schedule and epochs without privacy (own learning rate)
    if baseline:
        model = make_model(settings, seed).to(device)
        loader = DataLoader(
            train_set,
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        with tqdm(total=settings.epochs * len(loader), desc="non-private", unit="step") as bar:
            optimizer = make_optimizer(model, settings.baseline_lr, settings)
            history = train(model, optimizer, loader, settings.epochs, test_set, device, bar)
        results["baseline_accuracy"] = history[-1][1]
        results["baseline_history"] = history

    results["seconds"] = time.perf_counter() - start
    line = f"test accuracy with DP: {results['dp_accuracy']:.1%}"
    if baseline:
        line += f", without privacy: {results['baseline_accuracy']:.1%}"
    print(f"{line} ({results['seconds']:.0f} s)")
    print(
        f"the DP model is ({results['epsilon']:.2f}, {DELTA:g})-DP with respect to adding or "
        "removing one training image"
    )
    if plot is not None:
        save_plot(results, plot)
        print(f"plot: {plot}")
    return results


def save_plot(results: dict, path: str | Path) -> None:
    """PNG of test accuracy (DP and non-private) and ε against optimizer steps."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the demo's plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps, acc = zip(*results["dp_history"], strict=True)
    left.plot(steps, [100 * a for a in acc], marker=".", label=f"DP (ε = {results['epsilon']:.2f})")
    if "baseline_history" in results:
        b_steps, b_acc = zip(*results["baseline_history"], strict=True)
        left.plot(b_steps, [100 * a for a in b_acc], marker=".", label="non-private")
    left.set(
        xlabel="optimizer steps",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
        title="digits: test accuracy",
    )
    left.legend(loc="lower right")
    e_steps, eps = zip(*results["epsilon_history"], strict=True)
    right.plot(e_steps, eps, marker=".", color="tab:red")
    right.set(
        xlabel="optimizer steps",
        ylabel="ε",
        ylim=(0, None),
        title=f"privacy spent (δ = {results['delta']:g})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
