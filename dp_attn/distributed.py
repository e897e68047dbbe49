"""DP training on torch.distributed: DDP replicas or FSDP2 shards, one privacy ledger.

    dist.init_process_group(...)
    model = DistributedDataParallel(model)  # or: fully_shard each block, then the model
    engine = DistributedPrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,  # loader over the WHOLE dataset
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat")

What one logical step does (docs/multi_gpu.md has the reasoning):
- sampling: rank r holds the shard r, r+W, r+2W, ... of the dataset (W = world size) and
  Poisson-samples it at the rate q = batch_size / N of the loader it was given, with its own
  CSPRNG-seeded draws. The shards are disjoint and cover the dataset, so the union of the
  ranks' batches is a Poisson sample of the whole dataset at rate q. Every rank runs the same
  number of steps per epoch; a rank's local batch may be empty;
- clipping: each rank clips the examples it holds. A DP layer's per-example gradient needs
  only the layer's input and output gradient, which live on the example's rank, and the
  whole weight, which every rank has while the layer runs (DDP: a replica; FSDP2: the weight
  all-gathered for forward and backward). So flat clipping's per-example norm covers every
  layer, sharded or not, before anything is reduced. Neither DDP's all-reduce nor FSDP2's
  reduce-scatter runs: the DP layers give the parameters no .grad, the engine forms the
  clipped sums (for the whole parameter, also under FSDP2);
- noise: in optimizer.step() every rank adds an independent share N(0, (z·C_tot)²/W) to its
  clipped sums (a fresh CSPRNG key per rank and step) and ONE all-reduce (sum) forms the
  released sum: the clipped sums of the global batch plus N(0, (z·C_tot)²), the same on
  every rank, divided by the expected GLOBAL batch size q·N. Under FSDP2 each rank then keeps
  its own shard of it as the sharded parameter's .grad;
- accounting: every rank steps an identical accountant (same z, same q, same steps), so ε is
  the same on every rank; save the ledger from any rank (conventionally rank 0).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from . import functional as DF
from .checks import check_int, is_int
from .conversion import CONVERSIONS, refuse_outside_gradient
from .engine import PrivacyEngine
from .kernels.noise import secure_noise_grid, snap_to_grid
from .sampling import (
    EmptyBatchCollate,
    PoissonBatchSampler,
    PoissonDataLoader,
    StepCheckedLoader,
)

__all__ = [
    "DistributedPoissonBatchSampler",
    "DistributedPoissonDataLoader",
    "DistributedPrivacyEngine",
]


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Poisson batches of rank `rank`'s shard of a dataset of `num_samples` examples: the
    indices rank, rank + world_size, ...; each joins each batch independently with
    probability `sample_rate`. Run one per rank, each with its own draws (the default: a
    fresh CSPRNG seed per rank and epoch); the union of the ranks' batches is then a Poisson
    sample of the whole dataset. `steps` must be the same on every rank."""

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        *,
        rank: int,
        world_size: int,
        generator=None,
    ):
        check_int("world_size", world_size, minimum=1)
        if not is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not is_int(num_samples) or num_samples < world_size:
            raise ValueError(
                f"num_samples must be an int >= world_size ({world_size}), got {num_samples!r}"
            )
        self.rank, self.world_size = rank, world_size
        super().__init__(
            len(range(rank, num_samples, world_size)), sample_rate, steps, generator=generator
        )

    def __iter__(self):
        for local in super().__iter__():
            yield [self.rank + self.world_size * i for i in local]


class DistributedPoissonDataLoader(StepCheckedLoader):
    """A DataLoader over this rank's Poisson batches of the whole `dataset` (see
    DistributedPoissonBatchSampler); `steps` batches per epoch on every rank. Empty batches
    are tensors with zero rows. rank and world_size default to those of the default process
    group. Other keyword arguments go to DataLoader (num_workers, pin_memory, ...)."""

    def __init__(
        self,
        dataset,
        sample_rate: float,
        *,
        steps: int,
        rank: int | None = None,
        world_size: int | None = None,
        collate_fn=None,
        generator=None,
        **kwargs,
    ):
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        sampler = DistributedPoissonBatchSampler(
            len(dataset),
            sample_rate,
            steps,
            rank=rank,
            world_size=world_size,
            generator=generator,
        )
        super().__init__(dataset, sampler, collate_fn, **kwargs)


class DistributedPrivacyEngine(PrivacyEngine):
    """PrivacyEngine for a job of W processes that each train on their own examples: model
    replicas (plain, or wrapped in DistributedDataParallel) or a model sharded with FSDP2
    (torch.distributed.fsdp.fully_shard over a 1-D device mesh). Create it, and call
    make_private, on every rank after torch.distributed.init_process_group.
    accountant: "prv" (default) or "rdp".

    Refused: FSDP1 (FullyShardedDataParallel), fully_shard applied to a single nn.Linear /
    nn.LayerNorm / ... (shard the blocks that contain them), FSDP2 over a 2-D mesh (HSDP) or
    with tensor parallelism."""

    def make_private(
        self,
        *,
        module: nn.Module,
        data_loader: DataLoader,
        generator: torch.Generator | None = None,
        **settings,
    ) -> tuple:
        """PrivacyEngine.make_private for one rank; returns (module, optimizer, data_loader)
        (with the criterion before data_loader for a "ghost" grad_sample_mode). `settings`:
        PrivacyEngine.make_private's other keyword arguments (optimizer, noise_multiplier,
        max_grad_norm, ...).

        module: a model replica, a DistributedDataParallel around one (its inner module is
            converted; its gradient all-reduce is switched off), or a model sharded with
            fully_shard (converted in place; its reduce-scatter never runs). The engine
            reduces over the DDP process group, or the FSDP2 mesh's group. Names in a
            per-layer max_grad_norm mapping are those of the inner module.
        optimizer: over the module's parameters (FSDP2: the sharded ones, as usual).
        data_loader: an ordinary loader over the WHOLE dataset, the same on every rank;
            batch_size is the expected GLOBAL batch size (q = batch_size / len(dataset)).
            Replaced by this rank's DistributedPoissonDataLoader.
        generator: fixes this rank's Poisson draws (tests only: give each rank its own seed).
        secure_mode: as for PrivacyEngine; the reduced sum is rounded, never a rank's share.
        Everything else is as for PrivacyEngine.make_private and must be the same on every
        rank (noise_multiplier too, when changed between steps).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedPrivacyEngine needs torch.distributed: call "
                "torch.distributed.init_process_group first (or use PrivacyEngine)"
            )
        fsdp_modules = _fsdp2_modules(module)
        group: dist.ProcessGroup | None  # None: the default group
        if isinstance(module, DistributedDataParallel):
            if fsdp_modules:
                raise TypeError("module: DistributedDataParallel around an FSDP model is refused")
            wrapper, inner, group = module, module.module, module.process_group
        else:
            wrapper, inner = None, module
            group = _fsdp2_group(module) if fsdp_modules else dist.group.WORLD
        # generator draws this rank's batches (below), not those of the single-process loader
        # that make_private builds and this rank's loader replaces.
        inner, optimizer, *criterion, loader = super().make_private(
            module=inner, data_loader=data_loader, **settings
        )
        self._group = group
        self._world_size = dist.get_world_size(group)
        if fsdp_modules:
            self._register_unsharded_params(inner, fsdp_modules)
        loader = _distributed_loader(loader, dist.get_rank(group), self._world_size, generator)
        loader.step_tracker = self._clipper
        if wrapper is None:
            return inner, optimizer, *criterion, loader
        # DDP would all-reduce .grad after backward; the DP layers produce none (the engine
        # releases the noised sum in step), so its reducer must not wait for them.
        wrapper.require_backward_grad_sync = False
        self.module = wrapper
        return wrapper, optimizer, *criterion, loader

    def _register_unsharded_params(self, inner: nn.Module, fsdp_modules) -> None:
        """FSDP2 runs each layer with an unsharded Parameter (created at the first all-gather,
        then kept) in place of the registered sharded one, so the DP layers hand the clipper
        material keyed by the unsharded object: route it to the sharded parameter's slice,
        and refuse gradients reaching it from outside its DP layer, as for the sharded one."""
        private = {p: name for name, p in self._params}
        clipper = self._step_clipper
        registered = [
            (m, pname, p)
            for m in inner.modules()
            for pname, p in m.named_parameters(recurse=False)
            if p in private
        ]
        for fsdp_module in fsdp_modules:  # one at a time: never the whole model unsharded
            fsdp_module.unshard()
            try:
                for m, pname, sharded in registered:
                    unsharded = getattr(m, pname)
                    if unsharded is not sharded and unsharded not in clipper.slices:
                        clipper.alias(unsharded, sharded)
                        unsharded.register_hook(refuse_outside_gradient(private[sharded]))
            finally:
                fsdp_module.reshard()

    def _add_noise(self, grads: torch.Tensor, std: float) -> None:
        """This rank's share N(0, std²/W) of the step's noise, then the sum over the ranks:
        the global clipped sums plus N(0, std²), the same on every rank.

        secure_mode rounds the reduced sum, never a share: the sum of rounded messages is not a
        function of the noised sum, only of W messages that each carry std/√W of noise."""
        if self._world_size == 1:
            super()._add_noise(grads, std)
            return
        if std > 0.0:
            DF.add_gaussian_noise_(grads, std / math.sqrt(self._world_size))
        dist.all_reduce(grads, op=dist.ReduceOp.SUM, group=self._group)
        if std > 0.0 and self._secure_mode:
            grads.copy_(snap_to_grid(grads, secure_noise_grid(std)))

    def _as_grad(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        grad = super()._as_grad(param, grad)
        if isinstance(param, DTensor):
            # every rank holds the same released gradient: each keeps its shard, no messages
            return distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)
        return grad


def _distributed_loader(loader: PoissonDataLoader, rank, world_size, generator):
    """This rank's version of the single-process Poisson loader make_private built."""
    kwargs = {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DistributedPoissonDataLoader(
        loader.dataset,
        loader.sample_rate,
        steps=len(loader),
        rank=rank,
        world_size=world_size,
        collate_fn=cast(EmptyBatchCollate, loader.collate_fn).collate_fn,
        generator=generator,
        **kwargs,
    )


def _fsdp2_modules(module: nn.Module) -> list[FSDPModule]:
    """The fully_shard-ed modules in `module` (itself included); refuses what is unsupported."""
    found: list[FSDPModule] = []
    for name, m in module.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            raise TypeError(
                "module: FullyShardedDataParallel (FSDP1) is not supported; shard the model "
                "with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
            )
        if not isinstance(m, FSDPModule):
            continue
        layer = next((b for b in type(m).__bases__ if b in CONVERSIONS), None)
        if layer is not None:
            raise TypeError(
                f"module: fully_shard was applied to {name or 'the model'!r}, a single "
                f"{layer.__name__}, which make_private cannot turn into its DP layer; apply "
                "fully_shard to the blocks that contain such layers (and to the root) instead"
            )
        found.append(m)
    return found


def _fsdp2_group(module: nn.Module) -> dist.ProcessGroup:
    """The process group of the one 1-D device mesh over which `module`'s parameters are
    sharded: the data-parallel ranks whose clipped sums the engine adds up."""
    meshes = {p.device_mesh for p in module.parameters() if isinstance(p, DTensor)}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise TypeError(
            "module: FSDP2 is supported with all parameters sharded over one 1-D device mesh; "
            f"got {len(meshes)} mesh(es) of dims {sorted(m.ndim for m in meshes)} (HSDP and "
            "tensor parallelism are not supported)"
        )
    return next(iter(meshes)).get_group()
