#!/usr/bin/env bash
# The GPU path through the real entry points, in one short run:
#   train (trainer=gpu), train (trainer=ddp trainer.devices=1), eval, predict with Grad-CAM,
#   export + ONNX predict, and EfficientNetV2-S AMP vs fp32 training steps (synchronised timing).
# Prints a PASS/FAIL table and exits 1 if any check failed.
#
#   bench/gpu_check.sh [WORK_DIR]        # PYTHON=... to choose the interpreter (default python3)
#
# Everything is written under WORK_DIR (default: a fresh temporary folder); nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d -t visioncare-gpu-XXXXXX)}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
declare -a NAMES=() RESULTS=() NOTES=()

record() {  # name, status (0 = pass), note
    NAMES+=("$1"); RESULTS+=("$([ "$2" -eq 0 ] && echo PASS || echo FAIL)"); NOTES+=("$3")
}

step() {  # name, limit in seconds, command...: runs it, logs to WORK/<name>.log, records the result
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local status=$?
    local note="$((SECONDS - start)) s"
    [ $status -eq 124 ] && note="timed out after $limit s"
    [ $status -ne 0 ] && note="$note, exit $status, see $WORK/$name.log"
    record "$name" $status "$note"
    return $status
}


DATA=(data.root="$WORK/synthetic" paths.cache_dir="$WORK/cache" paths.log_dir="$WORK/logs"
      data.num_train=96 data.num_test=24 data.render_size=320 data.image_size=224
      data.cache_size=256 logger=csv gradcam_images=2 unfreeze_step=1)

step cuda 60 "$PYTHON" -c "
import torch
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
      'bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'no bf16')
"

# 1. One GPU; precision=auto must resolve to bf16-mixed on Ampere and newer.
if step train_gpu 180 "$PYTHON" src/train.py trainer=gpu model=effv2s trainer.max_epochs=4 \
        "${DATA[@]}" hydra.run.dir="$WORK/logs/train/runs/gpu"; then
    RUN="$WORK/logs/train/runs/gpu"
    "$PYTHON" - "$RUN" >"$WORK/train_gpu_files.log" 2>&1 <<'EOF'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = list(csv.DictReader(open(run / "metrics.csv")))
summary = json.loads((run / "summary.json").read_text())
assert len(rows) == 4, rows
assert (run / "checkpoints" / "best.ckpt").is_file()
assert summary["best"]["val/num_dr"] == summary["data"]["num_val"]
assert any((run / "plots" / "gradcam").iterdir())
assert float(rows[-1]["memory/gpu_peak_mb"]) > 0
print("val/avg_acc", summary["best"]["val/avg_acc"], "epoch_s", rows[-1]["time/epoch_s"],
      "trainer", summary["trainer"])
EOF
    record train_gpu_files $? "$(tail -n 1 "$WORK/train_gpu_files.log")"
    grep -q "Precision: bf16-mixed" "$WORK/train_gpu.log"
    record precision_auto_bf16 $? "$(grep -o 'Precision: [^ ]*' "$WORK/train_gpu.log" | head -n 1)"
fi

# 2. DDP on one GPU (SyncBN through timm's conversion, NCCL, one run directory).
step train_ddp 180 "$PYTHON" src/train.py trainer=ddp trainer.devices=1 model=effv2s \
    trainer.max_epochs=2 "${DATA[@]}" hydra.run.dir="$WORK/logs/train/runs/ddp"
[ -f "$WORK/logs/train/runs/ddp/summary.json" ]
record train_ddp_summary $? "$WORK/logs/train/runs/ddp/summary.json"

BEST="$WORK/logs/train/runs/gpu/checkpoints/best.ckpt"
if [ -f "$BEST" ]; then
    step eval 120 "$PYTHON" src/eval.py ckpt_path="$BEST" paths.log_dir="$WORK/logs" \
        hydra.run.dir="$WORK/logs/eval"
    step predict_gradcam 120 "$PYTHON" src/predict.py ckpt_path="$BEST" \
        input="$WORK/synthetic/B. Disease Grading/1. Original Images/b. Testing Set" \
        output="$WORK/predictions.csv" explain=true device=cuda paths.log_dir="$WORK/logs" \
        hydra.run.dir="$WORK/logs/predict"
    step export 120 "$PYTHON" src/export.py ckpt_path="$BEST" output_dir="$WORK/exported" \
        paths.log_dir="$WORK/logs" hydra.run.dir="$WORK/logs/export"
    step predict_onnx 120 "$PYTHON" src/predict.py ckpt_path="$WORK/exported/model.onnx" \
        input="$WORK/synthetic/B. Disease Grading/1. Original Images/b. Testing Set" \
        output="$WORK/predictions_onnx.csv" paths.log_dir="$WORK/logs" \
        hydra.run.dir="$WORK/logs/predict_onnx"
fi

# 3. AMP vs fp32: EfficientNetV2-S training steps, 224 and 384 px, synchronised timing.
step amp_vs_fp32 180 "$PYTHON" - <<'EOF'
import time
import timm
import torch

torch.backends.cudnn.benchmark = True
for size, batch in ((224, 64), (384, 32)):
    speeds = {}
    for mode in ("fp32", "bf16"):
        net = timm.create_model("tf_efficientnetv2_s", num_classes=5).cuda()
        net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (batch,), device="cuda")
        for step in range(25):
            if step == 5:  # warm-up (cuDNN autotuning) left out
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=mode == "bf16"):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        speeds[mode] = 20 * batch / (time.perf_counter() - start)
    ratio = speeds["bf16"] / speeds["fp32"]
    print(f"{size} px b{batch}: fp32 {speeds['fp32']:.0f} img/s, bf16 {speeds['bf16']:.0f} img/s,"
          f" AMP / fp32 {ratio:.2f}x")
    assert ratio > 1.0, "bf16 autocast is not faster than fp32"
EOF

printf '\n%-22s %-6s %s\n' check result note
printf '%-22s %-6s %s\n' ---------------------- ------ ----
failed=0
for i in "${!NAMES[@]}"; do
    printf '%-22s %-6s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${NOTES[$i]}"
    [ "${RESULTS[$i]}" = PASS ] || failed=1
done
echo
grep -h "img/s" "$WORK/amp_vs_fp32.log" 2>/dev/null
echo "logs: $WORK"
exit $failed
