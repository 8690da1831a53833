#!/usr/bin/env bash
# On the GPU machine (device tool): the training loop on CUDA in bf16 autocast on the
# quickstart data (tiny model, then the 130m shape for a short throughput check).
#   carry: .devwheels (zstandard, pyyaml, tqdm for Python 3.12), data/quickstart
set -euo pipefail
source bench/device_env.sh
quick="data.train_prefix=data/quickstart/train data.valid_prefix=data/quickstart/valid"
quick="$quick data.tokenizer=data/quickstart/tokenizer.model logging.tensorboard=false"
python3 -m mamba_train.cli train configs/tiny-cpu.yaml train.device=cuda train.steps=200 train.micro_batch=32 \
    logging.log_every=25 logging.run_dir="$OUT/tiny" checkpoint.dir=/tmp/ckpt-tiny $quick 2>&1 | tee "$OUT/tiny.log"
# 130m shape, 40 steps of 16 x 2048 tokens: the log's tokens/s and MFU (datasheet peak) after warm-up
python3 -m mamba_train.cli train configs/130m.yaml train.steps=40 train.grad_accum=1 optim.warmup_steps=5 \
    checkpoint.every=0 train.eval_every=0 logging.log_every=5 logging.run_dir="$OUT/m130" \
    checkpoint.dir=/tmp/ckpt-130m $quick 2>&1 | tee "$OUT/m130.log"
