#!/usr/bin/env bash
# The GPU check (`make bench-gpu`): on a machine with CUDA and its own Python (no network), install
# what it lacks from the offline wheels, run the GPU-marked tests, then bench.py on CUDA at fp16
# and fp32, eager and compiled, for the embedded model, DeiT-S and ViT-B; then the hierarchical
# models and every method on DeiT-S, eager fp16.  Everything lands in $BENCH_GPU_OUT (default
# results/bench-gpu/): machine.txt (GPU, driver, torch, timm), gpu-tests.txt, one folder per table.
#
# BENCH_GPU_BOUNDED=1 bounds each step to the seconds given below (a lent machine's few minutes);
# bench.py writes its tables after every row, so a step stopped part-way keeps what it timed
# (its heading says PARTIAL).
set -u
PY=${GPU_PY:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
OUT=${BENCH_GPU_OUT:-results/bench-gpu}
MODELS=${BENCH_GPU_MODELS:-default,deit_small_patch16_224,vit_base_patch16_224}
ARGS=${BENCH_GPU_ARGS:---batch-sizes max --methods tome,topk --min-run-time 0.5}
BOUNDED=${BENCH_GPU_BOUNDED:-0}

step() {  # step SECONDS COMMAND...: run it, bounded by SECONDS when BENCH_GPU_BOUNDED=1
    local s=$1; shift
    echo "== $(date -u +%T) $*" >&2
    if [ "$BOUNDED" = 1 ]; then timeout "$s" "$@"; else "$@"; fi
    local rc=$?
    [ $rc -eq 0 ] || echo "== step ended with status $rc: $*" >&2
}

$PY -c "import fvcore" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-build-isolation "$WHEELS"/*.whl "$WHEELS"/*.tar.gz || exit 1
$PY -c "import torch; assert torch.cuda.is_available(), 'bench-gpu needs CUDA'" || exit 1
mkdir -p "$OUT"
{ nvidia-smi; $PY -c "import torch, timm, fvcore; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__)"; nproc; } > "$OUT/machine.txt" 2>&1

step 90 $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu_protocol.py > "$OUT/gpu-tests.txt" 2>&1
tail -3 "$OUT/gpu-tests.txt" >&2
for p in fp16 fp32; do
    step 155 $PY bench.py --device cuda --precision "$p" --compile default --models "$MODELS" $ARGS --out "$OUT/$p"
done
# hierarchical models (channels_last) and every method on DeiT-S: eager only, to stay within minutes
step 60 $PY bench.py --device cuda --precision fp16 --compile none --batch-sizes 64 --min-run-time 0.5 \
    --models convnext_tiny,swin_tiny_patch4_window7_224 --out "$OUT/hierarchical-fp16"
step 60 $PY bench.py --device cuda --precision fp16 --compile none --batch-sizes 64 --min-run-time 0.5 \
    --models deit_small_patch16_224 --out "$OUT/methods-fp16"
exit 0
