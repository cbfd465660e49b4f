"""Map-style dataset over cached images, and samplers that make the data order reproducible.

Each training sample's augmentation is a pure function of (seed, epoch, index) and the shuffle
order of (seed, epoch): a resumed run sees the same images in the same order, augmented the same
way, as a run that never stopped — with persistent workers too, since the epoch travels with
the index the sampler yields rather than as dataset state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from visioncare import IGNORE_INDEX
from visioncare.data.cache import load_cached
from visioncare.data.records import Record


def shuffle_seed(seed: int) -> int:
    """A well-mixed 32-bit seed for the shuffle of the run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class FundusDataset(Dataset):
    """Records + their cache files → dicts with ``image`` (CHW float), ``dr``, ``dme``, ``index``.

    Args:
        records: the split's records.
        cached: cache file per record (same order).
        transform: albumentations pipeline ending in ToTensorV2.
        seed: base seed for per-sample augmentation.
        source_ids: index of each record's dataset (for per-source metrics); default all 0.
    """

    def __init__(
        self,
        records: Sequence[Record],
        cached: Sequence[Path],
        transform: A.Compose,
        seed: int = 0,
        source_ids: Sequence[int] | None = None,
    ) -> None:
        if len(records) != len(cached):
            raise ValueError("records and cached files differ in length")
        self.records = list(records)
        self.cached = list(cached)
        self.transform = transform
        self.seed = seed
        self.source_ids = list(source_ids) if source_ids is not None else [0] * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, ...]) -> dict[str, Any]:
        # The training sampler yields (epoch, index); `EvalShardSampler` (epoch, index, padding);
        # a plain index is epoch 0. A padding sample is ungraded (-1) for every task.
        epoch, index, *rest = item if isinstance(item, tuple) else (0, item)
        padding = bool(rest and rest[0])
        record = self.records[index]
        self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        image = self.transform(image=load_cached(self.cached[index]))["image"]
        return {
            "image": image,
            "dr": torch.tensor(IGNORE_INDEX if padding else record.dr, dtype=torch.long),
            "dme": torch.tensor(IGNORE_INDEX if padding else record.dme, dtype=torch.long),
            "source": self.source_ids[index],
            "index": index,
            "padding": padding,
        }


class EvalShardSampler(Sampler[tuple[int, int, bool]]):
    """This rank's share of an evaluation split: every image exactly once over all ranks, and
    the same number of samples on every rank.

    Rank r takes images r, r + world, … . Shards one short are topped up with a repeated image
    flagged as padding, which the dataset returns ungraded (-1) so no metric or loss counts it.
    Equal shards mean every rank runs the same validation steps and epoch-end reductions: with
    more ranks than images an empty shard would skip validation while the others wait for it.

    Args:
        num_samples: split length.
        rank, world_size: this process's shard.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        for position in range(self.rank, len(self) * self.world_size, self.world_size):
            padding = position >= self.num_samples
            yield 0, position % self.num_samples, padding


class EpochSeededSampler(DistributedSampler):
    """torch's `DistributedSampler` (shuffle by seed + epoch, equal shards per rank) that yields
    ``(epoch, index)``.

    The epoch travels with the index so a persistent worker's dataset copy seeds the sample's
    augmentation with the right epoch (`sample_seed`); Lightning calls `set_epoch` before every
    epoch. The datamodule builds it with the trainer's rank and world size, so the Trainer runs
    with ``use_distributed_sampler=False``.

    torch shuffles with ``seed + epoch``: with the run's seed as is, seed s at epoch e + 1 would
    replay seed s + 1 at epoch e. The run's seed is therefore mixed first (`shuffle_seed`).

    Args:
        dataset: the split's dataset (only its length is used).
        num_replicas, rank: this process's shard (1 and 0 outside DDP).
        shuffle: a new order each epoch (False: dataset order).
        seed: the run's data seed (`data.seed`).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=shuffle_seed(seed)
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class BalancedEpochSampler(EpochSeededSampler):
    """`EpochSeededSampler` drawing with replacement, P(sample) ∝ its weight (class balancing).

    The draw is a pure function of (seed, epoch), like the shuffle it replaces, so a resumed run
    sees the same samples; every rank takes its strided share of one shared draw.

    Args:
        dataset: the training dataset.
        weights: one non-negative weight per sample.
        num_replicas, rank, seed: as for `DistributedSampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        weights: Sequence[float],
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, True, generator=generator)
        for index in draw[self.rank : self.total_size : self.num_replicas].tolist():
            yield self.epoch, index
