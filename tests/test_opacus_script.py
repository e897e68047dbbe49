"""A training script written the way Opacus' tutorials write them (a text classifier: model
class, criterion, SGD, DataLoader, PrivacyEngine(secure_mode=False), make_private with
Opacus' arguments, train and test functions, get_epsilon) runs with dp_attn when only its
import changes; the same text runs under Opacus itself (so it is Opacus' API, not ours)."""

import math

import pytest

SCRIPT = """
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from opacus import PrivacyEngine

EPOCHS = 2
LR = 0.5
BATCH_SIZE = 32
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
VOCAB_SIZE, SEQ_LEN, EMBED_DIM, HIDDEN, N_CLASSES = 50, 12, 16, 32, 2

torch.manual_seed(0)
tokens = torch.randint(0, VOCAB_SIZE, (512, SEQ_LEN))
labels = (tokens < VOCAB_SIZE // 2).sum(dim=1).gt(SEQ_LEN // 2).long()
train_dataset = TensorDataset(tokens[:384], labels[:384])
test_dataset = TensorDataset(tokens[384:], labels[384:])
train_loader = DataLoader(train_dataset, batch_size=BATCH_SIZE, shuffle=True)
test_loader = DataLoader(test_dataset, batch_size=128)


class TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, EMBED_DIM)
        self.fc1 = nn.Linear(EMBED_DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, N_CLASSES)

    def forward(self, x):
        x = self.embedding(x).mean(dim=1)
        x = torch.relu(self.norm(self.fc1(x)))
        return self.fc2(x)


model = TextClassifier()
criterion = nn.CrossEntropyLoss()
optimizer = optim.SGD(model.parameters(), lr=LR, momentum=0.9)

# one clipping threshold per parameter tensor: embedding, fc1 (w, b), norm (w, b), fc2 (w, b)
MAX_GRAD_NORM = [1.0, 0.5, 0.1, 0.1, 0.1, 0.5, 0.1]

privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, train_loader = privacy_engine.make_private(
    module=model,
    optimizer=optimizer,
    data_loader=train_loader,
    noise_multiplier=NOISE_MULTIPLIER,
    max_grad_norm=MAX_GRAD_NORM,
    poisson_sampling=True,
    batch_first=True,
    clipping="per_layer",
    grad_sample_mode="hooks",
)


def train(model, train_loader, optimizer, epoch):
    model.train()
    losses = []
    for data, target in train_loader:
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    epsilon = privacy_engine.get_epsilon(DELTA)
    print(f"Train Epoch: {epoch} Loss: {np.mean(losses):.6f} (ε = {epsilon:.2f}, δ = {DELTA})")


def test(model, test_loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            correct += (output.argmax(dim=1) == target).sum().item()
    return correct / len(test_loader.dataset)


initial = [p.detach().clone() for p in model.parameters()]
for epoch in range(1, EPOCHS + 1):
    train(model, train_loader, optimizer, epoch)
accuracy = test(model, test_loader)
print(f"Test accuracy: {accuracy:.3f}")
final_epsilon = privacy_engine.get_epsilon(DELTA)
"""

OPACUS_IMPORT = "from opacus import PrivacyEngine"


def run(script: str) -> dict:
    namespace = {"__name__": "__main__"}
    exec(compile(script, "opacus_tutorial_script.py", "exec"), namespace)
    return namespace


def check_trained(namespace: dict) -> None:
    assert 0.0 < namespace["final_epsilon"] < math.inf
    assert 0.0 <= namespace["accuracy"] <= 1.0
    pairs = zip(namespace["model"].parameters(), namespace["initial"], strict=True)
    assert all(not p.detach().equal(q) for p, q in pairs)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_script_runs_with_only_the_import_changed(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch twins: the kernels are slow here
    assert SCRIPT.count(OPACUS_IMPORT) == 1 and "dp_attn" not in SCRIPT
    namespace = run(SCRIPT.replace(OPACUS_IMPORT, "from dp_attn import PrivacyEngine"))
    check_trained(namespace)
    engine = namespace["privacy_engine"]
    assert type(engine).__module__ == "dp_attn.engine"
    assert engine.stats.steps == 2 * len(namespace["train_loader"]) == 24
    settings = engine.state_dict()["settings"]
    assert settings["clipping"] == "per-layer" and settings["secure_mode"] is False
    thresholds = namespace["MAX_GRAD_NORM"]
    assert engine._total_threshold == pytest.approx(math.sqrt(sum(c * c for c in thresholds)))
    out = capsys.readouterr().out
    assert out.count("Train Epoch:") == 2 and "Test accuracy:" in out


@pytest.mark.filterwarnings("ignore")
def test_the_same_script_runs_under_opacus():
    pytest.importorskip("opacus")
    check_trained(run(SCRIPT))
