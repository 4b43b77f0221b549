#!/usr/bin/env bash
# The whole GPU check in one run, for a session lent a GPU (15 minutes of device time in all; keep
# room for a rerun). From the repository root on the GPU machine:
#     bash bench/gpu_checks.sh            # writes JSON and logs to $OUT (the device tool's folder)
# It needs no install: the GPU machine has torch, transformers, peft and accelerate but no `datasets`,
# which none of these scripts import.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" | tee -a "$OUT/gpu.txt"
# Issue 8: HF end to end vs the trainer's last stage (recompute / cache / LoRA) at 8, 16, 32 blocks.
timeout 330 python bench/gpu_suite.py --json "$OUT/gpu_suite.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_suite.log"
# Issue 9: one real step of the 70B-shaped rack's last stage vs the planner, then the planner check.
timeout 200 python bench/gpu_70b_step.py --json "$OUT/gpu_70b_step.json" 2>&1 | tee "$OUT/gpu_70b_step.log"
timeout 150 python bench/planner_check.py --scale 4 --json "$OUT/planner_check.json" 2>&1 | tee "$OUT/planner_check.log"
