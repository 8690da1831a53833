#!/usr/bin/env bash
# On one GPU (device tool, kind nvidia-h100-x1): how long a checkpoint save of the 1.3b config
# stops training, blocking (`checkpoint.async_save=false`) against async (the CPU copy only).
#   carry: .devwheels (zstandard, pyyaml, tqdm, … for Python 3.12), data/quickstart
# Each mode trains 6 steps of micro 4 x 2048 with a save every 2 steps; the log lines
# "saved in" / "training stalled" / "written in" are the figures (issue 7).
#   usage: bash bench/device_save.sh [false|true]...   (async_save values; default: both)
set -uo pipefail
source bench/device_env.sh
df -h /tmp | tail -1
quick="data.train_prefix=data/quickstart/train data.valid_prefix=data/quickstart/valid"
quick="$quick data.tokenizer=data/quickstart/tokenizer.model logging.tensorboard=false"
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(false true)
for mode in "${modes[@]}"; do
  rm -rf /tmp/ckpt-save
  python3 -m mamba_train.cli train configs/1.3b.yaml model.vocab_size=50277 train.steps=6 train.grad_accum=1 \
      optim.warmup_steps=2 train.eval_every=0 logging.log_every=1 checkpoint.every=2 checkpoint.keep_last=1 \
      checkpoint.keep_every=0 checkpoint.async_save=$mode checkpoint.dir=/tmp/ckpt-save \
      logging.run_dir="$OUT/save-async-$mode" $quick 2>&1 | tee "$OUT/save-async-$mode.log"
  du -sh /tmp/ckpt-save/* 2>/dev/null | tee -a "$OUT/save-async-$mode.log"
done
grep -h -E "saved in|stalled|written in|parameters" "$OUT"/save-async-*.log
