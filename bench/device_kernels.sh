#!/usr/bin/env bash
# Run on the GPU machine (device tool), from the repo root, with .anchor carried:
#   .anchor holds mamba_ssm 2.3.2.post1's Python sources (its __init__ replaced by a version
#   line), einops and pytest as unpacked pure-Python wheels (see GPU.md "The speed anchor").
#   causal_conv1d is not in it (a CUDA build): the conv anchor columns then read n/a.
# Usage: bash bench/device_kernels.sh [gputests|tests|bench|sweep|sweep-norm]...   (default: gputests tests bench)
#   gputests  the `gpu` tests of tests/test_conv_norm_triton.py (real shapes, bf16 vs fp32)
#   tests     the file's other tests, compiled: every kernel variant (widths, flags, dtypes)
#   bench     bench/bench_kernels.py, copies bench/results/kernels-*.json into $OUT
#   sweep     our conv kernels at a few tile configurations (to retune FWD_*/BWD_* in conv1d.py)
#   sweep-norm  our gated norm's backward at a few settings (to retune _blocks in rmsnorm.py)
set -o pipefail
source bench/device_env.sh
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gputests tests bench)
status=0
for step in "${steps[@]}"; do
  case "$step" in
    gputests) python3 -m pytest -q -m gpu tests/test_conv_norm_triton.py tests/test_xent_triton.py -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
                | tee "$OUT/kernels-gputests.log" || status=1 ;;
    tests)    python3 -m pytest -q -m "not gpu" tests/test_conv_norm_triton.py tests/test_xent_triton.py -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
                | tee "$OUT/kernels-tests.log" || status=1 ;;
    bench)    python3 bench/bench_kernels.py 2>&1 | tee "$OUT/kernels-bench.log" || status=1
              send_back "kernels-*.json" ;;
    sweep)    python3 bench/bench_kernels.py --sweep 2>&1 | tee "$OUT/kernels-sweep.log" || status=1 ;;
    sweep-norm) python3 bench/bench_kernels.py --sweep-norm 2>&1 | tee "$OUT/norm-sweep.log" || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
