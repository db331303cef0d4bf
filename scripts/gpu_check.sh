#!/usr/bin/env bash
# GPU check: a bf16-mixed + torch.compile training smoke run, then the benchmark, on
# whatever CUDA GPU this machine has. Writes to $OUT (default ./gpu_out).
#   CORPUS=path/to/texts bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
CORPUS=${CORPUS:-classics}
export ESCARDA_CACHE=${ESCARDA_CACHE:-/tmp/escarda_cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"

echo "== smoke: escarda.yaml, 200 steps, precision/compile auto (bf16-mixed + compile on a GPU)"
start=$(date +%s)
$PY -m escarda_lab.run experiments/escarda.yaml name=gpu_smoke data.corpus="$CORPUS" \
    output.dir="$OUT/runs" train.max_steps=200 train.val_every=100
echo "smoke wall $(( $(date +%s) - start )) s"
cp "$OUT/runs/gpu_smoke/seed0/metrics.json" "$OUT/smoke_metrics.json" 2>/dev/null

SHAPE="model.d_model=256 model.n_layers=6 model.n_heads=8 model.ffn_hidden=704 data.batch_size=64 data.seq_len=256"
echo "== bench: vanilla vs escarda at d_model 256 / 6 layers, 64 x 256 tokens/step, eager and compiled"
$PY -m escarda_lab.bench experiments/escarda.yaml $SHAPE data.corpus="$CORPUS" \
    --steps 30 --rounds 1 --warmup 10 --compile both --json | tee "$OUT/bench.txt"

echo "== bench: the released 86M shape (T = 2048), vanilla vs the full set, compiled bf16"
$PY -m escarda_lab.bench experiments/escarda_86m.yaml data.corpus="$CORPUS" data.batch_size=8 data.seq_len=2048 \
    --no-alone --steps 12 --rounds 1 --warmup 4 --json | tee "$OUT/bench_86m.txt"

echo "== grid runs/hour on this GPU: leave_one_out (one seed, 300 steps) one run at a time, then 4 per GPU"
for k in 1 4; do
  $PY -m escarda_lab.run experiments/leave_one_out.yaml data.corpus="$CORPUS" "grid.seeds=[0]" \
      train.max_steps=300 grid.per_gpu=$k output.dir="$OUT/grid_per_gpu$k" 2>&1 | grep -E "runs/hour|runs finished" \
      | tee -a "$OUT/grid_runs_per_hour.txt"
done
