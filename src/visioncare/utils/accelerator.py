"""Choose the Trainer's speed settings for the machine at hand: precision and cudnn.benchmark.

`trainer.precision=auto`: mixed precision is a large win where the hardware does the
low-precision math natively: tensor cores on GPUs, AVX-512 BF16/AMX on recent x86 CPUs (about
1.9x on EfficientNetV2-S). On a CPU without them, bf16 is emulated and trains an order of magnitude
*slower* than fp32 (measured on an AVX2-only 2-core EPYC, EfficientNetV2-S training at 224 px:
0.15 img/s in bf16 against 3-5 img/s in fp32), so `auto` picks fp32 there.

On a GPU `auto` prefers bf16 (Ampere and newer): fp32's exponent range, so no GradScaler, no
skipped steps and no fp16 overflow of the logits; older GPUs get 16-mixed. A `32-true` run on an
Ampere+ GPU computes its matmuls in TF32 (`enable_tf32`).

`trainer.benchmark=null`: cuDNN's autotuner on GPUs (see `resolve_benchmark`).

Both are resolved once, at the start of a run, into the config itself (`resolve_trainer_flags`):
`instantiate(cfg.trainer)` then builds the Trainer that runs, and the stored config, the
TensorBoard hparams and summary.json record the values that ran, not `auto`.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, open_dict

from visioncare.errors import ConfigurationError

log = logging.getLogger("visioncare")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX-512 BF16 or AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(cpuinfo.read_text(errors="ignore").split())
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice lands on a CUDA device."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_accelerator(accelerator: Any) -> None:
    """A `ConfigurationError` naming `trainer.accelerator` for a name Lightning does not know, or
    for a GPU asked for on a machine without one, before any data is read.

    Lightning reports both only when the Trainer is built, as a plain ValueError/
    MisconfigurationException; asking its registry keeps the list of names its own.
    """
    if not isinstance(accelerator, str):
        return  # an Accelerator object: Lightning checks it
    names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if accelerator not in names:
        raise ConfigurationError(
            f"trainer.accelerator={accelerator} is not an accelerator Lightning knows; "
            f"use one of {', '.join(names)} (auto picks a GPU when there is one)"
        )
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    # Lightning's `gpu` means CUDA, or Apple's MPS where there is no CUDA.
    missing = (accelerator == "cuda" and not cuda) or (accelerator == "mps" and not mps)
    if missing or (accelerator == "gpu" and not (cuda or mps)):
        raise ConfigurationError(
            f"trainer.accelerator={accelerator} but PyTorch sees no such GPU on this machine; "
            "use trainer.accelerator=auto (or cpu), or check the driver and CUDA_VISIBLE_DEVICES"
        )


def gpu_has_bf16() -> bool:
    """True when this process's GPU computes bf16 natively (compute capability 8.0+)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto` → bf16-mixed on bf16 GPUs (16-mixed on older ones), bf16-mixed on CPUs with native
    bf16, else 32-true.

    Explicit values pass through; half precision on a CPU without native bf16 gets a warning.
    """
    on_gpu = uses_gpu(accelerator)
    if str(precision) == "auto":
        if on_gpu:
            return "bf16-mixed" if gpu_has_bf16() else "16-mixed"
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    if (
        not on_gpu
        and str(precision) in ("16-mixed", "bf16-mixed", "bf16", "16")
        and not cpu_has_native_bf16()
    ):
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (no AVX-512 BF16/AMX) is emulated "
            "and much slower than fp32; use trainer.precision=auto or 32-true",
            precision,
        )
    return precision


def enable_tf32(precision: str | int, accelerator: str) -> bool:
    """TF32 matmuls for a full-precision run on an Ampere+ GPU; returns whether it was enabled.

    PyTorch leaves matmuls in strict fp32 by default (convolutions already use TF32); TF32 keeps
    fp32's range with a 10-bit mantissa, several times faster on tensor cores.
    """
    if not (uses_gpu(accelerator) and torch.cuda.is_available()):
        return False
    if str(precision) not in ("32-true", "32") or torch.cuda.get_device_capability() < (8, 0):
        return False
    torch.set_float32_matmul_precision("high")
    return True


def resolve_benchmark(benchmark: bool | None, accelerator: str, deterministic: Any) -> bool | None:
    """`trainer.benchmark=null` → True on a GPU unless the run is deterministic.

    VisionCare's inputs have one fixed size (`data.image_size`), the case where cuDNN's autotuner
    pays for itself after the first steps. Lightning's own default for null leaves it off.
    """
    if benchmark is None and uses_gpu(accelerator) and not deterministic:
        return True
    return benchmark


def resolve_trainer_flags(cfg: DictConfig) -> dict[str, Any]:
    """Write Lightning's own values for `trainer.precision` and `trainer.benchmark` into ``cfg``.

    `auto` and null are VisionCare's choices (`resolve_precision`, `resolve_benchmark`); a null
    benchmark left to Lightning is written as what Lightning does with it (off when
    deterministic, else torch's current setting). Explicit values pass through, so resolving
    twice changes nothing. Returns `trainer_flags(cfg)`.
    """
    trainer = cfg.trainer
    accelerator = trainer.get("accelerator", "auto")
    check_accelerator(accelerator)
    deterministic = trainer.get("deterministic")
    requested = trainer.get("precision", "auto")
    precision = resolve_precision(requested, accelerator)
    benchmark = resolve_benchmark(trainer.get("benchmark"), accelerator, deterministic)
    if benchmark is None:
        benchmark = False if deterministic else bool(torch.backends.cudnn.benchmark)
    with open_dict(trainer):
        trainer.precision = precision
        trainer.benchmark = benchmark
    log.info(
        "Precision: %s (trainer.precision=%s), cudnn.benchmark: %s", precision, requested, benchmark
    )
    return trainer_flags(cfg)


def trainer_flags(cfg: DictConfig) -> dict[str, Any]:
    """The resolved speed flags of ``cfg.trainer``, for summary.json."""
    return {key: cfg.trainer.get(key) for key in ("precision", "benchmark")}
