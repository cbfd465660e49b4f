"""`FundusDataModule`: source → validation → preprocessing cache → augmentation → loaders.

A new dataset is a new `DatasetSource`; nothing here changes. Sources report only the splits their
dataset ships; the test and validation splits they lack are carved out of training here, per source
(grouped by patient, stratified on the joint DR/DME label, seeded by `data.test_split_seed` and
`data.split_seed`); model selection never sees test images.

Lightning drives it: `prepare_data` (once per node, before any process trains) generates or checks
the dataset and builds the preprocessing cache, so bad input fails before the first step;
`setup` (every process) reads the records and the cache and builds the splits' datasets. The
module learns what it needs (source names, the input spec) from here through its trainer.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from torch.utils.data import DataLoader, Sampler

from visioncare.data.cache import PreprocessedCache
from visioncare.data.dataset import (
    BalancedEpochSampler,
    EpochSeededSampler,
    EvalShardSampler,
    FundusDataset,
)
from visioncare.data.input_spec import InputSpec
from visioncare.data.preparation_lock import exclusive_preparation
from visioncare.data.preprocess import PreprocessConfig, default_cache_size
from visioncare.data.records import Record, check_test_fraction, hold_out, with_dicom_identity
from visioncare.data.sources.base import DatasetSource, legacy_split_seed
from visioncare.data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from visioncare.data.validation import validate_records
from visioncare.errors import ConfigurationError, DataValidationError, check_int_at_least
from visioncare.utils.cpus import usable_cpus

log = logging.getLogger(__name__)


class _Checked(NamedTuple):
    """What `prepare_data` found: records per split, cache file per image, undecodable images."""

    loaded: dict[str, list[Record]]
    cached: dict[Path, Path]
    bad: frozenset[Path]


class FundusDataModule(L.LightningDataModule):
    """Data for both tasks from one dataset source.

    Args:
        source: a `DatasetSource` class (or partial) called as ``source(root, **source_options)``.
        root: the dataset folder (`data.root`).
        image_size: side of the network input in pixels.
        cache_size: side of the cached preprocessed image (>= image_size); None = derived from
            image_size (`default_cache_size`: 224 → 256), so a new resolution needs one key.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes per training process, or ``auto`` (see
            `resolve_num_workers`).
        val_fraction: share of the training split held out for validation.
        split_seed: seed of the validation split (fixed across runs and training seeds).
        test_fraction: share of the labelled images held out as test, for sources that ship no
            test split (APTOS, EyePACS without testLabels.csv, Messidor-2, a CSV table without a
            split column).
        test_split_seed: seed of that hold-out; separate from `split_seed` so reshuffling
            validation keeps the same test images.
        seed: seed of shuffling and augmentation (usually the run's `seed`).
        cache_dir: where preprocessed images are stored.
        crop_fundus, ben_graham: preprocessing options (see `PreprocessConfig`).
        augment: training augmentation strengths (see `AugmentConfig`).
        mean, std: input normalisation (the config's default resolves to the backbone's timm
            mean/std, see `visioncare.models.net.backbone_normalization`).
        on_bad_image: ``error`` stops before training on undecodable images; ``skip`` drops them.
        pin_memory: None = on when training on a GPU.
        balance_classes: sample training images with replacement, weighted by the inverse
            frequency of their joint (DR, DME) label, so rare grades are seen as often as common
            ones (class weights in the loss are the other option: `loss.class_weights`).
        **source_options: dataset-specific keys (e.g. the synthetic set's `num_train`), passed to
            the source; an unknown key is an error naming it.
    """

    def __init__(
        self,
        source: Callable[..., DatasetSource],
        root: str,
        image_size: int = 224,
        cache_size: int | None = None,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        test_fraction: float = 0.2,
        test_split_seed: int = 0,
        seed: int = 42,
        cache_dir: str = "data/cache",
        crop_fundus: bool = True,
        ben_graham: bool = False,
        augment: dict[str, Any] | AugmentConfig | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        on_bad_image: str = "error",
        pin_memory: bool | None = None,
        balance_classes: bool = False,
        **source_options: Any,
    ) -> None:
        super().__init__()
        check_int_at_least(image_size, "data.image_size", minimum=1)
        check_int_at_least(batch_size, "data.batch_size", minimum=1)
        if num_workers != "auto":
            check_int_at_least(num_workers, "data.num_workers", minimum=0, also="auto")
        if cache_size is None:
            cache_size = default_cache_size(image_size)
        elif cache_size < image_size:
            raise ConfigurationError(
                f"data.cache_size ({cache_size}) must be >= data.image_size ({image_size}); "
                "set data.cache_size=null to derive it from the image size"
            )
        if on_bad_image not in ("error", "skip"):
            raise ConfigurationError(
                f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}"
            )
        source, test_split_seed = legacy_split_seed(source, test_split_seed)
        self.source = _make_source(source, root, source_options)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.test_fraction = check_test_fraction(test_fraction)
        self.test_split_seed = test_split_seed
        self.seed = seed
        self.preprocess = PreprocessConfig(cache_size, crop_fundus, ben_graham)
        self.cache = PreprocessedCache(cache_dir, self.preprocess)
        if isinstance(augment, AugmentConfig):
            self.augment = augment
        else:
            values = dict(augment or {})
            if "crop_scale" in values:
                values["crop_scale"] = tuple(values["crop_scale"])
            self.augment = AugmentConfig(**values)
        if mean is None or std is None:
            raise ConfigurationError(
                "data.mean and data.std must be set: leave the default "
                "(the backbone's statistics, from model.backbone) or give three values each"
            )
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.on_bad_image = on_bad_image
        self.pin_memory = pin_memory
        self.balance_classes = balance_classes
        self.splits: dict[str, list[Record]] = {}
        self.source_names: list[str] = []
        self.datasets: dict[str, FundusDataset] = {}
        self._checked: _Checked | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.source.is_synthetic

    @property
    def cached(self) -> dict[Path, Path]:
        """Source image → its preprocessed cache file (empty until the data is checked)."""
        return self._checked.cached if self._checked is not None else {}

    def input_spec(self) -> InputSpec:
        """What the network is fed: preprocessing, resize and normalisation (for checkpoints)."""
        return InputSpec(self.image_size, self.mean, self.std, self.preprocess)

    # ------------------------------------------------------------------ preparation
    def prepare_data(self) -> None:
        """Generate/check the dataset and build the cache (Lightning: once per node).

        Sets no state the other processes need (Lightning runs it in one process per node;
        `setup` runs in all); it only remembers its own result so this process does not
        check everything again in `setup` or at the next Trainer call.
        """
        self._load_checked()

    def _load_checked(self) -> _Checked:
        """The source's validated records, their cache files and the undecodable images."""
        if self._checked is None:
            # One process at a time renders/validates/caches; the others then find it done.
            with exclusive_preparation(self.cache.root):
                self._checked = self._load_checked_unlocked()
        return self._checked

    def _load_checked_unlocked(self) -> _Checked:
        # DICOM headers name the patient and eye where the source could not.
        loaded = {split: with_dicom_identity(r) for split, r in self.source.load().items()}
        validate_records(loaded, self.source.name)
        all_records = [r for records in loaded.values() for r in records]
        threads = None if self.num_workers == "auto" else self.num_workers  # None: all cores
        cached, errors = self.cache.build([r.image for r in all_records], threads)
        if errors:
            problems = list(errors.values())
            if self.on_bad_image == "error":
                raise DataValidationError.from_problems(
                    f"dataset '{self.source.name}': some images cannot be decoded",
                    problems,
                    hint="Replace or remove them, or set data.on_bad_image=skip to drop them.",
                )
            log.warning("Skipping %d undecodable image(s):\n%s", len(errors), "\n".join(problems))
        return _Checked(loaded, cached, frozenset(errors))

    def _draw_splits(self, checked: _Checked) -> dict[str, list[Record]]:
        """Test, then validation, carved out of training per source, where the source ships none.

        One function for both (`records.hold_out`). Test comes first, with its own seed, from
        every record the source lists — undecodable images included, so skipping a bad image
        never moves another image in or out of the test split; then the undecodable ones are
        dropped and validation is drawn from the training images left.
        """
        key = "data.test_fraction"
        splits = hold_out(checked.loaded, "test", self.test_fraction, self.test_split_seed, key)
        splits = {s: [r for r in rs if r.image not in checked.bad] for s, rs in splits.items()}
        return hold_out(splits, "val", self.val_fraction, self.split_seed, "data.val_fraction")

    def setup(self, stage: str | None = None) -> None:
        """Splits and datasets (every process; the records are read once per datamodule)."""
        if not self.splits:
            self.splits = self._draw_splits(self._load_checked())
            self.source_names = sorted({r.source for rs in self.splits.values() for r in rs})
            log.info("Data %s: %s", self.source.name, self.sizes())
        train_tf = build_train_transform(self.image_size, self.mean, self.std, self.augment)
        eval_tf = build_eval_transform(self.image_size, self.mean, self.std)
        for split, records in self.splits.items():
            transform = train_tf if split == "train" else eval_tf
            files = [self.cached[r.image] for r in records]
            sources = [self.source_names.index(r.source) for r in records]
            self.datasets[split] = FundusDataset(
                records, files, transform, seed=self.seed, source_ids=sources
            )

    def sizes(self) -> dict[str, int]:
        """`num_train`, `num_val`, `num_test` for summary.json."""
        return {f"num_{split}": len(records) for split, records in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, dict[int, int]]:
        """Grade histogram per task (for logs and reports)."""
        records = self.splits.get(split, [])
        return {
            "dr": dict(sorted(Counter(r.dr for r in records).items())),
            "dme": dict(sorted(Counter(r.dme for r in records).items())),
        }

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise DataValidationError(f"dataset '{self.source.name}' has no '{split}' split")
        dataset = self.datasets[split]
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        pin = self.pin_memory if self.pin_memory is not None else on_gpu
        per_node = self.trainer.num_devices if self.trainer is not None else 1
        workers = resolve_num_workers(self.num_workers, on_gpu, per_node)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler if sampler is not None else self._eval_sampler(len(dataset)),
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _eval_sampler(self, length: int) -> EvalShardSampler:
        """This rank's share of an evaluation split; every image is counted exactly once overall."""
        rank, world = self._rank()
        return EvalShardSampler(length, rank=rank, world_size=world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        dataset = self.datasets["train"]
        if self.balance_classes:
            weights = balanced_weights(self.splits["train"])
            sampler: Sampler = BalancedEpochSampler(
                dataset, weights, num_replicas=world, rank=rank, seed=self.seed
            )
        else:
            sampler = EpochSeededSampler(dataset, num_replicas=world, rank=rank, seed=self.seed)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


# Loader workers per training process on a CPU run: they feed the model far faster than it
# trains (bench/data_loading.py), and every extra one takes a core from the model's threads.
CPU_RUN_WORKERS = 2
# Beyond this a GPU's loader gains nothing and each worker still holds its own memory.
MAX_WORKERS_PER_GPU = 8


def resolve_num_workers(num_workers: int | str, on_gpu: bool, processes_per_node: int) -> int:
    """`data.num_workers=auto` → loader workers for one training process.

    On a GPU: this node's usable CPUs shared among its training processes, one core left to
    each process itself, at most `MAX_WORKERS_PER_GPU`. On a CPU: `CPU_RUN_WORKERS`.
    """
    if num_workers != "auto":
        return int(num_workers)
    if not on_gpu:
        return CPU_RUN_WORKERS
    share = usable_cpus() // max(1, processes_per_node) - 1
    return max(1, min(MAX_WORKERS_PER_GPU, share))


def balanced_weights(records: Sequence[Record]) -> list[float]:
    """Per-sample weights ∝ 1 / count of the sample's joint (DR, DME) label."""
    counts = Counter((r.dr, r.dme) for r in records)
    return [1.0 / counts[(r.dr, r.dme)] for r in records]


def _make_source(
    factory: Callable[..., DatasetSource], root: str, options: dict[str, Any]
) -> DatasetSource:
    """Build the source, turning an unknown option into an error that names the config key."""
    target = getattr(factory, "func", factory)
    accepted = inspect.signature(target).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        known = sorted(k for k in accepted if k not in ("self", "root"))
        raise ConfigurationError(
            f"unknown data key(s) {['data.' + k for k in unknown]} for "
            f"{getattr(target, '__name__', target)}; dataset-specific keys are {known}"
        )
    return factory(root=root, **options)
