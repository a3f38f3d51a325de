#!/usr/bin/env bash
# The GPU check (`make bench-gpu`): on a machine with CUDA and its own Python (no network), install
# what it lacks from the offline wheels, then, into $BENCH_GPU_OUT (default results/bench-gpu/DATE-TIME/,
# one folder per run, in UTC):
#   machine.txt      GPU, driver, torch, timm, CPU cores
#   gpu-tests.txt    the GPU-marked tests
#   profile-*.md     where ToMe's time goes on DeiT-S (profile_method.py: kernels per forward)
#   compiled-P-M/    bench.py eager and compiled, precision P, model M, at batch $BATCH
#   eager-sweep/     bench.py eager over batches 64 to 1024 (DeiT-S)
#   methods-fp16/    bench.py eager, every method on DeiT-S, at batch $BATCH
#   hierarchical-fp16/  bench.py eager, ConvNeXt-T and Swin-T (channels_last), at batch $BATCH
# The compiled steps first compile every setting in parallel, untimed, one process per setting
# (torch.compile's caches keep the result), so that the timed steps, run one at a time, reuse
# them: compiling ToMe takes over a minute per setting, most of a lent machine's few minutes.
#
# BENCH_GPU_BOUNDED=1 bounds each step to the seconds given below; bench.py and profile_method.py
# write their tables after every row, so a step stopped part-way keeps what it timed (PARTIAL).
# BENCH_GPU_DEVICE=cpu runs the same steps on the CPU (a dry run of this script; slow).
set -u
PY=${GPU_PY:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
OUT=${BENCH_GPU_OUT:-results/bench-gpu/$(date -u +%Y-%m-%d-%H%M)}
DEVICE=${BENCH_GPU_DEVICE:-cuda}
BATCH=${BENCH_GPU_BATCH:-256}
MIN_RUN=${BENCH_GPU_MIN_RUN_TIME:-0.3}
MODE=${BENCH_GPU_COMPILE_MODE:-default}   # torch.compile mode of the compiled columns (reduce-overhead: CUDA graphs)
# model:precision pairs timed eager and compiled, in this order
COMPILED=${BENCH_GPU_COMPILED:-default:fp16 deit_small_patch16_224:fp16 vit_base_patch16_224:fp16 deit_small_patch16_224:fp32 default:fp32}
BOUNDED=${BENCH_GPU_BOUNDED:-0}
SCRATCH=$(mktemp -d)

step() {  # step SECONDS COMMAND...: run it, bounded by SECONDS when BENCH_GPU_BOUNDED=1
    local s=$1; shift
    echo "== $(date -u +%T) $*" >&2
    if [ "$BOUNDED" = 1 ]; then timeout "$s" "$@"; else "$@"; fi
    local rc=$?
    [ $rc -eq 0 ] || echo "== step ended with status $rc: $*" >&2
}

settings_of() {  # the method settings timed on a model (bench.py --methods): one merging, one pruning
    case $1 in default) echo "tome:r=3,topk" ;; *) echo "tome:r=13,topk" ;; esac
}

$PY -c "import fvcore" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-build-isolation "$WHEELS"/*.whl "$WHEELS"/*.tar.gz || exit 1
if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch; assert torch.cuda.is_available(), 'bench-gpu needs CUDA'" || exit 1
fi
mkdir -p "$OUT"
{ nvidia-smi 2>/dev/null; $PY -c "import torch, timm, fvcore; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__)"; nproc; } > "$OUT/machine.txt" 2>&1

if [ "$DEVICE" = cuda ]; then
    step 90 $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu_protocol.py > "$OUT/gpu-tests.txt" 2>&1
    tail -3 "$OUT/gpu-tests.txt" >&2
fi

# where ToMe's time goes, fp16 eager: with proportional attention (an additive mask on the fused
# kernel), without it, and a pruning method beside it
step 50 $PY profile_method.py deit_small_patch16_224 'tome:{"r":13}' 'tome:{"r":13,"prop_attn":false}' \
    'topk:{"keep_rate":0.7}' --device "$DEVICE" --precision fp16 --batch-size "$BATCH" --top 15 \
    --out "$OUT/profile-deit-s-fp16.md"

# compile every setting in parallel (untimed), then time them one run at a time; the processes
# share the cores (each one's own compile workers would otherwise be one per core)
n=0; for mp in $COMPILED; do n=$((n + $(settings_of "${mp%%:*}" | tr , ' ' | wc -w))); done
export TORCHINDUCTOR_COMPILE_THREADS=$(( $(nproc) / n > 1 ? $(nproc) / n : 1 ))
for mp in $COMPILED; do
    m=${mp%%:*}; p=${mp##*:}
    for s in $(settings_of "$m" | tr , ' '); do
        step 170 $PY bench.py --device "$DEVICE" --precision "$p" --compile "$MODE" --models "$m" --methods "$s" \
            --batch-sizes "$BATCH" --min-run-time 0.01 --out "$SCRATCH/warm-$m-$p-${s%%:*}" > /dev/null 2>&1 &
    done
done
wait
unset TORCHINDUCTOR_COMPILE_THREADS
echo "== $(date -u +%T) compiled in parallel (untimed)" >&2
for mp in $COMPILED; do
    m=${mp%%:*}; p=${mp##*:}
    step 55 $PY bench.py --device "$DEVICE" --precision "$p" --compile "$MODE" --models "$m" \
        --methods "$(settings_of "$m")" --batch-sizes "$BATCH" --min-run-time "$MIN_RUN" --out "$OUT/compiled-$p-$m"
    if [ "$m:$p" = deit_small_patch16_224:fp16 ]; then  # eager over batch sizes: launch-bound or not
        step 45 $PY bench.py --device "$DEVICE" --precision fp16 --compile none --models "$m" \
            --methods tome:r=13,topk,evit:keep_rate=0.7 --batch-sizes 64,256,1024 --min-run-time "$MIN_RUN" \
            --out "$OUT/eager-sweep"
    fi
done
rm -rf "$SCRATCH"
step 150 $PY bench.py --device "$DEVICE" --precision fp16 --compile none --models deit_small_patch16_224 \
    --batch-sizes "$BATCH" --min-run-time "$MIN_RUN" --out "$OUT/methods-fp16"
step 90 $PY bench.py --device "$DEVICE" --precision fp16 --compile none --models convnext_tiny,swin_tiny_patch4_window7_224 \
    --batch-sizes "$BATCH" --min-run-time "$MIN_RUN" --out "$OUT/hierarchical-fp16"
exit 0
