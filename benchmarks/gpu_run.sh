#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks; logs and results land under $OUT.
# usage: PREFIX_KERNELS_GIT_COMMIT=<sha> bash benchmarks/gpu_run.sh STEP [STEP ...]
# disttests-gpu and scaling need 2 GPUs (NCCL's NVLink multicast stays off: NCCL_NVLS_ENABLE=0)
set -u
export PYTHONUNBUFFERED=1 PREFIX_KERNELS_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
summary() { grep -E "^(FAILED|ERROR)|^E  .*Error|passed|failed" "$1" | head -40; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    optests) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    optests-quick) PREFIX_KERNELS_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "unused or determin or poisons or mha or gqa4" > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    optests-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "gpu or low_precision or compile or determin or only_requested or unused" > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    hftests-gpu) timeout 300 python3 -m pytest -q -p no:logging -m gpu tests/test_patch_model.py > $OUT/hftests.log 2>&1; summary $OUT/hftests.log ;;
    decodetests-gpu) timeout 400 python3 -m pytest -q -p no:logging -m gpu tests/test_decode.py > $OUT/decodetests.log 2>&1; summary $OUT/decodetests.log ;;
    profile) timeout 200 python3 benchmarks/profile_attention.py 2>&1 | tee $OUT/profile.log ;;
    host) timeout 200 python3 benchmarks/profile_host.py 2>&1 | tee $OUT/host.log | cut -c1-160 ;;
    attention) timeout 420 python3 benchmarks/bench_attention.py > $OUT/bench_attention.log 2>&1; grep -v "^shapes\|it/s\]" $OUT/bench_attention.log | tail -45 ;;
    training) timeout 420 python3 benchmarks/bench_training.py --out $OUT > $OUT/bench_training.log 2>&1; tail -30 $OUT/bench_training.log ;;
    disttests-gpu) NCCL_NVLS_ENABLE=0 timeout 300 python3 -m pytest -q -p no:logging -m gpu tests/test_distributed.py > $OUT/disttests.log 2>&1; summary $OUT/disttests.log ;;
    scaling) NCCL_NVLS_ENABLE=0 timeout 560 python3 benchmarks/bench_scaling.py > $OUT/bench_scaling.log 2>&1; grep -v "^W[0-9]" $OUT/bench_scaling.log | tail -22 ;;
    decode) timeout 300 python3 benchmarks/bench_decode_kernel.py > $OUT/bench_decode.log 2>&1; tail -30 $OUT/bench_decode.log ;;
    *) echo "unknown step $step" ;;
  esac
done
