#!/usr/bin/env bash
# Run on the GPU machine (device tool), from the repo root, with .anchor carried:
#   .anchor holds mamba_ssm 2.3.2.post1's Python sources (its __init__ replaced by a version
#   line), einops and pytest as unpacked pure-Python wheels (see GPU.md "The speed anchor").
# Usage: bash bench/device_ssd.sh [tests|gputests|bench|profile|launch|stages]...   (default: tests bench)
#   gputests: only the real-shape (gpu-marked) tests; profile: per-kernel CUDA time, ours and
#   mamba_ssm; launch: bench/bench_launch.py (where the CPU's time goes in ours' eager calls:
#   per launch and per call by launch path, by phase, and a cProfile); stages:
#   bench/profile_ssd.py (each stage alone at its shipped settings, chunk 256/128)
set -o pipefail
source bench/device_env.sh
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench)
status=0
for step in "${steps[@]}"; do
  case "$step" in
    tests)   python3 -m pytest tests/test_ssd_triton.py -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" || status=1 ;;
    bench)   python3 bench/bench_ssd.py 2>&1 | tee "$OUT/bench.log" || status=1
             send_back "ssd-*.json" ;;
    gputests) python3 -m pytest tests/test_ssd_triton.py -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gputests.log" || status=1 ;;
    profile) python3 bench/bench_ssd.py --profile 2>&1 | tee "$OUT/profile.log" || status=1 ;;
    launch)  python3 bench/bench_launch.py --profile 2>&1 | tee "$OUT/launch.log" || status=1 ;;
    stages)  python3 bench/profile_ssd.py 2>&1 | tee "$OUT/stages.log" || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
