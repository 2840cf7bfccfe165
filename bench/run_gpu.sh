#!/usr/bin/env bash
# The GPU benchmark: photo-12mp and photo-vga with ResNet-50 on the first CUDA GPU, ours against
# the stock-style baselines, with the share of time the GPU was busy; then the GPU unit tests.
#   bench/run_gpu.sh [OUT_DIR]        (default bench/results/gpu; needs torch with CUDA, Pillow,
#                                       numpy, scikit-learn, nvidia-ml-py, and TorchServe's ts)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu}"
mkdir -p "$out"
python="${PYTHON:-python3}"
# Where TorchServe itself is not installed, a copy of its (stdlib-only) MicroBatching will do.
[ -d .tsmin ] && export PYTHONPATH="$PWD/.tsmin${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
"$python" -c "import os, torch; print('torch', torch.__version__, '| cpu cores', len(os.sched_getaffinity(0)))" | tee -a "$out/device.txt"

"$python" -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py 2>&1 | tee "$out/tests.txt"

# Sizing strategies (static whole batch, static 8, dynamic) beside ours (adaptive), and ours in
# bfloat16 with channels-last memory.
variants=(--variant ours-whole '{"micro_batch_strategy": "static"}'
          --variant ours-static-8 '{"micro_batch_strategy": "static", "micro_batch_size": 8}'
          --variant ours-dynamic '{"micro_batch_strategy": "dynamic"}'
          --variant ours-bf16-channels-last '{"precision": "bfloat16", "channels_last": true}')
# Three unmeasured rounds: adaptive sizing skips the first batch, then tries two sizes.
"$python" -m bench.inprocess --workloads photo-12mp photo-vga --model resnet50 --device cuda \
    --rounds 5 --warmup 3 "${variants[@]}" --out "$out" --name inprocess
# A GPU takes far larger batches than a 2-core CPU: vga at 64 as well.
"$python" -m bench.inprocess --workloads photo-vga --model resnet50 --device cuda --batch-size 64 \
    --rounds 5 --warmup 3 "${variants[@]}" --out "$out" --name inprocess_vga64
