"""Multi-GPU DP training: weak-scaling efficiency of DistributedPrivacyEngine against
non-private DistributedDataParallel or FSDP2. Run with torchrun on one node with several GPUs:

    TRITON_INTERPRET=0 torchrun --nproc_per_node=4 bench/multi_gpu.py --json out.json
    TRITON_INTERPRET=0 torchrun --nproc_per_node=4 bench/multi_gpu.py --parallel fsdp2

Model: a GPT-like stack of pre-norm blocks (nn.MultiheadAttention, MLP, LayerNorm) with token
and position embeddings and a head, bf16 on GPU; mean cross-entropy LM loss; SGD. Every rank
steps on its own `--batch` sequences of `--seq` tokens (weak scaling: the global batch grows
with the number of GPUs). For each of "non-private" and "private" (flat clipping, z = 1,
C = 1) it times a step of the model alone on one GPU (no collective; private: PrivacyEngine)
and the same step on every rank at once under DDP, or FSDP2 with each block and the model
sharded (`--parallel fsdp2`); private: DistributedPrivacyEngine, which replaces DDP's gradient
all-reduce (FSDP2's reduce-scatter) by one all-reduce of the noised clipped sums. Scaling
efficiency = single-GPU step time / distributed step time (1.0: the collective is free).
Rank 0 prints a table and, with --json, writes the numbers with the GPU name and versions.
On a machine without CUDA it runs on CPU with gloo (a smoke test of the script, not a
measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dp_attn.distributed import DistributedPrivacyEngine
from dp_attn.engine import PrivacyEngine


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, causal):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, blocks: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        length = ids.shape[1]
        # positions per example: dim 0 of every DP layer's input indexes the examples
        positions = torch.arange(length, device=ids.device).expand(ids.shape[0], length)
        x = self.tok(ids) + self.pos(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


def time_steps(model, optimizer, ids, steps: int, device) -> float:
    """Median seconds per step (forward, backward, optimizer step) after 3 warm-up steps."""
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(args, private: bool, distributed: bool, device, dtype) -> float:
    torch.manual_seed(0)
    model = GPT(args.vocab, args.width, args.heads, args.blocks, args.seq).to(device, dtype)
    if distributed and args.parallel == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    world = dist.get_world_size() if distributed else 1
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    if private:
        # the loader only sets q = global batch / N; the timed steps use fixed batches
        data = DataLoader(
            TensorDataset(torch.zeros(100 * args.batch * world)), batch_size=args.batch * world
        )
        engine = DistributedPrivacyEngine() if distributed else PrivacyEngine()
        model, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping="flat",
        )
    return time_steps(model, optimizer, ids, args.steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    results = {}
    for private in (False, True):
        name = "private" if private else "non-private"
        single = run(args, private, False, device, dtype)
        dist.barrier()  # the single-GPU runs do not overlap with the distributed ones
        multi = run(args, private, True, device, dtype)
        results[name] = {"single_s": single, "distributed_s": multi, "efficiency": single / multi}
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(
            f"{args.parallel}, world size {world}, {args.batch} x {args.seq} tokens per GPU "
            "per step"
        )
        print(f"{'':12} {'1 GPU ms':>10} {f'{world} GPUs ms':>12} {'efficiency':>11}")
        for name, r in results.items():
            print(
                f"{name:12} {1e3 * r['single_s']:10.1f} {1e3 * r['distributed_s']:12.1f} "
                f"{r['efficiency']:11.3f}"
            )
        ratio = results["private"]["distributed_s"] / results["non-private"]["distributed_s"]
        print(f"private / non-private step time on {world} GPUs: {ratio:.2f}")
        if args.json:
            machine = {
                "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
                "triton": triton.__version__,
                "date": datetime.date.today().isoformat(),
            }
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "machine": machine,
                        "world_size": world,
                        "args": vars(args),
                        "results": results,
                    },
                    f,
                    indent=2,
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
