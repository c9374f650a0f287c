#!/usr/bin/env bash
# Everything this project checks and measures on a CUDA GPU, in one go, on a machine that has only python3
# with torch, triton, numpy, matplotlib (and pytest for the first step; compute-sanitizer for the second):
#
#   tests     the kernels against the float64 reference on the GPU (compiled, not interpreted), fwd and grads
#   sanitize  compute-sanitizer memcheck over one small call of every launch variant of the kernels
#   tune      the launch sweep (kernels/tune.py): which settings are fastest per shape
#   kernel    the kernel benchmark (kernels/bench.py): fused Triton against the stepwise baseline, roofline
#   blocks    the block and model benchmark (benchmarks/blocks.py): C-GSPN against attention (SDPA)
#   compiled  both blocks eager and under torch.compile, width 1152, batch 1 (bench_blocks --compiled)
#   profile   (not in the default set) where one C-GSPN block's GPU time goes, width 1152 at 2048 px
#   compiled-max  (not in the default set) `compiled` at 2048 px in torch.compile's max-autotune-no-cudagraphs
#             mode (Triton matmuls, GELU fused into fc1; minutes of autotuning)
#
#   scripts/gpu_checks.sh                  # all six steps
#   scripts/gpu_checks.sh tests kernel     # some of them
#
# Results go to reports/benchmarks/ (named by device); each step's log goes to $OUT (default gpu-logs/).
# A failing step is reported and the next one still runs; the exit status is the number of failed steps.
set -u
out=${OUT:-gpu-logs}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitize tune kernel blocks compiled)
failed=0

run_step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s (log: $out/$name.log)"
    tail -n "${TAIL:-15}" "$out/$name.log"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/device.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.log"

for step in "${steps[@]}"; do
    case $step in
        tests) run_step tests env CGSPN_TEST_DEVICE=cuda $py -m pytest -q -p no:cacheprovider \
                   tests/test_gspn_kernels.py -k reference ;;
        sanitize) run_step sanitize compute-sanitizer --tool memcheck --error-exitcode 1 $py -m kernels.tune --smoke ;;
        tune) run_step tune $py -m kernels.tune ;;
        kernel) run_step kernel $py -m kernels.bench ;;
        blocks) run_step blocks $py -m benchmarks.blocks ;;
        compiled) run_step compiled $py -m benchmarks.blocks --compiled ;;
        compiled-max) run_step compiled-max $py -m benchmarks.blocks --compiled --sides 2048 \
                          --compile-mode max-autotune-no-cudagraphs ;;
        profile) run_step profile $py -m benchmarks.blocks --profile 1152 2048 1 ;;
        *) echo "unknown step '$step' (known: tests sanitize tune kernel blocks compiled compiled-max profile)"; failed=$((failed + 1)) ;;
    esac
done
exit $failed
