"""Export a checkpoint for serving: ONNX, safetensors weights and the preprocessing it expects.

The ONNX graph is verified against PyTorch with onnxruntime before the task reports success,
so a silently wrong export (an op lowered differently, a layout bug) fails here, not in a clinic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from visioncare.runs.model_card import FILENAME as CARD_FILENAME
from visioncare.runs.model_card import write_model_card
from visioncare.serving.loading import input_spec, load_model
from visioncare.serving.onnx_export import (
    CHECK_BATCH_SIZES,
    _plain_net,
    check_onnx,
    export_onnx,
    preprocessing_spec,
    save_weights,
)

log = logging.getLogger("visioncare")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The `export` task: checkpoint → model.onnx, model.safetensors, preprocessing.json."""
    model, config = load_model(cfg.ckpt_path, device="cpu")
    spec = input_spec(model)
    backbone = str(model.hparams.get("backbone", config.get("model", {}).get("backbone", "")))
    out_dir = Path(cfg.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    net = _plain_net(model.net)

    onnx_path = out_dir / "model.onnx"
    export_onnx(net, onnx_path, spec.image_size)
    worst = check_onnx(net, onnx_path, spec.image_size, tolerance=float(cfg.get("tolerance", 1e-4)))
    message = f"ONNX vs PyTorch: max abs difference {worst:.3g} (batch sizes {CHECK_BATCH_SIZES})"
    log.info(message)  # Hydra's console handler prints it; the run's export.log keeps it

    save_weights(net, out_dir / "model.safetensors", {"backbone": backbone, "format": "pt"})
    info = preprocessing_spec(spec, backbone)
    # The referral thresholds chosen on validation travel with the model they were chosen for.
    info["operating_points"] = model.operating_points
    # So are the calibration temperatures: the ONNX path applies them to its softmax.
    info["temperatures"] = model.temperatures
    (out_dir / "preprocessing.json").write_text(json.dumps(info, indent=2) + "\n")
    # The model card beside the model, from the training run's records (summary.json there).
    run_dir = Path(cfg.ckpt_path).expanduser().resolve().parents[1]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if not summary:
        log.warning("%s not found: the model card lacks the run's metrics", summary_path)
    write_model_card(out_dir / CARD_FILENAME, summary, config, run_dir, model.operating_points)
    log.info("Exported to %s", out_dir)
    return {"output_dir": str(out_dir), "onnx_max_abs_diff": worst}
