#!/usr/bin/env bash
# The GPU check (`make bench-gpu`): on a machine with CUDA and its own Python (no network), install
# what it lacks from the offline wheels, record the machine, run the GPU-marked tests, then the plan
# of bench_gpu.py, within ten minutes in all, into $BENCH_GPU_OUT (default
# results/bench-gpu/DATE-TIME/, one folder per run, in UTC):
#   machine.txt      GPU, driver, torch, timm, CPU cores
#   gpu-tests.txt    the GPU-marked tests
#   bench-gpu.md     the plan's steps (by priority: eager fp16 batch 256 of dense and every method;
#                    the same with CUDA graphs; ViT-B and ViT-L with ToMe r=8; compiled if time
#                    remains), every step's table, and the cells not reached and why
#   STEP/bench.*     each step's bench.py tables, written after every row
# BENCH_GPU_DRYRUN=1 runs the same plan on the CPU with the embedded model (no CUDA needed).
# The variables of bench_gpu.py (BENCH_GPU_BUDGET_S, BENCH_GPU_BATCH, ...) pass through.
set -u
START=$(date +%s)
PY=${GPU_PY:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
export BENCH_GPU_OUT=${BENCH_GPU_OUT:-results/bench-gpu/$(date -u +%Y-%m-%d-%H%M)}
TOTAL=${BENCH_GPU_TOTAL_S:-600}   # the whole check, set-up and tests included

$PY -c "import fvcore" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-build-isolation "$WHEELS"/*.whl "$WHEELS"/*.tar.gz || exit 1
mkdir -p "$BENCH_GPU_OUT"
{ nvidia-smi 2>/dev/null; $PY -c "import torch, timm, fvcore; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__)"; nproc; } > "$BENCH_GPU_OUT/machine.txt" 2>&1

if [ "${BENCH_GPU_DRYRUN:-0}" != 1 ]; then
    $PY -c "import torch; assert torch.cuda.is_available(), 'bench-gpu needs CUDA (BENCH_GPU_DRYRUN=1: the plan on the CPU)'" || exit 1
    timeout 90 $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu_protocol.py > "$BENCH_GPU_OUT/gpu-tests.txt" 2>&1
    tail -3 "$BENCH_GPU_OUT/gpu-tests.txt" >&2
fi
export BENCH_GPU_BUDGET_S=${BENCH_GPU_BUDGET_S:-$(( TOTAL - ($(date +%s) - START) - 15 ))}
$PY bench_gpu.py
