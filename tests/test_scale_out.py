"""The parts of multi-process and GPU training that can be checked on one CPU: SyncBN, RNG state,
evaluation shards, data preparation across processes, GPU precision choices."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct

from visioncare.data.dataset import EvalShardSampler
from visioncare.data.preparation_lock import exclusive_preparation
from visioncare.data.synthetic import writer as synthetic_writer
from visioncare.models.net import TwoHeadNet
from visioncare.models.sync_batchnorm import TimmSyncBatchNorm
from visioncare.runs.trainer import build_trainer
from visioncare.utils import accelerator
from visioncare.utils.rng import capture_rng_state, restore_rng_state


# ------------------------------------------------------------------------------ SyncBatchNorm
def _outputs(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = net.eval()(images)
    return torch.cat([logits["dr"], logits["dme"]], dim=1)


def _with_trained_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, as after training (fresh ones hide a missing activation less)."""
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return net


def test_sync_batchnorm_keeps_timm_activations_in_eval_mode():
    torch.manual_seed(0)
    net = _with_trained_statistics(TwoHeadNet("test_efficientnet", dropout=0.0))
    images = torch.randn(2, 3, 64, 64)
    expected = _outputs(net, images)
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())

    converted = TimmSyncBatchNorm().apply(net)
    assert any(isinstance(m, SyncBatchNormAct) for m in converted.modules())
    torch.testing.assert_close(_outputs(converted, images), expected)
    # Torch's own conversion (Lightning's `sync_batchnorm=True`) drops the activations.
    broken = TorchSyncBatchNorm().apply(TimmSyncBatchNorm().revert(converted))
    assert not torch.allclose(_outputs(broken, images), expected, atol=1e-3)


def test_sync_batchnorm_revert_restores_timm_layers_with_the_same_tensors():
    torch.manual_seed(0)
    net = _with_trained_statistics(TwoHeadNet("test_efficientnet", dropout=0.0))
    images = torch.randn(2, 3, 64, 64)
    expected = _outputs(net, images)
    plugin = TimmSyncBatchNorm()
    reverted = plugin.revert(plugin.apply(net))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
    assert sum(isinstance(m, BatchNormAct2d) for m in reverted.modules()) > 0
    torch.testing.assert_close(_outputs(reverted, images), expected)
    assert set(reverted.state_dict()) == set(net.state_dict())


def test_trainer_sync_batchnorm_uses_timms_conversion(make_cfg):
    cfg = make_cfg("trainer=ddp_cpu", "trainer.sync_batchnorm=true", "logger=none")
    accelerator.resolve_trainer_flags(cfg)
    trainer = build_trainer(cfg.trainer, callbacks=[], loggers=[])
    assert isinstance(trainer.strategy._layer_sync, TimmSyncBatchNorm)
    plain_cfg = make_cfg("trainer=ddp_cpu", "logger=none")
    accelerator.resolve_trainer_flags(plain_cfg)
    plain = build_trainer(plain_cfg.trainer, [], [])
    assert plain.strategy._layer_sync is None


# ------------------------------------------------------------------------------ RNG state
class _FakeCuda:
    """One visible GPU: setting a generator of any other device index fails, as torch does."""

    def __init__(self) -> None:
        self.set: dict[int, torch.Tensor] = {}

    def set_rng_state(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        index = 0 if device == "cuda" else int(device)
        if index >= 1:
            raise IndexError(f"CUDA device {index} does not exist")
        self.set[index] = state


@pytest.fixture
def one_gpu(monkeypatch) -> _FakeCuda:
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7))
    return fake


def test_checkpoint_of_eight_gpus_resumes_on_one(one_gpu, tmp_path):
    """A checkpoint written on an 8-GPU machine (one CUDA state per visible GPU) resumes on 1."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    path = tmp_path / "eight_gpus.ckpt"
    torch.save({"visioncare_rng": {"torch": torch.get_rng_state(), "cuda": states}}, path)
    rng = torch.load(path, weights_only=True)["visioncare_rng"]
    restore_rng_state(rng)
    assert list(one_gpu.set) == [0]
    assert torch.equal(one_gpu.set[0], states[0])


def test_rng_state_holds_this_process_device_only(one_gpu):
    state = capture_rng_state()
    assert torch.equal(state["cuda"], torch.full((16,), 7))  # one tensor, not a list per GPU
    restore_rng_state(state)
    assert torch.equal(one_gpu.set[0], state["cuda"])


def test_rng_state_on_cpu_has_no_cuda_part():
    state = capture_rng_state()
    assert state["cuda"] is None
    expected = torch.rand(3)
    restore_rng_state(state)
    torch.testing.assert_close(torch.rand(3), expected)


# ------------------------------------------------------------------------------ eval shards
@pytest.mark.parametrize(("length", "world"), [(1, 2), (3, 2), (5, 4), (8, 2), (2, 8), (0, 2)])
def test_eval_shards_are_equal_and_count_each_image_once(length, world):
    shards = [list(EvalShardSampler(length, rank, world)) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # the same number of steps on every rank
    real = sorted(index for shard in shards for _, index, padding in shard if not padding)
    assert real == list(range(length))
    assert all(len(shard) == len(EvalShardSampler(length, 0, world)) for shard in shards)


def test_padding_samples_are_ungraded(make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg()
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.datasets["val"]
    real, padded = dataset[(0, 0, False)], dataset[(0, 0, True)]
    assert real["dr"] >= 0 and not real["padding"]
    assert padded["dr"] == -1 and padded["dme"] == -1 and padded["padding"]
    torch.testing.assert_close(real["image"], padded["image"])


# ------------------------------------------------------------------------------ data preparation
def test_preparation_lock_lets_one_process_work_at_a_time(tmp_path):
    inside, overlaps = [], []

    def prepare() -> None:
        with exclusive_preparation(tmp_path):
            overlaps.append(len(inside))
            inside.append(1)
            time.sleep(0.2)
            inside.pop()

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [0, 0, 0]


def test_stale_cleanup_spares_other_hosts_builds(tmp_path, monkeypatch):
    """A dead process id of this host is stale; the same id on another node may be rendering."""
    monkeypatch.setattr(synthetic_writer.socket, "gethostname", lambda: "node-a")
    root = tmp_path / "set"
    dead = 2**22 + 12345  # above the default pid_max: no such process here
    ours = tmp_path / f".set.tmp-node-a-{dead}"
    other_node = tmp_path / f".set.tmp-node-b-{dead}"
    legacy = tmp_path / f".set.tmp-{dead}"
    alive = tmp_path / f".set.tmp-node-a-{os.getpid()}"
    for folder in (ours, other_node, legacy, alive):
        folder.mkdir()
    synthetic_writer._remove_stale_temp_dirs(root)
    assert not ours.exists()
    assert other_node.exists() and legacy.exists() and alive.exists()


# ------------------------------------------------------------------------------ GPU precision
def test_precision_auto_prefers_bf16_on_gpus_that_have_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert accelerator.resolve_precision("auto", "gpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert accelerator.resolve_precision("auto", "gpu") == "16-mixed"  # pre-Ampere
    assert accelerator.resolve_precision("32-true", "gpu") == "32-true"


def test_tf32_only_for_full_precision_on_ampere_and_newer(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert accelerator.enable_tf32("32-true", "gpu") and calls == ["high"]
    assert not accelerator.enable_tf32("bf16-mixed", "gpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not accelerator.enable_tf32("32-true", "gpu")
    assert not accelerator.enable_tf32("32-true", "cpu")
    assert calls == ["high"]


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_compile_waits_for_the_last_unfreezing_stage():
    """Compiled before the last stage, each stage's requires_grad flip would recompile."""
    from visioncare.models.module import VisionCareModule

    module = VisionCareModule("test_efficientnet", compile=True)
    for parameter in module.net.backbone.parameters():
        parameter.requires_grad_(False)
    assert not module.maybe_compile()  # stage 0: heads only
    for parameter in module.net.parameters():
        parameter.requires_grad_(True)
    assert module.maybe_compile()  # last stage: compiled once
    assert not module.maybe_compile()
    assert set(module.state_dict()) == set(VisionCareModule("test_efficientnet").state_dict())


# ------------------------------------------------------------------------------ loader workers
def test_auto_workers_follow_the_cpus_per_gpu(monkeypatch):
    from visioncare.data import datamodule

    monkeypatch.setattr(datamodule, "usable_cpus", lambda: 32)
    assert datamodule.resolve_num_workers("auto", on_gpu=True, processes_per_node=8) == 3
    assert datamodule.resolve_num_workers("auto", on_gpu=True, processes_per_node=1) == 8
    monkeypatch.setattr(datamodule, "usable_cpus", lambda: 2)
    assert datamodule.resolve_num_workers("auto", on_gpu=True, processes_per_node=4) == 1
    assert datamodule.resolve_num_workers("auto", on_gpu=False, processes_per_node=1) == 2
    assert datamodule.resolve_num_workers(5, on_gpu=True, processes_per_node=1) == 5


def test_bad_num_workers_names_the_key(make_cfg):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    # Hydra wraps the ConfigurationError; the entry points print its message as `ERROR: ...`.
    with pytest.raises(
        InstantiationException,
        match=r"data\.num_workers='many' is not allowed; use an integer >= 0 or auto",
    ):
        instantiate(make_cfg("data.num_workers=many").data)
