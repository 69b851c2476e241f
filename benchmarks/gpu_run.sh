#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks; everything lands under $OUT.
# usage: PREFIX_KERNELS_GIT_COMMIT=<sha> bash benchmarks/gpu_run.sh [tests] [attention] [...]
set -u
export PYTHONUNBUFFERED=1 PREFIX_KERNELS_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
for step in "$@"; do
  echo "=== $step"
  case $step in
    tests) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py > $OUT/tests.log 2>&1; grep -E "^(FAILED|ERROR|E  )|passed|failed" $OUT/tests.log | head -30 ;;
    profile) timeout 200 python3 benchmarks/profile_attention.py 2>&1 | tee $OUT/profile.log ;;
    host) timeout 200 python3 benchmarks/profile_host.py 2>&1 | tee $OUT/host.log | cut -c1-160 ;;
    attention) TRITON_PRINT_AUTOTUNING=1 timeout 420 python3 benchmarks/bench_attention.py 2>&1 | tee $OUT/bench_attention.log | grep -v "^shapes" ;;
    *) echo "unknown step $step" ;;
  esac
done
