"""DistributedPrivacyEngine on 2 CPU processes (gloo): the noise-free update equals the
single-process engine on the same global batch (DDP and FSDP2, each clipping style, an empty
local batch); the reduced noise has std z·C/(q·N) and is identical on every rank; ε agrees
across ranks and a saved ledger resumes; unsupported sharding is refused; the distributed
Poisson sampler's shards.

The two processes are started once for the module (starting them costs most of the time) and
run every scenario; each test checks one scenario's saved results. Statistical tests use
two-sided bounds with false-alarm probability 1e-6 each."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dp_attn.accounting import make_accountant
from dp_attn.distributed import (
    DistributedPoissonBatchSampler,
    DistributedPrivacyEngine,
)
from dp_attn.engine import PrivacyEngine
from dp_attn.kernels.noise import secure_noise_grid

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

WORLD = 2
N, BATCH = 8, 4  # dataset size and expected global batch: q = 1/2, q·N = 4
DIN, DHID, CLASSES = 6, 9, 3  # odd widths: FSDP2 shards them unevenly over the 2 ranks
# each rank's local batch (rank r holds indices r, r+2, ...) as the micro-batches it runs
# backward on before the one optimizer step: a normal step, a step where rank 1 has no
# example, and gradient accumulation (with an empty micro-batch)
LOCAL_BATCHES = {
    "both": ([[0, 4, 6]], [[1, 7]]),
    "rank1_empty": ([[0, 2, 6]], [[]]),
    "micro_batches": ([[0], [4, 6]], [[1, 7], []]),
}
CLIPPING = ("flat", "per-layer", "block")
WRAPPERS = ("ddp", "fsdp2")
LR = 0.5
NOISE_STEPS, Z, C = 12, 1.0, 0.5
DELTA = 1e-5
FALSE_ALARM = 1e-6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(DIN, DHID), nn.LayerNorm(DHID), nn.GELU())
    return nn.Sequential(block, nn.Linear(DHID, CLASSES))


def wrap(model: nn.Module, wrapper: str | None) -> nn.Module:
    if wrapper == "ddp":
        return DistributedDataParallel(model)
    if wrapper == "fsdp2":
        fully_shard(model[0])  # the block and the root: two FSDP2 parameter groups
        return fully_shard(model)
    return model


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, DIN, generator=generator) * 3.0  # large enough that clipping bites
    y = torch.randint(0, CLASSES, (N,), generator=generator)
    return TensorDataset(x, y)


def loader() -> DataLoader:
    return DataLoader(make_data(), batch_size=BATCH)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an FSDP2 shard is all-gathered: every rank must call this)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def step(model, optimizer, micro_batches) -> dict[str, torch.Tensor]:
    """One logical step: a backward pass on each micro-batch (rows of the dataset), then the
    optimizer step; the released gradients ("grad/...") and the parameters after the
    optimizer's update ("param/...")."""
    x, y = make_data().tensors
    optimizer.zero_grad()
    for rows in micro_batches:
        rows = torch.tensor(rows, dtype=torch.long)
        F.cross_entropy(model(x[rows]), y[rows]).backward()
    optimizer.step()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    out = {}
    for name, p in inner.named_parameters():
        out[f"grad/{name}"], out[f"param/{name}"] = full(p.grad), full(p)
    return out


def private(engine, z, clipping="flat", wrapper="ddp"):
    model = wrap(make_model(), wrapper)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader(),
        noise_multiplier=z,
        max_grad_norm=C,
        clipping=clipping,
    )


# ---------------------------------------------------------------- what each rank runs


def _scenarios(rank: int) -> dict:
    def update(wrapper, clipping, rows):
        engine = DistributedPrivacyEngine("rdp")
        model, optimizer, _ = private(engine, 0.0, clipping, wrapper)
        return step(model, optimizer, rows)

    def noise(wrapper):
        engine = DistributedPrivacyEngine("rdp")
        model, optimizer, _ = private(engine, Z, wrapper=wrapper)
        grads = [
            {k: v for k, v in step(model, optimizer, [[]]).items() if k.startswith("grad/")}
            for _ in range(NOISE_STEPS)
        ]
        state = engine.state_dict()
        resumed = DistributedPrivacyEngine("rdp")
        resumed.load_state_dict(state)
        model, optimizer, _ = private(resumed, Z, wrapper=wrapper)
        step(model, optimizer, [[]])
        return {
            "grads": grads,
            "epsilon": engine.get_epsilon(DELTA),
            "resumed_epsilon": resumed.get_epsilon(DELTA),
        }

    out = {}
    for wrapper in WRAPPERS:
        for clipping in CLIPPING:
            for case, batches in LOCAL_BATCHES.items():
                out[f"update/{wrapper}/{clipping}/{case}"] = (
                    lambda w=wrapper, c=clipping, b=batches: update(w, c, b[rank])
                )
        out[f"noise/{wrapper}"] = lambda w=wrapper: noise(w)

    def loader_batches():
        _, _, data = private(DistributedPrivacyEngine("rdp"), Z, wrapper=None)
        x_all = make_data().tensors[0]
        # which dataset rows this rank's batches hold, by matching their inputs
        rows = [[int((x_all == row).all(1).nonzero()) for row in x] for x, _ in data]
        return {"len": len(data), "sample_rate": data.sample_rate, "rows": rows}

    def refusal(model):
        try:
            DistributedPrivacyEngine("rdp").make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                data_loader=loader(),
                noise_multiplier=Z,
                max_grad_norm=C,
            )
        except TypeError as err:
            return str(err)
        return None

    def refusals():
        single_layer = make_model()
        fully_shard(single_layer[1])  # a bare nn.Linear becomes an FSDPLinear, not an nn.Linear
        fully_shard(single_layer)
        hybrid = make_model()  # HSDP: replicate over one mesh dim, shard over the other
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
        fully_shard(hybrid[0], mesh=mesh)
        fully_shard(hybrid, mesh=mesh)
        return {"single_layer": refusal(single_layer), "hsdp": refusal(hybrid)}

    def outside_gradient():
        """An FSDP2 model using a weight outside its DP layer: the gradient reaches the
        unsharded parameter, which must be refused like the registered (sharded) one."""
        model, _, _ = private(DistributedPrivacyEngine("rdp"), Z, wrapper="fsdp2")
        # runs inside the model's forward, where FSDP2 has swapped in the unsharded weight
        model[1].register_forward_hook(lambda layer, args, y: y + F.linear(args[0], layer.weight))
        try:
            model(make_data().tensors[0][:2]).sum().backward()
        except RuntimeError as err:
            return {"error": str(err)}
        return {"error": None}

    out["loader"] = loader_batches
    out["refusals"] = refusals
    out["outside_gradient"] = outside_gradient  # last: a failed backward may leave FSDP2 busy
    return out


def _worker(rank: int, port: int, results: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        saved = {}
        for name, run in _scenarios(rank).items():
            try:
                saved[name] = run()
            except Exception:
                saved[name] = traceback.format_exc()
        torch.save(saved, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results of every scenario: [rank 0's, rank 1's]."""
    results = str(tmp_path_factory.mktemp("distributed"))
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    return [
        torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
    ]


def result(ranks, name):
    out = [saved[name] for saved in ranks]
    for r, value in enumerate(out):
        if isinstance(value, str):
            pytest.fail(f"rank {r} failed in {name}:\n{value}")
    return out


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", LOCAL_BATCHES)
@pytest.mark.parametrize("clipping", CLIPPING)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_noise_free_update_equals_single_process(ranks, wrapper, clipping, case):
    got = result(ranks, f"update/{wrapper}/{clipping}/{case}")
    model, optimizer, _ = private(PrivacyEngine("rdp"), 0.0, clipping, wrapper=None)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    union = sorted(i for local in LOCAL_BATCHES[case] for rows in local for i in rows)
    expected = step(model, optimizer, [union])
    assert set(got[0]) == set(expected)
    for name, want in expected.items():
        if name.startswith("grad/"):
            assert want.abs().max() > 0, name  # the step did something
        else:
            assert not torch.equal(want, initial[name.removeprefix("param/")]), name
        for r in range(WORLD):
            torch.testing.assert_close(got[r][name], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[0][name], got[1][name]), name  # ranks agree exactly


def test_flat_clipping_bites_in_the_update_scenarios():
    """The oracle comparison checks clipping only if clipping changes the sum: with every
    example's whole-model norm above C, a per-shard or per-layer norm would give another
    update (all norms are above C here, so no factor is 1)."""
    model = make_model()
    x, y = make_data().tensors
    for i in range(N):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert norm > C, (i, float(norm))


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_noise_std_of_the_reduced_gradient(ranks, wrapper):
    got = result(ranks, f"noise/{wrapper}")
    flat = [torch.cat([g.flatten() for s in r["grads"] for g in s.values()]) for r in got]
    assert torch.equal(flat[0], flat[1])  # one released gradient, the same on both ranks
    std = Z * C / BATCH  # z·C_tot / (q·N): noise once for the whole job, not once per rank
    n = flat[0].numel()
    statistic = float((flat[0].double() ** 2).sum()) / std**2  # ~ χ²(n): the mean is 0
    low, high = scipy_stats.chi2.ppf([FALSE_ALARM / 2, 1 - FALSE_ALARM / 2], n)
    assert low < statistic < high, (statistic / n, "variance ratio, expected 1")
    # a per-rank share alone (1/W) or full noise on each rank (W) lies far outside
    assert not low < statistic * WORLD < high and not low < statistic / WORLD < high
    grid = secure_noise_grid(Z * C)  # secure_mode (the default) rounds the reduced sum
    cells = flat[0].double() * BATCH / grid
    assert torch.equal(cells, cells.round()) and cells.abs().max() > 1


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_epsilon_identical_on_every_rank_and_resumed(ranks, wrapper):
    got = result(ranks, f"noise/{wrapper}")
    assert got[0]["epsilon"] == got[1]["epsilon"]
    assert got[0]["resumed_epsilon"] == got[1]["resumed_epsilon"]
    accountant = make_accountant("rdp")
    for _ in range(NOISE_STEPS):
        accountant.step(noise_multiplier=Z, sample_rate=BATCH / N)
    assert got[0]["epsilon"] == pytest.approx(accountant.epsilon(DELTA), rel=1e-9)
    accountant.step(noise_multiplier=Z, sample_rate=BATCH / N)
    assert got[0]["resumed_epsilon"] == pytest.approx(accountant.epsilon(DELTA), rel=1e-9)
    assert got[0]["resumed_epsilon"] > got[0]["epsilon"]


def test_loader_samples_this_ranks_shard_at_the_global_rate(ranks):
    got = result(ranks, "loader")
    assert got[0]["len"] == got[1]["len"] == round(N / BATCH)  # same steps on every rank
    for r in range(WORLD):
        assert got[r]["sample_rate"] == BATCH / N
        assert all(i % WORLD == r for batch in got[r]["rows"] for i in batch)


def test_fully_shard_of_a_single_layer_is_refused_with_a_clear_error(ranks):
    for message in [r["single_layer"] for r in result(ranks, "refusals")]:
        assert message is not None and message.startswith("module:") and "Linear" in message
        assert "fully_shard to the blocks" in message


def test_fsdp2_gradient_from_outside_a_dp_layer_is_refused(ranks):
    for message in [r["error"] for r in result(ranks, "outside_gradient")]:
        assert message is not None and "1.weight received a gradient from outside" in message


def test_hsdp_is_refused_with_a_clear_error(ranks):
    for message in [r["hsdp"] for r in result(ranks, "refusals")]:
        assert message is not None and message.startswith("module:") and "HSDP" in message


def test_sampler_union_is_a_poisson_sample_of_the_dataset():
    num, q, steps = 10, 0.3, 2000
    counts = torch.zeros(num)
    samplers = [
        DistributedPoissonBatchSampler(
            num, q, steps, rank=r, world_size=3, generator=torch.Generator().manual_seed(r)
        )
        for r in range(3)
    ]
    for batches in zip(*samplers, strict=True):
        union = [i for batch in batches for i in batch]
        assert len(set(union)) == len(union)  # shards are disjoint
        counts[union] += 1
    # every example joins with probability q: binomial(steps, q) counts, 1e-6 two-sided
    low, high = scipy_stats.binom.ppf([FALSE_ALARM / 2, 1 - FALSE_ALARM / 2], steps, q)
    assert ((counts >= low) & (counts <= high)).all(), counts


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"rank": 0, "world_size": 0}, ValueError, "world_size"),
    ],
)
def test_sampler_checks_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistributedPoissonBatchSampler(N, 0.5, 1, **kwargs)


def test_sampler_refuses_fewer_examples_than_ranks():
    with pytest.raises(ValueError, match="num_samples"):
        DistributedPoissonBatchSampler(1, 0.5, 1, rank=0, world_size=2)


def test_make_private_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        private(DistributedPrivacyEngine(), 1.0, wrapper=None)
