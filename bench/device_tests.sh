#!/usr/bin/env bash
# On the GPU machine (device tool): the GPU-marked tests (`pytest -m gpu`), of the files given
# (default: all of tests/). Two-GPU tests (NCCL) skip unless the machine has two GPUs.
#   carry: .devwheels, .anchor (pytest)       usage: bash bench/device_tests.sh [pytest args]
set -uo pipefail
source bench/device_env.sh
export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse the image's 9.0a (GPU.md)
python3 -m pytest -q -m gpu -p no:cacheprovider -rs "${@:-tests}" 2>&1 | tee "$OUT/gpu-tests.log"
exit "${PIPESTATUS[0]}"
