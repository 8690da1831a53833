#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root; carry .devwheels (pyyaml, tqdm, … for
# Python 3.12) and .anchor (mamba_ssm 2.3.2.post1 sources, einops).
# Usage: bash bench/device_train.sh [profile MODEL | bench MODEL...]...
#   profile 130m        per-kernel CUDA time of one training step of ours
#   bench 130m 370m     bench/bench_train.py (ours beside the mamba_ssm-block LM) for those models
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/train_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/*.whl
export PYTHONPATH="$PWD/.anchor:$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
while [ $# -gt 0 ]; do
  case "$1" in
    profile) python3 bench/bench_train.py --profile --models "$2" 2>&1 | tee -a "$OUT/train-profile.log" || status=1; shift 2 ;;
    bench)   shift; models=(); while [ $# -gt 0 ] && [ "$1" != profile ] && [ "$1" != bench ]; do models+=("$1"); shift; done
             python3 bench/bench_train.py --models "${models[@]}" 2>&1 | tee -a "$OUT/train-bench.log" || status=1
             cp bench/results/train-*.json "$OUT/" 2>/dev/null ;;
    *) echo "unknown step $1"; status=1; shift ;;
  esac
done
exit $status
