#!/usr/bin/env bash
# On the GPU machine (device tool): the training loop on CUDA in bf16 autocast on the
# quickstart data, then the test suite there (gpu-marked tests included).
#   carry: .devwheels (zstandard, pyyaml, tqdm for Python 3.12), data/quickstart
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/*.whl
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m mamba_train.cli train configs/tiny-cpu.yaml train.device=cuda train.steps=200 train.micro_batch=32 \
    logging.tensorboard=false logging.log_every=25 logging.run_dir="$OUT/run" checkpoint.dir=/tmp/ckpt \
    2>&1 | tee "$OUT/train.log"
python3 -m mamba_train.cli eval --ckpt /tmp/ckpt --out "$OUT/eval.json" | tail -3
