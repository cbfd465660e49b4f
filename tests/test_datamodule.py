"""FundusDataModule: validation before training, the cache, and reproducible augmentation."""

from __future__ import annotations

import csv
from collections import Counter
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.conftest import CONF
from tests.test_idrid import make_idrid
from visioncare.callbacks.epoch_stats import EpochMetricsCSV
from visioncare.data.datamodule import FundusDataModule
from visioncare.data.dataset import EpochSeededSampler
from visioncare.data.sources.idrid import IDRiDSource
from visioncare.errors import ConfigurationError, DataValidationError

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _rows(n: int) -> list[tuple[str, str, str]]:
    return [(f"IDRiD_{i:03d}", str(i % 5), str(0 if i % 5 < 2 else i % 3)) for i in range(1, n + 1)]


def _module(root, cache, **kwargs) -> FundusDataModule:
    options = {"image_size": 32, "cache_size": 40, "batch_size": 4, "num_workers": 0}
    options.update(kwargs)
    return FundusDataModule(IDRiDSource, root=str(root), cache_dir=str(cache), **NORM, **options)


def test_setup_splits_and_loads_batches(tmp_path):
    make_idrid(tmp_path / "idrid", _rows(20), _rows(5))
    dm = _module(tmp_path / "idrid", tmp_path / "cache", val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.sizes() == {"num_train": 15, "num_val": 5, "num_test": 5}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert set(batch) == {"image", "dr", "dme", "source", "index", "padding"}


def test_missing_and_corrupt_images_are_reported_together(tmp_path):
    root = make_idrid(tmp_path / "idrid", _rows(6), _rows(2))
    images = root / "B. Disease Grading" / "1. Original Images" / "a. Training Set"
    (images / "IDRiD_002.jpg").unlink()
    (images / "IDRiD_003.jpg").write_bytes(b"not a jpeg at all")
    dm = _module(root, tmp_path / "cache")
    with pytest.raises(DataValidationError, match=r"IDRiD_002.*image file not found"):
        dm.prepare_data()
    (images / "IDRiD_002.jpg").write_bytes((images / "IDRiD_001.jpg").read_bytes())
    with pytest.raises(DataValidationError, match=r"IDRiD_003\.jpg is not a decodable image"):
        _module(root, tmp_path / "cache").prepare_data()
    skipping = _module(root, tmp_path / "cache", on_bad_image="skip")
    skipping.prepare_data()
    skipping.setup("fit")
    assert sum(len(v) for k, v in skipping.splits.items() if k != "test") == 5


def test_cache_is_reused_and_rebuilt_when_parameters_change(tmp_path):
    root = make_idrid(tmp_path / "idrid", _rows(4), _rows(1))
    first = _module(root, tmp_path / "cache")
    first.prepare_data()
    files = sorted(first.cache.folder.rglob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    second = _module(root, tmp_path / "cache")
    second.prepare_data()
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not rewritten
    bigger = _module(root, tmp_path / "cache", cache_size=48)
    bigger.prepare_data()
    assert bigger.cache.folder != first.cache.folder
    assert np.load(next(bigger.cache.folder.rglob("*.npy"))).shape == (48, 48, 3)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = make_idrid(tmp_path / "idrid", _rows(8), _rows(1))
    dm = _module(root, tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.datasets["train"]
    a, b = dataset[(3, 2)]["image"], dataset[(3, 2)]["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, dataset[(4, 2)]["image"])


def test_sampler_order_is_reproducible_and_sharded():
    sampler = EpochSeededSampler(range(10), num_replicas=1, rank=0, seed=1)
    sampler.set_epoch(2)
    first = list(sampler)
    assert first == list(sampler) and sorted(i for _, i in first) == list(range(10))
    assert all(epoch == 2 for epoch, _ in first)
    sampler.set_epoch(3)
    assert [i for _, i in sampler] != [i for _, i in first]
    shards = [list(EpochSeededSampler(range(10), num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert {len(s) for s in shards} == {4}  # equal length on every rank
    assert {i for shard in shards for _, i in shard} == set(range(10))
    # torch shuffles with seed + epoch: neighbouring run seeds must not replay each other.
    later = EpochSeededSampler(range(50), seed=0)
    later.set_epoch(1)
    assert list(EpochSeededSampler(range(50), seed=1)) != [(0, i) for _, i in later]


def test_metrics_csv_keeps_earlier_rows_when_resuming_mid_epoch(tmp_path):
    """A resume inside epoch 2 (no epoch start hook) keeps rows 0-1 and replaces row 2."""
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,val/avg_acc\n0,0.5\n1,0.6\n2,0.1\n")
    csv_cb = EpochMetricsCSV(str(path))
    trainer = SimpleNamespace(
        current_epoch=2, callback_metrics={"val/avg_acc": torch.tensor(0.75)},
        optimizers=[SimpleNamespace(param_groups=[{"lr": 0.01}])], is_global_zero=True,
    )  # fmt: skip
    csv_cb.on_train_start(trainer, None)
    csv_cb.on_train_batch_start(trainer, None, None, 5)
    csv_cb.on_train_epoch_end(trainer, None)
    rows = list(csv.DictReader(path.open()))
    assert [(r["epoch"], r["val/avg_acc"]) for r in rows] == [
        ("0", "0.5"),
        ("1", "0.6"),
        ("2", "0.75"),
    ]
    assert rows[2]["lr"] == "0.01"


def test_unknown_data_key_is_named(tmp_path):
    with pytest.raises(ConfigurationError, match=r"data.num_trian"):
        FundusDataModule(partial(IDRiDSource), root=str(tmp_path), num_trian=3)


def test_balanced_sampling_evens_out_rare_grades(tmp_path):
    rows = [(f"IDRiD_{i:03d}", "0", "0") for i in range(1, 19)]
    rows += [("IDRiD_019", "4", "2"), ("IDRiD_020", "4", "2")]
    root = make_idrid(tmp_path / "idrid", rows, _rows(1))
    dm = _module(root, tmp_path / "cache", balance_classes=True, val_fraction=0.0)
    dm.prepare_data()
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    drawn = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn.update(dm.splits["train"][i].dr for _, i in sampler)
    # 2 of 20 images are DR 4, yet about half of the draws are.
    assert 0.35 < drawn[4] / sum(drawn.values()) < 0.65


def test_image_size_alone_derives_the_cache_size(make_cfg, tmp_path):
    # The shipped configs and presets leave data.cache_size null: a new resolution is one key...
    for overrides in (["data=synthetic"], ["data=idrid"], ["experiment=idrid_effv2s"]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            assert compose("train", overrides=overrides).data.cache_size is None
    GlobalHydra.instance().clear()
    cfg = make_cfg("data.image_size=224", "data.cache_size=null")
    assert instantiate(cfg.data).preprocess.size == 256
    cfg = make_cfg("data.image_size=300", "data.cache_size=null")
    assert instantiate(cfg.data).preprocess.size == 352  # 300 * 9/8 = 337.5, up to 16 px
    # ...and only an explicit contradiction is refused, naming the way out.
    with pytest.raises(ConfigurationError, match=r"data.cache_size \(100\).*cache_size=null"):
        _module(tmp_path / "absent", tmp_path / "cache", image_size=224, cache_size=100)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("batch_size", 0, ">= 1"), ("num_workers", -1, ">= 0"), ("image_size", 0, ">= 1")],
)
def test_loader_sizes_are_checked_before_any_data_is_read(tmp_path, key, value, allowed):
    with pytest.raises(ConfigurationError, match=f"data.{key}={value} .*{allowed}"):
        _module(tmp_path / "absent", tmp_path / "cache", **{key: value})
