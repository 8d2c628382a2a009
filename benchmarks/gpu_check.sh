#!/usr/bin/env bash
# The CUDA path of the throughput benchmark as one prepared run for a lent GPU (issue 17):
# fedssl's client step as a client runs it on CUDA (each batch pinned and copied without
# blocking, augmentation on the GPU, bf16 autocast) against lightly's DataLoader pipeline and
# the model-only limit, resnet10 and resnet18, BYOL, at 32, 96 and 224 px, on 5,000
# generated 224-px JPEGs decoded through the image cache at each size.
#
#   bash benchmarks/gpu_check.sh        # results in $OUT (the device run's), else runs/gpu-check
#
# Needs python3 with torch (CUDA), torchvision, numpy, Pillow and safetensors (the device
# image has them; flwr is not needed). lightly is optional: where `import lightly` fails, a
# copy in .gpu-deps/ is used when present (here: mkdir -p .gpu-deps && cp -r
# .venv/lib/python3.11/site-packages/lightly .gpu-deps/, add /.gpu-deps/ to .git/info/exclude,
# and name .gpu-deps in the run's carry); else its rows are left out and the log says so.
# Writes gpu_check.log and throughput-<size>px.json (4 files). Each size has 150 s; the whole
# run is about 3-5 minutes on one H200, under 8 at worst. Exits 1 at once without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; this script measures the GPU path only" | tee "$LOG" >&2
    exit 1
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  nproc; } 2>&1 | tee "$LOG"

WORK=$(mktemp -d)
export FEDSSL_CACHE_DIR="$WORK/cache"
$PY benchmarks/cache_memory.py make --root "$WORK/photos" --images 5000 --small 5000 2>&1 | tee -a "$LOG"

RUNS="fedssl lightly model-only"
if ! $PY -c "import lightly" 2>/dev/null; then
    if [ -d .gpu-deps/lightly ]; then
        export PYTHONPATH="$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "lightly is not installed and .gpu-deps/lightly was not carried: timing fedssl and model only" | tee -a "$LOG"
        RUNS="fedssl model-only"
    fi
fi

for size in 32 96 224; do
    echo "== ${size} px" | tee -a "$LOG"
    # shellcheck disable=SC2086  # RUNS is a list of words
    timeout 150 $PY benchmarks/performance.py throughput --device cuda --dataset imagefolder \
        --data-path "$WORK/photos/part0" --image-size "$size" --images 5000 \
        --encoders resnet10 resnet18 --methods byol --runs $RUNS --lightly-workers 12 \
        --out "$WORK/px$size" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "${size} px: failed or timed out (exit $status)" | tee -a "$LOG"
    else
        cp "$WORK/px$size/throughput.json" "$OUT/throughput-${size}px.json"
    fi
done
rm -rf "$WORK"
