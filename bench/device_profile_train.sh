#!/usr/bin/env bash
# On a 2-GPU machine (device tool): one parallel training run with torch.profiler over steps 6-7
# (logging.profile_steps), then bench/trace_summary.py on rank 0's trace: wall time, GPU busy
# time, and the CPU operators that took longest. MODEL, and the run's overrides in ARGS.
#   carry: .devwheels, data/quickstart
#   usage: MODEL=1.3b ARGS="parallel.tp=2 train.cuda_graph=true" bash bench/device_profile_train.sh
set -uo pipefail
source bench/device_env.sh
export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse the image's 9.0a (GPU.md)
MODEL=${MODEL:-1.3b} ARGS=${ARGS:-parallel.tp=2 train.cuda_graph=true}
quick="data.train_prefix=data/quickstart/train data.valid_prefix=data/quickstart/valid"
quick="$quick data.tokenizer=data/quickstart/tokenizer.model logging.tensorboard=false"
timeout 240 torchrun --standalone --nproc-per-node 2 -m mamba_train.cli train configs/$MODEL.yaml model.ngroups=2 \
  train.grad_accum=1 optim.warmup_steps=5 train.eval_every=0 train.eval_batches=1 logging.log_every=1 \
  checkpoint.every=0 $quick train.steps=8 "logging.profile_steps=[6,7]" logging.run_dir=/tmp/profile-run \
  checkpoint.dir=/tmp/ckpt-profile $ARGS > "$OUT/profile-run.log" 2>&1
echo "training exit $?"; grep -E "^step" "$OUT/profile-run.log" | tail -4
python3 bench/trace_summary.py /tmp/profile-run/profile/rank0-steps6-7.json --top 22 | tee "$OUT/trace-summary.txt"
