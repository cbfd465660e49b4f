"""Map-style dataset over cached images, and a sampler that makes the data order reproducible.

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
from torch.utils.data import Dataset, Sampler

from visioncare import IGNORE_INDEX
from visioncare.data.cache import load_cached
from visioncare.data.records import Record


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


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Shuffles with a permutation drawn from (seed, epoch) and yields ``(epoch, index)``.

    Shards across DDP ranks itself (every rank gets the same number of samples, wrapping around
    as `DistributedSampler` does, so no rank waits on another), which is why the Trainer runs
    with ``use_distributed_sampler=False``. Lightning calls `set_epoch` before every epoch.

    Args:
        num_samples: dataset length.
        seed: shuffle seed.
        shuffle: draw a new permutation each epoch (False: dataset order).
        rank, world_size: this process's shard.
        weights: optional per-sample weights for sampling with replacement (class balancing).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            probabilities = self.weights / self.weights.sum()
            order = rng.choice(self.num_samples, size=self.num_samples, p=probabilities)
        elif self.shuffle:
            order = rng.permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = len(self) * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        for index in order[self.rank : total : self.world_size]:
            yield self.epoch, int(index)
