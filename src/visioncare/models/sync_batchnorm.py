"""SyncBatchNorm that keeps timm's fused norm + activation layers intact.

timm backbones (EfficientNet, EfficientNetV2, …) use `BatchNormAct2d`, a BatchNorm whose forward
also applies the activation. Torch's `SyncBatchNorm.convert_sync_batchnorm` (what Lightning's
`sync_batchnorm=True` runs) turns it into a plain `SyncBatchNorm` whose forward never calls that
activation: EfficientNetV2-S loses 72 SiLUs and computes a different function from the network
eval/predict/export rebuild. timm's own `convert_sync_batchnorm` makes `SyncBatchNormAct` instead.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch.nn import Module


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning `LayerSync` plugin: timm's SyncBatchNorm conversion, and its exact inverse.

    `training.build_trainer` uses it whenever `trainer.sync_batchnorm=true`.
    """

    def apply(self, model: Module) -> Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: Module) -> Module:
        """Back to `BatchNormAct2d` (activation and drop kept) and plain BatchNorm, same tensors."""
        if not isinstance(model, SyncBatchNormAct):
            # Torch's revert handles plain SyncBatchNorm and recurses through `self.revert`.
            return super().revert(model)
        reverted = BatchNormAct2d(
            model.num_features,
            eps=model.eps,
            momentum=model.momentum,
            affine=model.affine,
            track_running_stats=model.track_running_stats,
        )
        reverted.act, reverted.drop = model.act, model.drop
        if model.affine:
            with torch.no_grad():
                reverted.weight, reverted.bias = model.weight, model.bias
        reverted.running_mean = model.running_mean
        reverted.running_var = model.running_var
        reverted.num_batches_tracked = model.num_batches_tracked
        reverted.train(model.training)
        return reverted
