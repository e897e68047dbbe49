"""Poisson sampling: each example joins each batch independently with probability
q = batch_size / N, exactly (the double's value, not a float32 rounding of it); batch sizes
vary and an empty batch is a batch with zero rows (docs/design.md §5, step 2)."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Mapping, Sized
from fractions import Fraction
from typing import Protocol, cast

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from .checks import check_int, is_real

WORD_BITS = 32  # the inclusion test compares uniform words of this many bits


def rate_words(sample_rate: float) -> list[int]:
    """The binary expansion of `sample_rate` (a double, so a dyadic rational) in WORD_BITS-bit
    words: sample_rate = Σ_j words[j] · 2^(-WORD_BITS·(j+1)) exactly. 1 is [2^WORD_BITS]."""
    rate = Fraction(sample_rate)
    digits = 1
    while (rate * 2 ** (WORD_BITS * digits)).denominator != 1:
        digits += 1
    value = int(rate * 2 ** (WORD_BITS * digits))
    mask = (1 << WORD_BITS) - 1
    words = [(value >> (WORD_BITS * (digits - 1 - j))) & mask for j in range(digits)]
    if value >> (WORD_BITS * digits):  # rate = 1: its only digit is above the point
        words[0] = 1 << WORD_BITS
    return words


def _uniform_words(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent uniform WORD_BITS-bit integers (int64): torch draws a range of
    2^32 from 64 random bits modulo 2^32, exactly uniform."""
    return torch.randint(0, 2**WORD_BITS, (count,), generator=generator, dtype=torch.int64)


def poisson_mask(num_samples: int, words: list[int], generator: torch.Generator) -> torch.Tensor:
    """Which of `num_samples` examples join the batch, each independently with probability
    q = Σ_j words[j]·2^(-32(j+1)) (rate_words(q)) exactly.

    Example i includes itself iff a uniform U_i in [0, 1) is < q. U_i's binary digits are drawn
    lazily, 32 at a time, and compared with q's: a word below q's word includes, above
    excludes, equal stays undecided for the next word (probability 2^-32 per word); when q's
    expansion ends, the undecided have U_i >= q and are excluded. So P(include) = q to the last
    bit of the double, whereas float32 `rand() < q` rounds q to a multiple of 2^-24."""
    included = torch.zeros(num_samples, dtype=torch.bool)
    undecided = torch.arange(num_samples)
    for word in words:
        if not len(undecided):
            break
        drawn = _uniform_words(len(undecided), generator)
        included[undecided[drawn < word]] = True
        undecided = undecided[drawn == word]
    return included


class PoissonBatchSampler(Sampler):
    """Batches of dataset indices drawn by Poisson sampling: each of the `num_samples` examples
    joins each batch independently with probability `sample_rate`, exactly (the double's
    value, see poisson_mask). Batch sizes vary and may be 0. `steps` batches per pass over the
    sampler ("epoch").

    The inclusion draws come from a torch.Generator seeded from the operating system's CSPRNG
    at each epoch; `generator=` fixes them (tests only)."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, *, generator=None):
        check_int("num_samples", num_samples, minimum=1)
        if not is_real(sample_rate) or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        check_int("steps", steps, minimum=1)
        self.num_samples, self.sample_rate, self.steps = num_samples, float(sample_rate), steps
        self.generator = generator
        self._words = rate_words(self.sample_rate)
        # set by the loader for each pass over it: the size of every batch yielded, in order
        self.yielded_sizes: deque[int] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        sizes = self.yielded_sizes
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        for _ in range(self.steps):
            batch = poisson_mask(self.num_samples, self._words, generator).nonzero().flatten()
            if sizes is not None:
                sizes.append(len(batch))
            yield batch.tolist()


class EmptyBatchCollate:
    """Collate that turns an empty batch into empty tensors with the right trailing shapes and
    dtypes (those of the collated first example, cut to 0 rows)."""

    def __init__(self, dataset, collate_fn):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, batch):
        if len(batch):
            return self.collate_fn(batch)
        return _zero_rows(self.collate_fn([self.dataset[0]]))


def _zero_rows(batch):
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: _zero_rows(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if all(isinstance(x, (str, bytes, int, float)) for x in batch):
            return type(batch)()  # a batch of non-tensor values, one per example
        rows = [_zero_rows(x) for x in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    raise TypeError(
        f"cannot form an empty batch from a collated {type(batch).__name__}: samples must be "
        "tensors, numbers or (nested) tuples, lists and dicts of them"
    )


class StepTracker(Protocol):
    """What a StepCheckedLoader reports to (dp_attn.clipping.Clipper implements it)."""

    def batch_delivered(self, size: int) -> None:
        """The loader is handing out the next step's batch, of `size` examples."""
        ...


class StepCheckedLoader(DataLoader):
    """A DataLoader over a PoissonBatchSampler that tells its step_tracker (the engine's
    Clipper, once make_private returned the loader) the size of each batch it hands out, so
    that a step's backward passes can be checked against the step's batch."""

    def __init__(self, dataset, batch_sampler: PoissonBatchSampler, collate_fn, **kwargs):
        if kwargs.get("in_order") is False:
            raise ValueError(
                "in_order=False is not supported: the engine matches each batch with its "
                "Poisson draw in order"
            )
        collate = EmptyBatchCollate(dataset, collate_fn or default_collate)
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate, **kwargs)
        self.sample_rate = batch_sampler.sample_rate
        self.step_tracker: StepTracker | None = None

    def __iter__(self):
        # The sampler runs ahead of the batches yielded when workers prefetch, but both go in
        # order: the sizes it appends are popped here one per batch.
        sizes = deque()
        self.batch_sampler.yielded_sizes = sizes
        for batch in super().__iter__():
            size = sizes.popleft()
            if self.step_tracker is not None:
                self.step_tracker.batch_delivered(size)
            yield batch


class PoissonDataLoader(StepCheckedLoader):
    """A DataLoader whose batches are Poisson samples at rate `sample_rate` (see
    PoissonBatchSampler); `steps` batches per epoch (default round(1 / sample_rate)).
    Empty batches are yielded as tensors with zero rows. Other keyword arguments go to
    DataLoader (num_workers, pin_memory, ...)."""

    def __init__(
        self,
        dataset,
        sample_rate: float,
        *,
        steps: int | None = None,
        collate_fn=None,
        generator=None,
        **kwargs,
    ):
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        if steps is None:
            steps = max(1, round(1.0 / sample_rate)) if sample_rate > 0 else 1
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator=generator)
        super().__init__(dataset, sampler, collate_fn, **kwargs)

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None) -> PoissonDataLoader:
        """The Poisson version of an ordinary loader: q = batch_size / len(dataset), as many
        steps per epoch as the loader has batches, the same collate_fn and worker settings."""
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a DataLoader, got {type(data_loader).__name__}")
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError(
                "data_loader must be built with batch_size=... (the expected batch size of the "
                "Poisson batches); a custom batch_sampler is not supported. To train on part "
                "of a dataset, wrap it in torch.utils.data.Subset"
            )
        dataset = data_loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError("Poisson sampling needs a map-style dataset (with __len__ and [i])")
        custom = [
            s for s, default in ((data_loader.sampler, (SequentialSampler, RandomSampler)),
                                 (data_loader.batch_sampler, (BatchSampler,)))
            if type(s) not in default
        ]  # fmt: skip
        if custom:
            raise ValueError(
                f"data_loader uses a {type(custom[0]).__name__}: the Poisson loader that "
                "replaces it samples every example of the dataset at rate batch_size / "
                "len(dataset), whatever that sampler would have drawn. To train on part of a "
                "dataset, wrap it in torch.utils.data.Subset and build the loader with "
                "batch_size (and shuffle) only"
            )
        size = len(cast(Sized, dataset))  # map-style: torch's Dataset type declares no __len__
        if size == 0:
            raise ValueError("data_loader's dataset is empty")
        if batch_size > size:
            raise ValueError(f"batch_size ({batch_size}) exceeds the dataset size ({size})")
        kwargs = {
            "num_workers": data_loader.num_workers,
            "pin_memory": data_loader.pin_memory,
            "timeout": data_loader.timeout,
            "worker_init_fn": data_loader.worker_init_fn,
            "multiprocessing_context": data_loader.multiprocessing_context,
            "persistent_workers": data_loader.persistent_workers,
        }
        if data_loader.num_workers > 0:
            kwargs["prefetch_factor"] = data_loader.prefetch_factor
        return cls(
            dataset,
            batch_size / size,
            steps=len(data_loader),
            collate_fn=data_loader.collate_fn,
            generator=generator,
            **kwargs,
        )
