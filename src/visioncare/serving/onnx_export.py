"""Writing a trained network as ONNX and safetensors, checked against PyTorch, with the
preprocessing it expects (`preprocessing.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from visioncare import TASKS
from visioncare.data.input_spec import InputSpec
from visioncare.errors import VisionCareError
from visioncare.models.net import TwoHeadNet

OPSET = 17


INPUT_NAME = "image"


OUTPUT_NAMES = [f"{task}_logits" for task in TASKS]  # dr_logits (N,5), dme_logits (N,3)


TOLERANCE = 1e-4


CHECK_BATCH_SIZES = (1, 3)


class ExportMismatchError(VisionCareError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


class TupleOutputs(nn.Module):
    """`TwoHeadNet` with a tuple of logits (DR, DME): ONNX outputs are positional, not a dict."""

    def __init__(self, net: TwoHeadNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits = self.net(image)
        return tuple(logits[task] for task in TASKS)


def _plain_net(net: TwoHeadNet) -> TwoHeadNet:
    """Eval-mode float32 net on CPU with contiguous (NCHW) weights.

    Training may leave weights in channels_last; the exporter and safetensors both want
    plain contiguous tensors, and the exported graph must not depend on the training layout.
    """
    net = net.float().cpu().eval()
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            tensor.data = tensor.data.contiguous()
    return net


def export_onnx(net: TwoHeadNet, path: Path, image_size: int) -> None:
    """ONNX (opset 17), dynamic batch axis, input `image`, outputs `dr_logits`, `dme_logits`.

    The TorchScript-based exporter (`dynamo=False`) is used: it handles every timm family we
    train and needs no onnxscript; the dynamo exporter still trips over some timm ops.
    """
    wrapper = TupleOutputs(net).eval()
    example = torch.randn(2, 3, image_size, image_size)
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=OUTPUT_NAMES,
        dynamic_axes=axes,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    import onnx

    onnx.checker.check_model(str(path))


def check_onnx(
    net: TwoHeadNet,
    path: Path,
    image_size: int,
    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> float:
    """Largest |ONNX − PyTorch| on random inputs of these batch sizes; raises above tolerance.

    The limit is `tolerance * max(1, largest |logit|)`: for ordinary logits (|z| <= 1) that is the
    plain absolute 1e-4, but float32 rounding grows with magnitude, and an untrained network with
    fresh BatchNorm statistics reaches logits of ~1e3 where exact kernels still differ by ~0.1.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    wrapper = TupleOutputs(net).eval()
    worst, scale = 0.0, 1.0
    for batch in batch_sizes:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images)]
        got = session.run(OUTPUT_NAMES, {INPUT_NAME: images.numpy()})
        for name, ref, out in zip(OUTPUT_NAMES, expected, got, strict=True):
            if out.shape != ref.shape:
                raise ExportMismatchError(
                    f"ONNX output {name} has shape {out.shape} for batch {batch}, "
                    f"PyTorch gives {ref.shape}"
                )
            worst = max(worst, float(np.abs(out - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    if not worst <= tolerance * scale:  # also catches NaN
        raise ExportMismatchError(
            f"ONNX export of {path} differs from PyTorch by {worst:.3g} (> {tolerance:g} x "
            f"{scale:.3g}, the largest |logit|) on batch sizes {list(batch_sizes)}; "
            "the exported graph is not faithful"
        )
    return worst


def save_weights(net: TwoHeadNet, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The net's state dict as safetensors (no pickle: safe to load from untrusted sources)."""
    from safetensors.torch import save_file

    state = {name: t.detach().cpu().contiguous() for name, t in net.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def preprocessing_spec(spec: InputSpec, backbone: str) -> dict[str, Any]:
    """What a serving stack must do before calling the ONNX model, and how to read its outputs."""
    return {
        **spec.as_dict(),
        "backbone": backbone,
        "input_name": INPUT_NAME,
        "output_names": OUTPUT_NAMES,
        "class_names": {
            task: [f"{task.upper()} {k}" for k in range(n)] for task, n in TASKS.items()
        },
        "onnx_opset": OPSET,
    }
