#!/usr/bin/env bash
# Every GPU figure the README quotes, measured in one run on one CUDA GPU and written to one file:
#
#   bash bench/gpu_check.sh [OUT_FILE]        (default: gpu_check.txt; PYTHON=... picks the interpreter)
#
# In order of importance, each piece with its own time limit, the whole within BUDGET_S seconds
# (default 540, so that it fits a 10-minute device slot; pieces that no longer fit are marked
# skipped, not run):
#   1. the gpu-marked tests (the Triton kernel against the C kernel at OpenFWI size, CUDA vs CPU);
#   2. bench/forward.py --device cuda: the fused kernel, the torch ops and the conv2d port,
#      samples/min, peak memory and the fraction of the bandwidth bound at batch 64-512;
#   3. generation: python -m gwi.physics.synth on the GPU, 2,048 CurveVel_A samples (files written);
#   4. refinement: infer.py --refine-steps 20 against --refine-steps 0 on 16 simulated maps with a
#      one-epoch smoke model: seconds per map and step;
#   5. online data: the hgnet_unet and vit_tiled recipes trained on draws simulated on the GPU for
#      ONLINE_STEPS (100) updates: samples/s and the share of the wall time spent simulating
#      (bench/recipe_throughput.py --online);
#   6. each configs/gwi/*.yaml and configs/cnn/cifar10_*.yaml recipe at its batch size on generated
#      data for RECIPE_STEPS (200) updates: samples/s and peak memory (bench/recipe_throughput.py).
# A summary of the figures closes the file.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${1:-gpu_check.txt}
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-540}
RECIPE_STEPS=${RECIPE_STEPS:-200}
ONLINE_STEPS=${ONLINE_STEPS:-100}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START_NS=$(date +%s%N)
: >"$OUT"

elapsed_s() { echo $(( ($(date +%s%N) - START_NS) / 1000000000 )); }

# run LABEL LIMIT_S COMMAND...: the command's output goes to OUT, then its exit status and wall time;
# LAST_MS holds the wall time in milliseconds. Skipped when the budget has no LIMIT_S left for it.
LAST_MS=0
run() {
    local label=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - $(elapsed_s) ))
    if (( left < limit / 2 )); then
        echo "== $label: skipped (time budget: ${left} s left of ${BUDGET_S})" | tee -a "$OUT"
        LAST_MS=-1
        return 1
    fi
    (( limit > left )) && limit=$left
    echo "== $label: $* (limit ${limit} s)" | tee -a "$OUT"
    local t0
    t0=$(date +%s%N)
    timeout "$limit" "$@" >>"$OUT" 2>&1
    local rc=$?
    LAST_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "-- $label: rc=$rc wall=$(( LAST_MS / 1000 )).$(( LAST_MS % 1000 / 100 )) s" | tee -a "$OUT"
    return $rc
}

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi unavailable"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >>"$OUT" 2>&1

# 1. correctness on the GPU first: figures from a wrong kernel are worthless.
run "gpu tests" 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_kernel.py tests/test_physics.py tests/test_cnn_data.py

# 2. the simulator's kernels against the port.
run "forward bench" 240 "$PY" bench/forward.py --device cuda

# 3. generation end to end (simulation and float16 files), samples per minute.
N_GEN=2048
if run "generation" 90 "$PY" -m gwi.physics.synth --family CurveVel_A --n "$N_GEN" --out "$WORK/synth" --device cuda \
        --batch-size 256 --float16; then
    echo "generation: $N_GEN samples in $(( LAST_MS / 1000 )) s: $(( N_GEN * 60000 / (LAST_MS > 0 ? LAST_MS : 1) )) samples/min (files written, start-up included)" | tee -a "$OUT"
fi

# 4. refinement: the same inference with and without 20 refinement steps; the difference per map and step.
N_REF=16
if run "smoke model" 120 "$PY" train.py configs/smoke/gwi.yaml "output_dir=$WORK/smoke" trainer.epochs=1 log.wandb=disabled log.plot=false \
    && run "refine data" 60 "$PY" -m gwi.physics.synth --family CurveVel_A --n "$N_REF" --out "$WORK/labelled" --device cuda --batch-size "$N_REF" \
    && run "refine 0 steps" 90 "$PY" infer.py --checkpoint "$WORK/smoke" --data "$WORK/labelled" --physics-misfit --physics-batch-size "$N_REF"; then
    BASE_MS=$LAST_MS
    if run "refine 20 steps" 150 "$PY" infer.py --checkpoint "$WORK/smoke" --data "$WORK/labelled" --refine-steps 20 --physics-batch-size "$N_REF"; then
        PER=$(( (LAST_MS - BASE_MS) / N_REF ))
        echo "refine: 20 steps cost $(( PER / 1000 )).$(( PER % 1000 / 10 )) s per map (batch $N_REF; inference alone subtracted)" | tee -a "$OUT"
    fi
fi

# 5. does the simulator keep up with training? (issue: online data on a GPU must not be the bottleneck)
for config in configs/gwi/hgnet_unet.yaml configs/gwi/vit_tiled.yaml; do
    run "online $config" 150 "$PY" bench/recipe_throughput.py "$config" --online --steps "$ONLINE_STEPS"
done

# 6. the training recipes at their batch sizes.
for config in configs/gwi/*.yaml configs/cnn/cifar10_*.yaml; do
    run "recipe $config" 120 "$PY" bench/recipe_throughput.py "$config" --steps "$RECIPE_STEPS"
done

{
    echo
    echo "== summary ($(elapsed_s) s in all)"
    grep -E "^(batch .*(samples/min|fused / port)|bandwidth:|bound:|fused/port=|generation:|refine:|recipe=|== .*skipped|-- .*rc=[^0])" "$OUT" | grep -v "^== summary"
} >>"$WORK/summary" 2>&1
cat "$WORK/summary" | tee -a "$OUT"
