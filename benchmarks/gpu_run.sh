#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks; logs and results land under $OUT.
# usage: PREFIX_KERNELS_GIT_COMMIT=<sha> bash benchmarks/gpu_run.sh STEP [STEP ...]
# disttests-gpu and scaling need 2 GPUs (NCCL's NVLink multicast stays off: NCCL_NVLS_ENABLE=0)
set -u
# The device gets a copy of the working tree whose .git can be stale: the commit must come from
# the caller's checkout (PREFIX_KERNELS_GIT_COMMIT=$(git rev-parse HEAD) computed locally).
[ -n "${PREFIX_KERNELS_GIT_COMMIT:-}" ] || echo "WARNING: PREFIX_KERNELS_GIT_COMMIT is unset: results carry the device copy's .git commit, which can be stale"
export PYTHONUNBUFFERED=1 PREFIX_KERNELS_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
# wheels the device lacks (nvidia-cudnn-frontend for the cudnn_fe vendor), carried in .whl/; fetch
# them here with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
#   --implementation cp --platform manylinux_2_28_x86_64 -d .whl nvidia-cudnn-frontend==1.26.0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
summary() { grep -E "^(FAILED|ERROR)|^E  .*Error|passed|failed" "$1" | head -40; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    optests) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    optests-quick) PREFIX_KERNELS_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "unused or determin or poisons or mha or gqa4" > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    optests-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "gpu or low_precision or compile or determin or only_requested or unused" > $OUT/optests.log 2>&1; summary $OUT/optests.log ;;
    hftests-gpu) timeout 300 python3 -m pytest -q -p no:logging -m gpu tests/test_patch_model.py > $OUT/hftests.log 2>&1; summary $OUT/hftests.log ;;
    encdectests-gpu) timeout 420 python3 -m pytest -q -p no:logging -m gpu tests/test_seq2seq.py > $OUT/encdectests.log 2>&1; summary $OUT/encdectests.log ;;
    decodetests-gpu) timeout ${DECODETESTS_TIMEOUT:-540} python3 -m pytest -q -p no:logging -m gpu tests/test_decode.py --durations=5 > $OUT/decodetests.log 2>&1; summary $OUT/decodetests.log ;;
    profile) timeout 200 python3 benchmarks/profile_attention.py 2>&1 | tee $OUT/profile.log ;;
    host) timeout 200 python3 benchmarks/profile_host.py 2>&1 | tee $OUT/host.log | cut -c1-160 ;;
    attention) timeout 420 python3 benchmarks/bench_attention.py > $OUT/bench_attention.log 2>&1; grep -v "^shapes\|it/s\]" $OUT/bench_attention.log | tail -45 ;;
    training) timeout 420 python3 benchmarks/bench_training.py --out $OUT > $OUT/bench_training.log 2>&1; tail -30 $OUT/bench_training.log ;;
    attention-train-shapes) PREFIX_KERNELS_RESULTS=$OUT/train_shapes timeout 300 python3 benchmarks/bench_attention.py --shape 8,32,4,1024,64,32,1 --shape 2,32,4,4096,64,128,1 --variants floor,prefix_kernels --no-plot > $OUT/attention_train_shapes.log 2>&1; tail -25 $OUT/attention_train_shapes.log ;;
    profile-training) timeout 300 python3 benchmarks/profile_training.py 2>&1 | tee $OUT/profile_training.log ;;
    profile-training-short) for arch in ${PROFILE_ARCHS:-tinyllama gpt2}; do timeout 45 python3 benchmarks/profile_training.py --arch $arch 8,512,32 --cases prefix-kernels peft-prefix 2>&1 | tee -a $OUT/profile_training_short.log | grep -v "Warning\|warn"; done ;;
    launchtests-gpu) python3 -c "import inspect, triton; from triton.compiler.compiler import CompiledKernel; print(triton.__version__); print(inspect.getsource(CompiledKernel.__getitem__))" 2>&1 | tee $OUT/triton_launcher.txt | head -14
      PREFIX_KERNELS_AUTOTUNE=0 timeout ${LAUNCHTESTS_TIMEOUT:-120} python3 -m pytest -q -p no:logging -m gpu tests/test_launch.py > $OUT/launchtests.log 2>&1; summary $OUT/launchtests.log ;;
    profile-gpt2-ab) for direct in 1 0; do PREFIX_KERNELS_DIRECT_LAUNCH=$direct timeout 60 python3 benchmarks/profile_training.py --arch gpt2 8,512,32 --cases prefix-kernels $([ $direct = 1 ] && echo peft-prefix) 2>&1 | sed "s/^/[direct=$direct] /" | tee -a $OUT/profile_gpt2_ab.log | grep -v "Warning\|warn" | grep -E "wall|host ms|py:[0-9]+[(]" | head -26; done ;;
    host-ab) timeout ${HOSTAB_TIMEOUT:-300} python3 benchmarks/probe_host_ab.py --out $OUT 2>&1 | grep -v "Warning\|warn\|loss_type" | tee $OUT/probe_host_ab.log ;;
    featuretests-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q -p no:logging -m gpu tests/test_attention_features.py tests/test_patch_model_features.py tests/test_seq2seq.py --durations=6 > $OUT/featuretests.log 2>&1; grep -E "passed|failed|^FAILED|^ERROR|s call" $OUT/featuretests.log | head -24 ;;
    probe-merge-profile) timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/probe_split.py --variants cudnn_noprefix,fused,split_cudnn_merge --budget-s ${PROBE_BUDGET:-100} --shapes ${PROBE_SHAPES:-5} --profile > $OUT/probe_merge_profile.log 2>&1; echo "rc=$?"; grep -A12 "backward of\|ratio =" $OUT/probe_merge_profile.log | cut -c1-160 | tail -60 ;;
    probe-lpt) PREFIX_KERNELS_AUTOTUNE=0 timeout ${LPT_TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "program_order or low_precision or determin" > $OUT/lpt_tests.log 2>&1; summary $OUT/lpt_tests.log
      timeout ${PROBE_TIMEOUT:-330} python3 benchmarks/probe_split.py --variants ${PROBE_VARIANTS:-cudnn_noprefix,fused,fused_lpt,split_cudnn_merge} --budget-s ${PROBE_BUDGET:-300} --shapes ${PROBE_SHAPES:-5,6,0,3,1,2,4} > $OUT/probe_lpt.log 2>&1; echo "rc=$?"; grep -v "^  aten::" $OUT/probe_lpt.log | grep -v "^  (" | cut -c1-200 | tail -50 ;;
    training-pk) timeout ${TRAINING_TIMEOUT:-280} python3 benchmarks/bench_training.py --cases prefix-kernels floor --out $OUT/training_pk > $OUT/training_pk.log 2>&1; echo "rc=$?"; grep -v "^$" $OUT/training_pk.log | tail -14 ;;
    probe-merge) timeout ${PROBE_TIMEOUT:-120} python3 benchmarks/probe_split.py --variants cudnn_noprefix,fused,split_cudnn_merge,split_cudnn_fused_forward --budget-s ${PROBE_BUDGET:-85} --shapes 5,6,0,3,1,2,4 > $OUT/probe_merge.log 2>&1; echo "rc=$?"; grep -v "^  aten::" $OUT/probe_merge.log | cut -c1-200 | tail -42 ;;
    serve-hf-gpu) timeout ${SERVETESTS_TIMEOUT:-200} python3 -m pytest -q -p no:logging -m gpu tests/test_serve_engine.py tests/test_patch_model.py --durations=4 > $OUT/servetests_gpu.log 2>&1; summary $OUT/servetests_gpu.log ;;
    decode-b32) timeout ${DECODE_B32_TIMEOUT:-200} python3 benchmarks/bench_decode.py --batches 32 --cases engine hf-compiled plain-step engine-rebuilt --out $OUT/b32 > $OUT/bench_decode_b32.log 2>&1; tr '\r' '\n' < $OUT/bench_decode_b32.log | grep -v "it/s\]" | grep -v "^ *$" | tail -16 ;;
    probe-prefill) timeout 200 python3 benchmarks/probe_prefill_host.py > $OUT/probe_prefill_host.log 2>&1; grep "^group" $OUT/probe_prefill_host.log ;;
    probe-serve) timeout ${PROBE_SERVE_TIMEOUT:-240} python3 benchmarks/probe_serve_host.py 2>&1 | tee $OUT/probe_serve_host.log | cut -c1-160 ;;
    profile-decode) timeout 200 python3 benchmarks/profile_decode.py ${PROFILE_DECODE_BATCHES:-32 128} 2>&1 | tee $OUT/profile_decode.log ;;
    disttests-gpu) NCCL_NVLS_ENABLE=0 timeout 300 python3 -m pytest -q -p no:logging -m gpu tests/test_distributed.py > $OUT/disttests.log 2>&1; summary $OUT/disttests.log ;;
    scaling) NCCL_NVLS_ENABLE=0 timeout 560 python3 benchmarks/bench_scaling.py > $OUT/bench_scaling.log 2>&1; grep -v "^W[0-9]" $OUT/bench_scaling.log | tail -22 ;;
    decode) timeout 300 python3 benchmarks/bench_decode_kernel.py > $OUT/bench_decode.log 2>&1; tail -30 $OUT/bench_decode.log ;;
    decode-splits) timeout 200 python3 benchmarks/bench_decode_kernel.py --sweep-splits --contexts ${SPLIT_CONTEXTS:-4096 16384} --batches ${SPLIT_BATCHES:-32} 2>&1 | tee $OUT/decode_splits.log ;;
    servetests-gpu) timeout 540 python3 -m pytest -q -p no:logging tests/test_serve_engine.py tests/test_serve_http.py > $OUT/servetests.log 2>&1; summary $OUT/servetests.log ;;
    servetests-gpuonly) timeout ${SERVETESTS_TIMEOUT:-150} python3 -m pytest -q -p no:logging -m gpu tests/test_serve_engine.py --durations=5 > $OUT/servetests_gpu.log 2>&1; summary $OUT/servetests_gpu.log ;;
    steptests-gpu) timeout ${STEPTESTS_TIMEOUT:-400} python3 -m pytest -q -p no:logging -m gpu tests/test_step.py tests/test_decode.py -k "step or custom_op" --durations=8 > $OUT/steptests.log 2>&1; summary $OUT/steptests.log ;;
    decode-step) timeout 295 python3 benchmarks/profile_decode_step.py 2>&1 | tee $OUT/decode_step.log | grep -v "^\s*$" ;;
    decode-step-extra) PREFIX_KERNELS_RESULTS=$OUT/extra timeout 295 python3 benchmarks/profile_decode_step.py --batches 32 128 --variants eager-graph compiled+fused --extra static whole --no-fp32-check 2>&1 | tee $OUT/decode_step_extra.log ;;
    decode-step-autotune) PREFIX_KERNELS_RESULTS=$OUT/autotune timeout 295 python3 benchmarks/profile_decode_step.py --batches 32 128 --variants compiled+fused --extra autotune --no-fp32-check 2>&1 | tee $OUT/decode_step_autotune.log ;;
    probe-split) timeout 330 python3 benchmarks/probe_split.py > $OUT/probe_split.log 2>&1; echo "rc=$?"; grep -v "^  aten::" $OUT/probe_split.log | cut -c1-230 | tail -120 ;;
    training-split) for mode in ${SPLIT_MODES:-pad merge}; do PREFIX_KERNELS_ATTENTION=split PREFIX_KERNELS_SPLIT_MODE=$mode timeout 280 python3 benchmarks/bench_training.py --cases prefix-kernels floor --out $OUT/training_split_$mode > $OUT/training_split_$mode.log 2>&1; echo "-- split, mode $mode"; grep -v "^$" $OUT/training_split_$mode.log | tail -14; done ;;
    kerneltests-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 540 python3 -m pytest -q -p no:logging -m gpu tests/test_attention_features.py tests/test_patch_model_features.py -k "not fp16" > $OUT/kerneltests.log 2>&1; summary $OUT/kerneltests.log ;;
    kerneltests-fp16-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 540 python3 -m pytest -q -p no:logging -m gpu tests/test_attention_features.py -k fp16 > $OUT/kerneltests_fp16.log 2>&1; summary $OUT/kerneltests_fp16.log ;;
    kerneltests-all-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 560 python3 -m pytest -q -p no:logging tests/test_attention_features.py -m "not gpu" > $OUT/kerneltests_all.log 2>&1; summary $OUT/kerneltests_all.log ;;
    features) PREFIX_KERNELS_AUTOTUNE=0 timeout ${FEATURES_TIMEOUT:-400} python3 benchmarks/bench_features.py > $OUT/bench_features.log 2>&1; echo "rc=$?"; tail -22 $OUT/bench_features.log ;;
    packed) PREFIX_KERNELS_AUTOTUNE=0 timeout ${PACKED_TIMEOUT:-500} python3 benchmarks/bench_packed.py > $OUT/bench_packed.log 2>&1; echo "rc=$?"; tail -14 $OUT/bench_packed.log ;;
    splittests-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:logging tests/test_split_attention.py > $OUT/splittests.log 2>&1; summary $OUT/splittests.log ;;
    decode-e2e) timeout 400 python3 benchmarks/bench_decode.py --cases engine peft hf-generate > $OUT/bench_decode_e2e.log 2>&1; tr '\r' '\n' < $OUT/bench_decode_e2e.log | grep -v "it/s\]" | grep -v "^ *$" | tail -45 ;;
    decode-prefill) timeout ${DECODE_PREFILL_TIMEOUT:-400} python3 benchmarks/bench_decode.py --cases engine engine-compiled-prefill --batches ${DECODE_PREFILL_BATCHES:-32 128} --out $OUT/prefill > $OUT/bench_decode_prefill.log 2>&1; tr '\r' '\n' < $OUT/bench_decode_prefill.log | grep -v "it/s\]" | grep -v "^ *$" | tail -24 ;;
    seq2seqtests-gpu) timeout ${SEQ2SEQTESTS_TIMEOUT:-150} python3 -m pytest -q -p no:logging -m gpu tests/test_serve_seq2seq.py --durations=4 > $OUT/seq2seqtests.log 2>&1; summary $OUT/seq2seqtests.log ;;
    seq2seq) timeout ${SEQ2SEQ_TIMEOUT:-300} python3 benchmarks/bench_seq2seq.py ${SEQ2SEQ_ARGS:-} > $OUT/bench_seq2seq.log 2>&1; echo "rc=$?"; grep -v "it/s\]\|\[transformers\]" $OUT/bench_seq2seq.log | tail -22 ;;
    prefilltests-gpu) timeout ${PREFILLTESTS_TIMEOUT:-200} python3 -m pytest -q -p no:logging -m gpu tests/test_prefill.py --durations=4 > $OUT/prefilltests.log 2>&1; summary $OUT/prefilltests.log ;;
    decode-vs-compiled) timeout 560 python3 benchmarks/bench_decode.py --cases engine engine-eager hf-compiled plain-step --out $OUT/vs_compiled > $OUT/bench_decode_vs_compiled.log 2>&1; tr '\r' '\n' < $OUT/bench_decode_vs_compiled.log | grep -v "it/s\]" | grep -v "^ *$" | tail -40 ;;
    servehttp-tests) timeout 300 python3 -m pytest -q -p no:logging tests/test_serve_http.py tests/test_serve_hardening.py tests/test_serve_load.py tests/test_bench_serve.py > $OUT/servehttp.log 2>&1; python3 -c "import aiohttp; print('aiohttp', aiohttp.__version__)"; summary $OUT/servehttp.log ;;
    serve-variants) for v in ${SERVE_VARIANTS:-default: wait30:--prefill-wait=0.03 switch05:--switch-interval=0.0005 cprefill:--compiled-prefill}; do name=${v%%:*}; timeout ${SERVE_VARIANT_TIMEOUT:-200} python3 benchmarks/bench_serve.py --concurrency ${SERVE_VARIANT_C:-32 64} --rounds ${SERVE_VARIANT_ROUNDS:-3} $(echo ${v#*:} | tr , " ") --out $OUT/serve_$name > $OUT/bench_serve_$name.log 2>&1; echo "-- $name"; grep -E "^C=|required" $OUT/bench_serve_$name.log; done ;;
    serve-bench) timeout 500 python3 benchmarks/bench_serve.py ${SERVE_ARGS:-} --out $OUT > $OUT/bench_serve.log 2>&1; tail -16 $OUT/bench_serve.log ;;
    curves) timeout ${CURVES_TIMEOUT:-480} python3 -m prefix_kernels.bench.training --curves --steps ${CURVES_STEPS:-60} ${CURVES_ARCHS:+--archs $CURVES_ARCHS} --out $OUT > $OUT/training_curves.log 2>&1; grep -v "Warning\|warn" $OUT/training_curves.log | tail -20 ;;
    multitask) timeout ${MULTITASK_TIMEOUT:-120} python3 -m prefix_kernels.bench.training --multitask --out $OUT > $OUT/multitask.log 2>&1; tail -8 $OUT/multitask.log ;;
    benchgpu) timeout 300 python3 -m pytest -q -p no:logging -m gpu tests/test_gpu_benchmarks.py --benchmark-json=$OUT/gpu-benchmarks.json > $OUT/benchgpu.log 2>&1; summary $OUT/benchgpu.log; grep -A12 "^Name (time" $OUT/benchgpu.log ;;
    probe-auto) timeout ${PROBE_TIMEOUT:-330} python3 benchmarks/probe_split.py --variants ${PROBE_VARIANTS:-cudnn_noprefix,auto} --budget-s ${PROBE_BUDGET:-290} --shapes ${PROBE_SHAPES:-5,6,0,3,1,2,4} > $OUT/probe_auto.log 2>&1; echo "rc=$?"; sed -n '/^ratio =/,$p' $OUT/probe_auto.log | cut -c1-200 | head -40 ;;
    lowprec-gpu) PREFIX_KERNELS_AUTOTUNE=0 timeout ${LOWPREC_TIMEOUT:-200} python3 -m pytest -q -p no:logging tests/test_prefix_attention.py -k "${LOWPREC_K:-low_precision or dq_modes}" --durations=3 > $OUT/lowprec.log 2>&1; summary $OUT/lowprec.log ;;
    # host-parts A/B: put an older package at ab_old/ first (untracked; it travels with the tree):
    # mkdir ab_old && git archive <commit> prefix_kernels | tar -x -C ab_old
    host-parts) for label in this old this old; do dir=.; [ $label = old ] && dir=ab_old; [ -d $dir/prefix_kernels ] || continue; PYTHONPATH=$dir timeout 120 python3 benchmarks/probe_host_parts.py --label $label --shape ${HOST_SHAPE:-8,32,4,1024,64,32,1} 2>&1 | grep -v Warn | cut -c1-400; done ;;
    kernel-configs-old) PYTHONPATH=ab_old timeout 200 python3 benchmarks/probe_kernel_configs.py --shapes ${CONFIG_SHAPES:-5,0,6} --kernels none --out /tmp > $OUT/kernel_configs_old.log 2>&1; echo "rc=$?"; grep -E "==" $OUT/kernel_configs_old.log | cut -c1-250 ;;
    cudnnfe-tests) PREFIX_KERNELS_AUTOTUNE=0 timeout ${CUDNNFE_TIMEOUT:-240} python3 -m pytest -q -p no:logging tests/test_split_attention.py tests/test_prefix_rows.py -k "cudnn_fe or bottom_right or pad or rows or frontend" > $OUT/cudnnfe_tests.log 2>&1; summary $OUT/cudnnfe_tests.log ;;
    probe-cudnnfe) timeout ${PROBE_TIMEOUT:-330} python3 benchmarks/probe_split.py --variants ${PROBE_VARIANTS:-cudnn_noprefix,split_cudnnfe_pad,auto,split_flash_pad} --budget-s ${PROBE_BUDGET:-290} --shapes ${PROBE_SHAPES:-5,6,0,3,1,2,4} > $OUT/probe_cudnnfe.log 2>&1; echo "rc=$?"; sed -n '/cuDNN frontend/p;/^== 2/,/^== 3/p;/^ratio =/,$p' $OUT/probe_cudnnfe.log | cut -c1-200 | head -60 ;;
    training-cudnnfe) timeout ${TRAINING_TIMEOUT:-420} python3 benchmarks/bench_training.py --cases prefix-kernels prefix-kernels-cudnn-fe floor --out $OUT/training_cudnnfe > $OUT/training_cudnnfe.log 2>&1; echo "rc=$?"; grep -v "^$" $OUT/training_cudnnfe.log | tail -14 ;;
    dq-modes) timeout ${DQMODES_TIMEOUT:-90} python3 benchmarks/probe_kernel_configs.py --shapes ${CONFIG_SHAPES:-5,0} --dq-modes separate,tma,atomic --kernels none > $OUT/dq_modes.log 2>&1; echo "rc=$?"; grep -E "==|relative|Error" $OUT/dq_modes.log | cut -c1-250 ;;
    kernel-configs) timeout ${CONFIGS_TIMEOUT:-300} python3 benchmarks/probe_kernel_configs.py --shapes ${CONFIG_SHAPES:-5,0,6} --dq-modes ${DQ_MODES:-separate} --budget-s ${CONFIGS_BUDGET:-250} > $OUT/kernel_configs.log 2>&1; echo "rc=$?"; grep -E "==|best|sum of|budget|relative|Error|error" $OUT/kernel_configs.log | cut -c1-250 ;;
    *) echo "unknown step $step" ;;
  esac
done
